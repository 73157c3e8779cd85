// The handshake's pieces without a router: the proofs against PROTOCOL.md's hex examples, the
// key file checks, the peer-credential rule and the loopback test of resolved addresses.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "auth.h"
#include "check.h"
#include "frame.h"
#include "net.h"

using namespace fr;
using Bytes = std::vector<uint8_t>;

namespace {

Bytes from_hex(const std::string& text) {
    Bytes out;
    int hi = -1;
    for (char ch : text) {
        int v = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
        if (v < 0) continue;
        if (hi < 0) {
            hi = v;
        } else {
            out.push_back(static_cast<uint8_t>(hi << 4 | v));
            hi = -1;
        }
    }
    return out;
}

// PROTOCOL.md "Examples (hex)": key K = 00 01 .. 1f, Np = 32 x 11, Nr = 32 x 22, role master.
const Bytes kHelloNonce = from_hex(
    "50 52 01 01 00 00 00 00  00 00 00 00 00 00 00 00"
    "00 00 00 00 21 00 00 00  01 11 11 11 11 11 11 11"
    "11 11 11 11 11 11 11 11  11 11 11 11 11 11 11 11"
    "11 11 11 11 11 11 11 11  11");
const Bytes kChallengeFrame = from_hex(
    "50 52 01 0e 00 00 00 00  00 00 00 00 00 00 00 00"
    "00 00 00 00 40 00 00 00  22 22 22 22 22 22 22 22"
    "22 22 22 22 22 22 22 22  22 22 22 22 22 22 22 22"
    "22 22 22 22 22 22 22 22  2b d7 97 e6 e9 bf 0a 29"
    "45 5b e6 1d ec da 02 f1  7e d4 9c 1d 3d fa a3 39"
    "1d c6 88 25 35 a5 64 55");
const Bytes kAuthFrame = from_hex(
    "50 52 01 0f 00 00 00 00  00 00 00 00 00 00 00 00"
    "00 00 00 00 20 00 00 00  4e 77 31 99 1c 07 66 a0"
    "1f ff ec 11 75 bb 12 9e  f4 dc 45 41 be 7e 88 d7"
    "7c 7b 3a 0f e3 51 0a 11");

Bytes frame_bytes(uint8_t type, const Bytes& payload) {
    const FrameHeader h{type, 0, 0, 0, static_cast<uint32_t>(payload.size())};
    Bytes out(kHeaderSize);
    frame_encode_header(h, out.data());
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
}

// The hex block under `caption` in PROTOCOL.md (indented lines after a blank line).
Bytes doc_example(const std::string& doc, const std::string& caption) {
    size_t at = doc.find(caption);
    if (at == std::string::npos) return Bytes();
    std::istringstream in(doc.substr(at + caption.size()));
    std::string line, hex;
    std::getline(in, line);  // rest of the caption line
    bool started = false;
    while (std::getline(in, line)) {
        if (line.compare(0, 4, "    ") == 0) {
            started = true;
            hex += line;
        } else if (started || !line.empty()) {
            break;
        }
    }
    return from_hex(hex);
}

std::string temp_dir() {
    char tmpl[] = "/tmp/fr-auth-XXXXXX";
    const char* d = mkdtemp(tmpl);
    return d ? d : "/tmp";
}

void write_file(const std::string& path, const std::string& text, mode_t mode) {
    std::ofstream(path, std::ios::binary) << text;
    chmod(path.c_str(), mode);
}

const std::string kKeyHex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

}  // namespace

TEST(proofs_match_the_protocol_examples) {
    uint8_t key[kAuthKeySize], np[kNonceSize], nr[kNonceSize];
    for (size_t i = 0; i < kAuthKeySize; i++) key[i] = static_cast<uint8_t>(i);
    std::memset(np, 0x11, sizeof np);
    std::memset(nr, 0x22, sizeof nr);
    uint8_t router_proof[kProofSize], peer_proof[kProofSize];
    auth_router_proof(key, kRoleMaster, np, nr, router_proof);
    auth_peer_proof(key, kRoleMaster, np, nr, peer_proof);

    Bytes hello_payload(1, kRoleMaster);
    hello_payload.insert(hello_payload.end(), np, np + kNonceSize);
    CHECK(frame_bytes(kHello, hello_payload) == kHelloNonce);
    Bytes challenge(nr, nr + kNonceSize);
    challenge.insert(challenge.end(), router_proof, router_proof + kProofSize);
    CHECK(frame_bytes(kChallenge, challenge) == kChallengeFrame);
    CHECK(frame_bytes(kAuth, Bytes(peer_proof, peer_proof + kProofSize)) == kAuthFrame);

    // The labels keep the two proofs apart, and the role is bound into both.
    CHECK(std::memcmp(router_proof, peer_proof, kProofSize) != 0);
    uint8_t as_worker[kProofSize];
    auth_peer_proof(key, kRoleWorker, np, nr, as_worker);
    CHECK(std::memcmp(as_worker, peer_proof, kProofSize) != 0);
}

TEST(protocol_md_carries_the_same_examples) {
    std::ifstream f(FASTROUTER_PROTOCOL_MD);
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string doc = ss.str();
    CHECK(!doc.empty());
    CHECK(doc_example(doc, "HELLO from a master with its nonce") == kHelloNonce);
    CHECK(doc_example(doc, "CHALLENGE answering it") == kChallengeFrame);
    CHECK(doc_example(doc, "AUTH from the master") == kAuthFrame);
}

TEST(key_text) {
    uint8_t key[kAuthKeySize];
    std::string err;
    CHECK(parse_auth_key(kKeyHex, key, &err));
    CHECK_EQ(static_cast<int>(key[0]), 0);
    CHECK_EQ(static_cast<int>(key[31]), 0x1f);
    CHECK(parse_auth_key(kKeyHex + "\n", key, &err));
    std::string upper = kKeyHex;
    for (char& ch : upper) ch = static_cast<char>(toupper(ch));
    CHECK(parse_auth_key(upper, key, &err));
    CHECK_EQ(static_cast<int>(key[10]), 0x0a);
    for (const std::string& bad :
         {std::string(), kKeyHex.substr(1), kKeyHex + "0", kKeyHex + "\n\n", kKeyHex + " ",
          kKeyHex + "\r\n", "x" + kKeyHex.substr(1), std::string(64, 'g')}) {
        err.clear();
        CHECK(!parse_auth_key(bad, key, &err));
        CHECK(err.find("64 hexadecimal characters") != std::string::npos);
    }
}

TEST(key_file_checks) {
    const std::string dir = temp_dir();
    const uid_t me = geteuid();
    uint8_t key[kAuthKeySize];
    std::string err;

    const std::string good = dir + "/key";
    write_file(good, kKeyHex + "\n", 0600);
    CHECK(read_auth_key_file(good, me, key, &err));
    CHECK_EQ(static_cast<int>(key[1]), 1);
    chmod(good.c_str(), 0400);
    CHECK(read_auth_key_file(good, me, key, &err));

    for (mode_t mode : {0644, 0640, 0604, 0700, 0660, 04600}) {
        chmod(good.c_str(), mode);
        err.clear();
        CHECK(!read_auth_key_file(good, me, key, &err));
        CHECK(err.find("chmod 600") != std::string::npos);
    }
    chmod(good.c_str(), 0600);

    err.clear();
    CHECK(!read_auth_key_file(good, me + 1, key, &err));  // owned by someone else
    CHECK(err.find("not by this router's user") != std::string::npos);

    const std::string link = dir + "/link";
    CHECK_EQ(symlink(good.c_str(), link.c_str()), 0);
    err.clear();
    CHECK(!read_auth_key_file(link, me, key, &err));
    CHECK(err.find("symbolic link") != std::string::npos);

    const std::string shortkey = dir + "/short";
    write_file(shortkey, kKeyHex.substr(0, 62) + "\n", 0600);
    err.clear();
    CHECK(!read_auth_key_file(shortkey, me, key, &err));
    CHECK(err.find("64 hexadecimal") != std::string::npos);
    CHECK(err.find(kKeyHex.substr(0, 16)) == std::string::npos);  // never quotes the contents

    const std::string longkey = dir + "/long";
    write_file(longkey, kKeyHex + kKeyHex, 0600);
    err.clear();
    CHECK(!read_auth_key_file(longkey, me, key, &err));

    const std::string fifo = dir + "/fifo";
    CHECK_EQ(mkfifo(fifo.c_str(), 0600), 0);
    err.clear();
    CHECK(!read_auth_key_file(fifo, me, key, &err));  // refused, not waited on
    CHECK(err.find("not a regular file") != std::string::npos);

    err.clear();
    CHECK(!read_auth_key_file(dir, me, key, &err));
    CHECK(!read_auth_key_file(dir + "/missing", me, key, &err));

    for (const char* name : {"/key", "/link", "/short", "/long", "/fifo"})
        unlink((dir + name).c_str());
    rmdir(dir.c_str());
}

TEST(peer_credential_rule) {
    PeerCred c;
    CHECK(!peer_allowed(c, 0, {}, {}));  // unknown credentials are never allowed
    c.known = true;
    c.uid = 1000;
    c.gid = 1000;
    CHECK(peer_allowed(c, 1000, {}, {}));
    CHECK(!peer_allowed(c, 0, {}, {}));
    CHECK(peer_allowed(c, 0, {5, 1000}, {}));
    CHECK(peer_allowed(c, 0, {}, {1000}));
    CHECK(!peer_allowed(c, 0, {1001}, {1001}));
    c.uid = 0;  // root is not special: it must be the router's euid or listed
    CHECK(!peer_allowed(c, 1000, {}, {}));
}

TEST(loopback_is_decided_on_the_resolved_address) {
    auto v4 = [](const char* text) {
        sockaddr_in sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        inet_pton(AF_INET, text, &sa.sin_addr);
        return is_loopback_address(reinterpret_cast<sockaddr*>(&sa));
    };
    auto v6 = [](const char* text) {
        sockaddr_in6 sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sin6_family = AF_INET6;
        inet_pton(AF_INET6, text, &sa.sin6_addr);
        return is_loopback_address(reinterpret_cast<sockaddr*>(&sa));
    };
    CHECK(v4("127.0.0.1"));
    CHECK(v4("127.1.2.3"));
    CHECK(v4("127.255.255.255"));
    CHECK(!v4("0.0.0.0"));
    CHECK(!v4("128.0.0.1"));
    CHECK(!v4("10.0.0.1"));
    CHECK(!v4("126.255.255.255"));
    CHECK(v6("::1"));
    CHECK(v6("::ffff:127.0.0.1"));
    CHECK(!v6("::"));
    CHECK(!v6("::2"));
    CHECK(!v6("::ffff:10.0.0.1"));
    CHECK(!v6("fe80::1"));
    sockaddr_in sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    inet_pton(AF_INET, "10.1.2.3", &sa.sin_addr);
    CHECK_EQ(address_text(reinterpret_cast<sockaddr*>(&sa)), std::string("10.1.2.3"));
}

TEST(random_bytes_are_not_all_zero) {
    uint8_t a[32] = {0}, b[32] = {0};
    CHECK(random_bytes(a, sizeof a));
    CHECK(random_bytes(b, sizeof b));
    CHECK(std::memcmp(a, b, sizeof a) != 0);
}

TEST_MAIN()
