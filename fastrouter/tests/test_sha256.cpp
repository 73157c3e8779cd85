// SHA-256 against the FIPS 180 examples and HMAC-SHA256 against RFC 4231's test cases.
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "sha256.h"

using namespace fr;

namespace {

std::string hex(const uint8_t* p, size_t n) {
    static const char kDigits[] = "0123456789abcdef";
    std::string s;
    for (size_t i = 0; i < n; i++) {
        s += kDigits[p[i] >> 4];
        s += kDigits[p[i] & 15];
    }
    return s;
}

std::string sha_hex(const std::string& m) {
    uint8_t d[kSha256Size];
    sha256(m.data(), m.size(), d);
    return hex(d, sizeof d);
}

std::string hmac_hex(const std::string& key, const std::string& data) {
    uint8_t d[kSha256Size];
    hmac_sha256(reinterpret_cast<const uint8_t*>(key.data()), key.size(), data.data(), data.size(),
                d);
    return hex(d, sizeof d);
}

}  // namespace

// FIPS 180-2 Appendix B and the NIST examples for SHA-256.
TEST(sha256_fips_180_vectors) {
    CHECK_EQ(sha_hex("abc"),
             std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    CHECK_EQ(sha_hex(""),
             std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    CHECK_EQ(sha_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
             std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    CHECK_EQ(sha_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmn"
                     "opqklmnopqrlmnopqrsmnopqrstnopqrstu"),
             std::string("cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"));
    CHECK_EQ(sha_hex(std::string(1000000, 'a')),
             std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
}

TEST(sha256_same_digest_whatever_the_pieces) {
    // Every split of a message across the 55/56/64-byte padding boundaries.
    std::string m;
    for (int i = 0; i < 200; i++) m += static_cast<char>('a' + i % 26);
    for (size_t len : {0u, 1u, 55u, 56u, 57u, 63u, 64u, 65u, 119u, 120u, 128u, 200u}) {
        std::string whole = sha_hex(m.substr(0, len));
        for (size_t cut = 0; cut <= len; cut += 7) {
            Sha256 s;
            s.update(m.data(), cut);
            s.update(m.data() + cut, len - cut);
            uint8_t d[kSha256Size];
            s.finish(d);
            CHECK_EQ(hex(d, sizeof d), whole);
        }
    }
}

// RFC 4231 section 4: test cases 1-7.
TEST(hmac_sha256_rfc_4231) {
    CHECK_EQ(hmac_hex(std::string(20, '\x0b'), "Hi There"),
             std::string("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"));
    CHECK_EQ(hmac_hex("Jefe", "what do ya want for nothing?"),
             std::string("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"));
    CHECK_EQ(hmac_hex(std::string(20, '\xaa'), std::string(50, '\xdd')),
             std::string("773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"));
    std::string key4;
    for (int i = 1; i <= 25; i++) key4 += static_cast<char>(i);
    CHECK_EQ(hmac_hex(key4, std::string(50, '\xcd')),
             std::string("82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"));
    // Test case 5 is truncated to 128 bits.
    CHECK_EQ(hmac_hex(std::string(20, '\x0c'), "Test With Truncation").substr(0, 32),
             std::string("a3b6167473100ee06e0c796c2955552b"));
    CHECK_EQ(hmac_hex(std::string(131, '\xaa'),
                      "Test Using Larger Than Block-Size Key - Hash Key First"),
             std::string("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"));
    CHECK_EQ(hmac_hex(std::string(131, '\xaa'),
                      "This is a test using a larger than block-size key and a larger than "
                      "block-size data. The key needs to be hashed before being used by the HMAC "
                      "algorithm."),
             std::string("9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"));
}

TEST(hmac_fed_in_pieces_matches_one_call) {
    const std::string key = "Jefe", data = "what do ya want for nothing?";
    HmacSha256 m(reinterpret_cast<const uint8_t*>(key.data()), key.size());
    for (char ch : data) m.update(&ch, 1);
    uint8_t d[kSha256Size];
    m.finish(d);
    CHECK_EQ(hex(d, sizeof d), hmac_hex(key, data));
}

TEST(constant_time_equal_compares_every_byte) {
    uint8_t a[32], b[32];
    for (int i = 0; i < 32; i++) a[i] = b[i] = static_cast<uint8_t>(i * 7);
    CHECK(constant_time_equal(a, b, 32));
    for (int i = 0; i < 32; i++) {
        b[i] ^= 0x80;
        CHECK(!constant_time_equal(a, b, 32));
        b[i] ^= 0x80;
    }
    CHECK(constant_time_equal(a, b, 0));
}

TEST_MAIN()
