// The pieces of PROTOCOL.md "Handshake" that are not routing: the two proofs, the key file's
// text, the peer-credential rule and the kernel's random bytes. No sockets, no state.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fr {

constexpr size_t kAuthKeySize = 32;
constexpr size_t kNonceSize = 32;
constexpr size_t kProofSize = 32;
// HELLO: role byte, then the peer's nonce. CHALLENGE: the router's nonce, then its proof.
constexpr size_t kHelloAuthPayload = 1 + kNonceSize;
constexpr size_t kChallengePayload = kNonceSize + kProofSize;
// Until the handshake is complete no frame may announce a longer payload.
constexpr uint32_t kMaxPreAuthPayload = 64;

// HMAC(K, "PR-AUTH1 router\0" || role || Np || Nr): what the router sends in CHALLENGE.
void auth_router_proof(const uint8_t key[kAuthKeySize], uint8_t role,
                       const uint8_t np[kNonceSize], const uint8_t nr[kNonceSize],
                       uint8_t out[kProofSize]);
// HMAC(K, "PR-AUTH1 peer\0" || role || Np || Nr): what the peer sends in AUTH.
void auth_peer_proof(const uint8_t key[kAuthKeySize], uint8_t role, const uint8_t np[kNonceSize],
                     const uint8_t nr[kNonceSize], uint8_t out[kProofSize]);

// The key file's contents: exactly 64 hexadecimal characters, optionally one trailing "\n".
// On failure returns false with a message (that never quotes the contents) in *err.
bool parse_auth_key(const std::string& text, uint8_t out[kAuthKeySize], std::string* err);

// Reads and checks --auth-key-file PATH: a regular file, not a symbolic link (O_NOFOLLOW),
// owned by `euid`, mode 0600 or stricter, holding a key parse_auth_key() accepts.
bool read_auth_key_file(const std::string& path, uid_t euid, uint8_t out[kAuthKeySize],
                        std::string* err);

struct PeerCred {
    bool known = false;  // SO_PEERCRED answered
    uint32_t uid = 0;
    uint32_t gid = 0;
};

// The rule of PROTOCOL.md "Peer credentials": the router's own euid, or a listed uid or gid.
bool peer_allowed(const PeerCred& cred, uint32_t euid, const std::vector<uint32_t>& allow_uids,
                  const std::vector<uint32_t>& allow_gids);

// n bytes from getrandom(2); false if the kernel cannot provide them.
bool random_bytes(uint8_t* out, size_t n);

}  // namespace fr
