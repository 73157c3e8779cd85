// Two-priority bounded FIFO with deadlines; see queue.h.
#include "queue.h"

#include <algorithm>
#include <functional>

namespace fr {

void DeadlineHeap::push(int64_t deadline, uint64_t key) {
    heap_.emplace_back(deadline, key);
    std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
}

bool DeadlineHeap::pop_due(int64_t now, uint64_t* key) {
    if (heap_.empty() || heap_.front().first > now) return false;
    std::pop_heap(heap_.begin(), heap_.end(), std::greater<>());
    *key = heap_.back().second;
    heap_.pop_back();
    return true;
}

bool JobQueue::resolve(Handle h, uint32_t* idx) const {
    uint32_t i = static_cast<uint32_t>(h);
    if (i >= slots_.size()) return false;
    const Slot& s = slots_[i];
    if (!s.live || s.gen != static_cast<uint32_t>(h >> 32)) return false;
    *idx = i;
    return true;
}

JobQueue::Handle JobQueue::push(Priority prio, const QueueEntry& e) {
    if (count_ + 1 > max_count_ || bytes_ + e.bytes > max_bytes_) return 0;
    uint32_t i;
    if (!free_.empty()) {
        i = free_.back();
        free_.pop_back();
    } else {
        i = static_cast<uint32_t>(slots_.size());
        slots_.emplace_back();
    }
    Slot& s = slots_[i];
    s.e = e;
    s.gen = s.gen + 1 == 0 ? 1 : s.gen + 1;  // gen 0 would allow handle 0
    s.prio = prio;
    s.live = true;
    s.next = kNil;
    s.prev = tail_[prio];
    if (tail_[prio] != kNil)
        slots_[tail_[prio]].next = i;
    else
        head_[prio] = i;
    tail_[prio] = i;
    count_++;
    bytes_ += e.bytes;
    Handle h = handle_of(i);
    if (e.deadline != kNoDeadline) deadlines_.push(e.deadline, h);
    return h;
}

void JobQueue::unlink(uint32_t i) {
    Slot& s = slots_[i];
    if (s.prev != kNil)
        slots_[s.prev].next = s.next;
    else
        head_[s.prio] = s.next;
    if (s.next != kNil)
        slots_[s.next].prev = s.prev;
    else
        tail_[s.prio] = s.prev;
    s.live = false;
    s.prev = s.next = kNil;
    count_--;
    bytes_ -= s.e.bytes;
    free_.push_back(i);
}

void JobQueue::maybe_compact() {
    if (deadlines_.size() > 2 * count_ + 64) {
        deadlines_.compact([this](uint64_t h, int64_t) {
            uint32_t i;
            return resolve(h, &i);
        });
    }
}

bool JobQueue::pop(QueueEntry* out) {
    for (int p = kHigh; p >= kNormal; p--) {
        uint32_t i = head_[p];
        if (i == kNil) continue;
        *out = slots_[i].e;
        unlink(i);
        maybe_compact();
        return true;
    }
    return false;
}

bool JobQueue::remove(Handle h, QueueEntry* out) {
    uint32_t i;
    if (!resolve(h, &i)) return false;
    if (out) *out = slots_[i].e;
    unlink(i);
    maybe_compact();
    return true;
}

int64_t JobQueue::next_deadline() {
    // Stale heap tops would make the event loop wake for nothing; skip them here.
    uint64_t h;
    for (;;) {
        int64_t d = deadlines_.top_deadline();
        if (d == kNoDeadline) return d;
        // Peek by popping and pushing back only when live.
        if (!deadlines_.pop_due(d, &h)) return d;
        uint32_t i;
        if (resolve(h, &i) && slots_[i].e.deadline == d) {
            deadlines_.push(d, h);
            return d;
        }
    }
}

}  // namespace fr
