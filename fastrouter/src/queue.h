// The router's job queue: two FIFO priorities, bounded by count and bytes, with deadline
// expiry and removal by owner. Knows nothing about sockets or frames.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace fr {

constexpr int64_t kNoDeadline = std::numeric_limits<int64_t>::max();

// Min-heap of (deadline, key) with lazy deletion: callers validate popped keys themselves,
// because removing from the middle of a heap would cost a lookup structure per entry.
class DeadlineHeap {
public:
    void push(int64_t deadline, uint64_t key);
    int64_t top_deadline() const { return heap_.empty() ? kNoDeadline : heap_.front().first; }
    // Pops the earliest entry if its deadline is <= now.
    bool pop_due(int64_t now, uint64_t* key);
    size_t size() const { return heap_.size(); }
    // Drops entries for which `live(key, deadline)` is false; run when stale entries pile up.
    template <typename F>
    void compact(F&& live);

private:
    std::vector<std::pair<int64_t, uint64_t>> heap_;
};

struct QueueEntry {
    uint64_t job = 0;    // the router's job id
    uint64_t owner = 0;  // the submitting connection
    int64_t deadline = kNoDeadline;
    uint32_t bytes = 0;
};

class JobQueue {
public:
    enum Priority : uint8_t { kNormal = 0, kHigh = 1 };
    using Handle = uint64_t;  // 0 is never a valid handle

    JobQueue(size_t max_count, size_t max_bytes) : max_count_(max_count), max_bytes_(max_bytes) {}

    // Returns 0 when the entry does not fit the bounds (the caller answers BUSY).
    Handle push(Priority prio, const QueueEntry& e);
    // Highest priority first, FIFO within a priority.
    bool pop(QueueEntry* out);
    bool remove(Handle h, QueueEntry* out = nullptr);
    // Calls fn(entry) for each removed entry, in queue order.
    template <typename F>
    size_t remove_owner(uint64_t owner, F&& fn);
    // Removes every entry whose deadline is <= now, calling fn(entry), earliest first.
    template <typename F>
    size_t expire(int64_t now, F&& fn);

    int64_t next_deadline();
    size_t count() const { return count_; }
    size_t bytes() const { return bytes_; }
    bool empty() const { return count_ == 0; }
    size_t max_count() const { return max_count_; }
    size_t max_bytes() const { return max_bytes_; }

private:
    static constexpr uint32_t kNil = 0xffffffffu;
    struct Slot {
        QueueEntry e;
        uint32_t gen = 0;
        uint32_t prev = kNil;
        uint32_t next = kNil;
        uint8_t prio = 0;
        bool live = false;
    };

    Handle handle_of(uint32_t i) const { return (static_cast<uint64_t>(slots_[i].gen) << 32) | i; }
    bool resolve(Handle h, uint32_t* idx) const;
    void unlink(uint32_t i);
    void maybe_compact();

    std::vector<Slot> slots_;
    std::vector<uint32_t> free_;
    uint32_t head_[2] = {kNil, kNil};
    uint32_t tail_[2] = {kNil, kNil};
    DeadlineHeap deadlines_;
    size_t count_ = 0;
    size_t bytes_ = 0;
    size_t max_count_;
    size_t max_bytes_;
};

template <typename F>
void DeadlineHeap::compact(F&& live) {
    size_t out = 0;
    for (size_t i = 0; i < heap_.size(); i++)
        if (live(heap_[i].second, heap_[i].first)) heap_[out++] = heap_[i];
    heap_.resize(out);
    std::make_heap(heap_.begin(), heap_.end(), std::greater<>());
}

template <typename F>
size_t JobQueue::remove_owner(uint64_t owner, F&& fn) {
    size_t n = 0;
    for (int p = kHigh; p >= kNormal; p--) {
        uint32_t i = head_[p];
        while (i != kNil) {
            uint32_t next = slots_[i].next;
            if (slots_[i].e.owner == owner) {
                QueueEntry e = slots_[i].e;
                unlink(i);
                fn(e);
                n++;
            }
            i = next;
        }
    }
    maybe_compact();
    return n;
}

template <typename F>
size_t JobQueue::expire(int64_t now, F&& fn) {
    size_t n = 0;
    uint64_t h;
    while (deadlines_.pop_due(now, &h)) {
        uint32_t i;
        if (!resolve(h, &i)) continue;  // already removed
        QueueEntry e = slots_[i].e;
        unlink(i);
        fn(e);
        n++;
    }
    return n;
}

}  // namespace fr
