// SHA-256 and HMAC-SHA256; see sha256.h. Checked against the FIPS 180 and RFC 4231 vectors in
// tests/test_sha256.cpp.
#include "sha256.h"

#include <cstring>

namespace fr {

namespace {

constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

inline uint32_t load_be32(const uint8_t* p) {
    return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
           (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}

inline void store_be32(uint8_t* p, uint32_t v) {
    p[0] = static_cast<uint8_t>(v >> 24);
    p[1] = static_cast<uint8_t>(v >> 16);
    p[2] = static_cast<uint8_t>(v >> 8);
    p[3] = static_cast<uint8_t>(v);
}

}  // namespace

void Sha256::reset() {
    static const uint32_t kInit[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::memcpy(h_, kInit, sizeof h_);
    used_ = 0;
    total_ = 0;
}

void Sha256::block(const uint8_t* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) w[i] = load_be32(p + 4 * i);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3];
    uint32_t e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; i++) {
        uint32_t s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = h + s1 + ch + kK[i] + w[i];
        uint32_t s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
        uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = s0 + maj;
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
}

void Sha256::update(const void* data, size_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    total_ += n;
    if (used_ > 0) {
        size_t take = kSha256Block - used_ < n ? kSha256Block - used_ : n;
        std::memcpy(buf_ + used_, p, take);
        used_ += take;
        p += take;
        n -= take;
        if (used_ < kSha256Block) return;
        block(buf_);
        used_ = 0;
    }
    for (; n >= kSha256Block; p += kSha256Block, n -= kSha256Block) block(p);
    if (n > 0) {
        std::memcpy(buf_, p, n);
        used_ = n;
    }
}

void Sha256::finish(uint8_t out[kSha256Size]) {
    uint64_t bits = total_ * 8;
    uint8_t pad[kSha256Block + 8] = {0x80};
    // Pad to 56 mod 64, then the length as a big-endian u64.
    size_t padlen = used_ < 56 ? 56 - used_ : 120 - used_;
    for (int i = 0; i < 8; i++) pad[padlen + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    update(pad, padlen + 8);
    for (int i = 0; i < 8; i++) store_be32(out + 4 * i, h_[i]);
    secure_zero(buf_, sizeof buf_);
}

void sha256(const void* data, size_t n, uint8_t out[kSha256Size]) {
    Sha256 s;
    s.update(data, n);
    s.finish(out);
}

HmacSha256::HmacSha256(const uint8_t* key, size_t klen) {
    uint8_t k[kSha256Block] = {0};
    if (klen > kSha256Block)
        sha256(key, klen, k);
    else if (klen > 0)
        std::memcpy(k, key, klen);
    uint8_t ikey[kSha256Block];
    for (size_t i = 0; i < kSha256Block; i++) {
        ikey[i] = static_cast<uint8_t>(k[i] ^ 0x36);
        okey_[i] = static_cast<uint8_t>(k[i] ^ 0x5c);
    }
    inner_.update(ikey, sizeof ikey);
    secure_zero(k, sizeof k);
    secure_zero(ikey, sizeof ikey);
}

void HmacSha256::finish(uint8_t out[kSha256Size]) {
    uint8_t inner[kSha256Size];
    inner_.finish(inner);
    Sha256 outer;
    outer.update(okey_, sizeof okey_);
    outer.update(inner, sizeof inner);
    outer.finish(out);
    secure_zero(okey_, sizeof okey_);
    secure_zero(inner, sizeof inner);
}

void hmac_sha256(const uint8_t* key, size_t klen, const void* data, size_t n,
                 uint8_t out[kSha256Size]) {
    HmacSha256 m(key, klen);
    m.update(data, n);
    m.finish(out);
}

bool constant_time_equal(const uint8_t* a, const uint8_t* b, size_t n) {
    // volatile keeps the compiler from turning the loop into an early-exit memcmp.
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < n; i++) diff = static_cast<uint8_t>(diff | (a[i] ^ b[i]));
    return diff == 0;
}

void secure_zero(void* p, size_t n) {
    volatile uint8_t* v = static_cast<volatile uint8_t*>(p);
    while (n--) *v++ = 0;
}

}  // namespace fr
