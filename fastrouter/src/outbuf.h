// A connection's pending output: frames queued as pieces and handed to writev as iovecs.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fr {

// Small frames are coalesced into one piece; a large payload gets a piece of its own, moved in
// when the caller owns it, so a big job body is never copied on its way to a worker. Piece
// buffers stay in their ring slot after being written, so steady traffic allocates nothing.
class OutBuf {
public:
    static constexpr size_t kCoalesceMax = 64 << 10;
    static constexpr int kMaxIov = 64;

    void append(const uint8_t* header, size_t hlen, const uint8_t* payload, size_t plen);
    // Takes the payload's storage instead of copying it when it is large.
    void append_owned(const uint8_t* header, size_t hlen, std::vector<uint8_t>& payload);

    // Fills up to `max` iovecs with the oldest unwritten bytes; returns how many.
    int fill_iov(struct iovec* iov, int max) const;
    // Marks n bytes (as written by writev over fill_iov's vectors) as sent.
    void consume(size_t n);

    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    void clear();

private:
    struct Piece {
        std::vector<uint8_t> data;
        size_t off = 0;
        bool sealed = false;  // holds one large payload; nothing may be appended after it
    };

    Piece& tail_for(size_t need);
    Piece& push_piece();

    std::vector<Piece> ring_;
    size_t head_ = 0;
    size_t count_ = 0;
    size_t size_ = 0;
};

}  // namespace fr
