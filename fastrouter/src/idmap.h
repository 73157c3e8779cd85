// A flat u64 -> u64 hash map (linear probing, backward-shift delete) that allocates only when
// it grows, so the per-job bookkeeping of a master does not allocate on the hot path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fr {

// Value 0 marks an empty slot, so 0 cannot be stored as a value (router job ids never are 0).
class IdMap {
public:
    size_t size() const { return size_; }

    uint64_t get(uint64_t key) const {
        if (size_ == 0) return 0;
        for (size_t i = slot(key);; i = (i + 1) & mask_) {
            if (slots_[i].value == 0) return 0;
            if (slots_[i].key == key) return slots_[i].value;
        }
    }

    // Returns false (and changes nothing) when the key is present.
    bool insert(uint64_t key, uint64_t value) {
        if ((size_ + 1) * 10 > slots_.size() * 7) grow();
        for (size_t i = slot(key);; i = (i + 1) & mask_) {
            if (slots_[i].value == 0) {
                slots_[i] = {key, value};
                size_++;
                return true;
            }
            if (slots_[i].key == key) return false;
        }
    }

    bool erase(uint64_t key) {
        if (size_ == 0) return false;
        size_t i = slot(key);
        for (;; i = (i + 1) & mask_) {
            if (slots_[i].value == 0) return false;
            if (slots_[i].key == key) break;
        }
        // Shift later members of the probe run back so lookups never need tombstones.
        size_t j = i;
        for (;;) {
            slots_[i].value = 0;
            for (;;) {
                j = (j + 1) & mask_;
                if (slots_[j].value == 0) {
                    size_--;
                    return true;
                }
                size_t home = slot(slots_[j].key);
                bool movable = (i <= j) ? (home <= i || home > j) : (home <= i && home > j);
                if (movable) break;
            }
            slots_[i] = slots_[j];
            i = j;
        }
    }

    template <typename F>
    void for_each(F&& fn) const {
        for (const Slot& s : slots_)
            if (s.value != 0) fn(s.key, s.value);
    }

    void clear() {
        std::vector<Slot>().swap(slots_);
        size_ = 0;
        mask_ = 0;
    }

private:
    struct Slot {
        uint64_t key;
        uint64_t value;
    };

    static uint64_t mix(uint64_t x) {
        x ^= x >> 30;
        x *= 0xbf58476d1ce4e5b9ULL;
        x ^= x >> 27;
        x *= 0x94d049bb133111ebULL;
        return x ^ (x >> 31);
    }
    size_t slot(uint64_t key) const { return static_cast<size_t>(mix(key)) & mask_; }

    void grow() {
        std::vector<Slot> old;
        old.swap(slots_);
        size_t cap = old.empty() ? 16 : old.size() * 2;
        slots_.assign(cap, Slot{0, 0});
        mask_ = cap - 1;
        size_ = 0;
        for (const Slot& s : old)
            if (s.value != 0) insert(s.key, s.value);
    }

    std::vector<Slot> slots_;
    size_t size_ = 0;
    size_t mask_ = 0;
};

}  // namespace fr
