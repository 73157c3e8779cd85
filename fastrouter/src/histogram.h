// A fixed-size log-linear histogram of microsecond durations for the STATS percentiles:
// recording is a few integer operations and never allocates; a percentile is within 1/16
// (6%) of the true value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fr {

class Histogram {
public:
    static constexpr int kSubBits = 4;  // 16 linear sub-buckets per power of two
    static constexpr int kSub = 1 << kSubBits;
    static constexpr int kMaxExp = 40;  // up to 2^40 us, about 12 days
    static constexpr int kBuckets = kSub + (kMaxExp - kSubBits) * kSub;

    void record(int64_t us) {
        uint64_t v = us < 0 ? 0 : static_cast<uint64_t>(us);
        counts_[index(v)]++;
        total_++;
    }

    uint64_t count() const { return total_; }

    // The q-quantile (0 < q <= 1) by nearest rank, reported as its bucket's midpoint; 0 when
    // nothing was recorded.
    uint64_t percentile(double q) const {
        if (total_ == 0) return 0;
        uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(total_) + 0.999999);
        if (rank < 1) rank = 1;
        if (rank > total_) rank = total_;
        uint64_t seen = 0;
        for (int i = 0; i < kBuckets; i++) {
            seen += counts_[i];
            if (seen >= rank) return midpoint(i);
        }
        return midpoint(kBuckets - 1);
    }

    static int index(uint64_t v) {
        if (v < kSub) return static_cast<int>(v);
        int exp = 63 - __builtin_clzll(v);
        if (exp >= kMaxExp) return kBuckets - 1;
        int sub = static_cast<int>((v >> (exp - kSubBits)) & (kSub - 1));
        return kSub + (exp - kSubBits) * kSub + sub;
    }

    static uint64_t lower(int i) {
        if (i < kSub) return static_cast<uint64_t>(i);
        int exp = (i - kSub) / kSub + kSubBits;
        uint64_t sub = static_cast<uint64_t>((i - kSub) % kSub);
        return (uint64_t{1} << exp) + (sub << (exp - kSubBits));
    }

    static uint64_t midpoint(int i) {
        if (i < kSub) return static_cast<uint64_t>(i);
        int exp = (i - kSub) / kSub + kSubBits;
        return lower(i) + (uint64_t{1} << (exp - kSubBits)) / 2;
    }

private:
    uint64_t counts_[kBuckets] = {};
    uint64_t total_ = 0;
};

}  // namespace fr
