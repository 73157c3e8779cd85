// Handshake proofs, key file, peer-credential rule and random bytes; see auth.h.
#include "auth.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "sha256.h"

namespace fr {

namespace {

// The labels include their terminating NUL: "PR-AUTH1 router\0" is 16 bytes.
constexpr char kRouterLabel[] = "PR-AUTH1 router";
constexpr char kPeerLabel[] = "PR-AUTH1 peer";

void proof(const char* label, size_t label_len, const uint8_t key[kAuthKeySize], uint8_t role,
           const uint8_t np[kNonceSize], const uint8_t nr[kNonceSize], uint8_t out[kProofSize]) {
    HmacSha256 m(key, kAuthKeySize);
    m.update(label, label_len);
    m.update(&role, 1);
    m.update(np, kNonceSize);
    m.update(nr, kNonceSize);
    m.finish(out);
}

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

}  // namespace

void auth_router_proof(const uint8_t key[kAuthKeySize], uint8_t role,
                       const uint8_t np[kNonceSize], const uint8_t nr[kNonceSize],
                       uint8_t out[kProofSize]) {
    proof(kRouterLabel, sizeof kRouterLabel, key, role, np, nr, out);
}

void auth_peer_proof(const uint8_t key[kAuthKeySize], uint8_t role, const uint8_t np[kNonceSize],
                     const uint8_t nr[kNonceSize], uint8_t out[kProofSize]) {
    proof(kPeerLabel, sizeof kPeerLabel, key, role, np, nr, out);
}

bool parse_auth_key(const std::string& text, uint8_t out[kAuthKeySize], std::string* err) {
    size_t n = text.size();
    if (n == 2 * kAuthKeySize + 1 && text.back() == '\n') n--;
    if (n != 2 * kAuthKeySize) {
        *err = "must hold exactly 64 hexadecimal characters (a 32-byte key), optionally followed "
               "by one newline; it holds " + std::to_string(text.size()) + " bytes";
        return false;
    }
    for (size_t i = 0; i < kAuthKeySize; i++) {
        int hi = hex_value(text[2 * i]), lo = hex_value(text[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            secure_zero(out, kAuthKeySize);
            *err = "must hold exactly 64 hexadecimal characters (a 32-byte key); found a "
                   "character that is not 0-9, a-f or A-F";
            return false;
        }
        out[i] = static_cast<uint8_t>(hi << 4 | lo);
    }
    return true;
}

bool read_auth_key_file(const std::string& path, uid_t euid, uint8_t out[kAuthKeySize],
                        std::string* err) {
    // O_NOFOLLOW: a symbolic link is refused, not followed. O_NONBLOCK: a FIFO put in the key's
    // place must not hang start-up; fstat() then refuses it.
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ELOOP)
            *err = path + " is a symbolic link; pass the key file itself";
        else
            *err = "cannot open " + path + ": " + strerror(errno);
        return false;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *err = "cannot stat " + path + ": " + strerror(errno);
        ::close(fd);
        return false;
    }
    if (!S_ISREG(st.st_mode)) {
        *err = path + " is not a regular file";
        ::close(fd);
        return false;
    }
    if (st.st_uid != euid) {
        *err = path + " is owned by uid " + std::to_string(st.st_uid) +
               ", not by this router's user (uid " + std::to_string(euid) + ")";
        ::close(fd);
        return false;
    }
    if (st.st_mode & 07177) {
        char mode[8];
        snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
        *err = path + " has mode " + mode +
               "; it must be readable by its owner only (mode 0600 or stricter: chmod 600 " +
               path + ")";
        ::close(fd);
        return false;
    }
    // One byte more than the longest valid file, so an overlong one is seen as such.
    char buf[2 * kAuthKeySize + 2];
    size_t got = 0;
    while (got < sizeof buf) {
        ssize_t n = ::read(fd, buf + got, sizeof buf - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            *err = "cannot read " + path + ": " + strerror(errno);
            ::close(fd);
            secure_zero(buf, sizeof buf);
            return false;
        }
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    ::close(fd);
    std::string text(buf, got);
    secure_zero(buf, sizeof buf);
    std::string why;
    bool ok = parse_auth_key(text, out, &why);
    secure_zero(&text[0], text.size());
    if (!ok) *err = path + " " + why;
    return ok;
}

bool peer_allowed(const PeerCred& cred, uint32_t euid, const std::vector<uint32_t>& allow_uids,
                  const std::vector<uint32_t>& allow_gids) {
    if (!cred.known) return false;
    if (cred.uid == euid) return true;
    if (std::find(allow_uids.begin(), allow_uids.end(), cred.uid) != allow_uids.end()) return true;
    return std::find(allow_gids.begin(), allow_gids.end(), cred.gid) != allow_gids.end();
}

bool random_bytes(uint8_t* out, size_t n) {
    while (n > 0) {
        ssize_t got = getrandom(out, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        out += got;
        n -= static_cast<size_t>(got);
    }
    return true;
}

}  // namespace fr
