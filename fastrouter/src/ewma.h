// An exponentially weighted moving average of microsecond durations for the status page:
// each new sample weighs 1/8, the first is taken as is. Integer fixed point, no allocation.
#pragma once

#include <cstdint>

namespace fr {

class Ewma {
public:
    static constexpr int kWeightShift = 3;  // weight 1/8 per sample
    static constexpr int kFracBits = 8;     // keeps the 1/8 steps from truncating to nothing

    void record(int64_t us) {
        int64_t v = (us < 0 ? 0 : us) * (int64_t{1} << kFracBits);
        if (!seeded_) {
            scaled_ = v;
            seeded_ = true;
        } else {
            scaled_ += (v - scaled_) / (int64_t{1} << kWeightShift);
        }
    }

    // Rounded to whole microseconds; 0 before the first sample.
    uint64_t value_us() const {
        return static_cast<uint64_t>((scaled_ + (int64_t{1} << (kFracBits - 1))) >> kFracBits);
    }

private:
    int64_t scaled_ = 0;  // microseconds << kFracBits
    bool seeded_ = false;
};

}  // namespace fr
