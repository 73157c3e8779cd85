// Histogram: bucket edges, error bound and percentiles.
#include "histogram.h"

#include "check.h"

using fr::Histogram;

TEST(empty_histogram_reports_zero) {
    Histogram h;
    CHECK_EQ(h.percentile(0.5), 0u);
    CHECK_EQ(h.count(), 0u);
}

TEST(small_values_are_exact) {
    Histogram h;
    for (int v = 0; v < 16; v++) h.record(v);
    CHECK_EQ(h.percentile(0.5), 7u);
    CHECK_EQ(h.percentile(1.0), 15u);
}

TEST(every_value_lands_in_a_bucket_within_one_sixteenth) {
    for (uint64_t v = 1; v < (uint64_t{1} << 36); v = v * 3 / 2 + 1) {
        int i = Histogram::index(v);
        CHECK(Histogram::lower(i) <= v);
        uint64_t mid = Histogram::midpoint(i);
        uint64_t err = mid > v ? mid - v : v - mid;
        CHECK(err * 16 <= v + 16);
    }
}

TEST(negative_durations_count_as_zero) {
    Histogram h;
    h.record(-5);
    CHECK_EQ(h.percentile(0.5), 0u);
}

TEST(percentiles_of_a_skewed_distribution) {
    Histogram h;
    for (int i = 0; i < 990; i++) h.record(20);
    for (int i = 0; i < 10; i++) h.record(5000);
    CHECK(h.percentile(0.5) >= 19 && h.percentile(0.5) <= 21);
    CHECK(h.percentile(0.99) >= 19 && h.percentile(0.99) <= 21);
    CHECK(h.percentile(0.999) >= 4800 && h.percentile(0.999) <= 5200);
    CHECK_EQ(h.count(), 1000u);
}

TEST(huge_values_saturate) {
    Histogram h;
    h.record(INT64_MAX);
    CHECK(h.percentile(1.0) >= (uint64_t{1} << 39));
}

TEST_MAIN()
