// Output piece ring for gather writes; see outbuf.h.
#include "outbuf.h"

#include <cstring>
#include <utility>

namespace fr {

namespace {
// A piece buffer bigger than this is freed after use rather than kept for reuse, so one
// large frame does not pin memory for the life of the connection.
constexpr size_t kKeepPiece = 256 << 10;
}  // namespace

OutBuf::Piece& OutBuf::push_piece() {
    if (count_ == ring_.size()) {
        // Grow the ring, unrolling it so head_ is 0 again.
        std::vector<Piece> bigger(ring_.empty() ? 4 : ring_.size() * 2);
        for (size_t i = 0; i < count_; i++)
            bigger[i] = std::move(ring_[(head_ + i) % ring_.size()]);
        ring_.swap(bigger);
        head_ = 0;
    }
    Piece& p = ring_[(head_ + count_) % ring_.size()];
    count_++;
    p.data.clear();
    p.off = 0;
    p.sealed = false;
    return p;
}

OutBuf::Piece& OutBuf::tail_for(size_t need) {
    if (count_ > 0) {
        Piece& t = ring_[(head_ + count_ - 1) % ring_.size()];
        if (!t.sealed && t.data.size() + need <= kCoalesceMax) return t;
    }
    return push_piece();
}

void OutBuf::append(const uint8_t* header, size_t hlen, const uint8_t* payload, size_t plen) {
    if (hlen + plen <= kCoalesceMax) {
        Piece& t = tail_for(hlen + plen);
        t.data.insert(t.data.end(), header, header + hlen);
        if (plen) t.data.insert(t.data.end(), payload, payload + plen);
    } else {
        Piece& t = tail_for(hlen);
        t.data.insert(t.data.end(), header, header + hlen);
        Piece& p = push_piece();
        p.data.assign(payload, payload + plen);
        p.sealed = true;
    }
    size_ += hlen + plen;
}

void OutBuf::append_owned(const uint8_t* header, size_t hlen, std::vector<uint8_t>& payload) {
    size_t plen = payload.size();
    if (hlen + plen <= kCoalesceMax) {
        append(header, hlen, payload.data(), plen);
        return;
    }
    Piece& t = tail_for(hlen);
    t.data.insert(t.data.end(), header, header + hlen);
    Piece& p = push_piece();
    p.data.swap(payload);
    p.sealed = true;
    size_ += hlen + plen;
}

int OutBuf::fill_iov(struct iovec* iov, int max) const {
    int n = 0;
    for (size_t i = 0; i < count_ && n < max; i++) {
        const Piece& p = ring_[(head_ + i) % ring_.size()];
        if (p.data.size() == p.off) continue;
        iov[n].iov_base = const_cast<uint8_t*>(p.data.data() + p.off);
        iov[n].iov_len = p.data.size() - p.off;
        n++;
    }
    return n;
}

void OutBuf::consume(size_t n) {
    size_ -= n;
    while (count_ > 0) {
        Piece& p = ring_[head_];
        size_t left = p.data.size() - p.off;
        if (n < left) {
            p.off += n;
            return;
        }
        n -= left;
        p.off = 0;
        if (p.data.capacity() > kKeepPiece)
            std::vector<uint8_t>().swap(p.data);
        else
            p.data.clear();
        p.sealed = false;
        head_ = (head_ + 1) % ring_.size();
        count_--;
    }
}

void OutBuf::clear() {
    std::vector<Piece>().swap(ring_);
    head_ = count_ = size_ = 0;
}

}  // namespace fr
