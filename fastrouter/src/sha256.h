// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), self-contained, for the handshake of
// PROTOCOL.md "Handshake". Small and portable rather than fast: the router computes two HMACs
// per connection, never per frame.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fr {

constexpr size_t kSha256Size = 32;
constexpr size_t kSha256Block = 64;

class Sha256 {
public:
    Sha256() { reset(); }
    void reset();
    void update(const void* data, size_t n);
    // Writes the digest and leaves the object to be reset() before reuse.
    void finish(uint8_t out[kSha256Size]);

private:
    void block(const uint8_t* p);

    uint32_t h_[8];
    uint8_t buf_[kSha256Block];
    size_t used_ = 0;
    uint64_t total_ = 0;  // bytes hashed so far
};

void sha256(const void* data, size_t n, uint8_t out[kSha256Size]);

// HMAC-SHA256, fed in pieces: HmacSha256 m(key, klen); m.update(...); m.finish(out).
class HmacSha256 {
public:
    HmacSha256(const uint8_t* key, size_t klen);
    void update(const void* data, size_t n) { inner_.update(data, n); }
    void finish(uint8_t out[kSha256Size]);

private:
    Sha256 inner_;
    uint8_t okey_[kSha256Block];
};

void hmac_sha256(const uint8_t* key, size_t klen, const void* data, size_t n,
                 uint8_t out[kSha256Size]);

// True when the n bytes at a and b are equal, in a time that depends only on n.
bool constant_time_equal(const uint8_t* a, const uint8_t* b, size_t n);

// Overwrites n bytes in a way the compiler may not drop (for keys leaving scope).
void secure_zero(void* p, size_t n);

}  // namespace fr
