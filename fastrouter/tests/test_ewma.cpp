// Ewma: the first sample, the 1/8 weight, convergence and rounding.
#include "ewma.h"

#include "check.h"

using fr::Ewma;

TEST(zero_before_the_first_sample_then_the_sample_itself) {
    Ewma e;
    CHECK_EQ(e.value_us(), 0u);
    e.record(1000);
    CHECK_EQ(e.value_us(), 1000u);
}

TEST(each_sample_weighs_one_eighth) {
    Ewma e;
    e.record(800);
    e.record(1600);  // 800 + (1600 - 800) / 8
    CHECK_EQ(e.value_us(), 900u);
    e.record(100);  // 900 - 800 / 8
    CHECK_EQ(e.value_us(), 800u);
}

TEST(converges_to_a_steady_value_without_drift) {
    Ewma e;
    e.record(50000);
    for (int i = 0; i < 200; i++) e.record(37);
    CHECK_EQ(e.value_us(), 37u);
    for (int i = 0; i < 200; i++) e.record(1);
    CHECK_EQ(e.value_us(), 1u);
}

TEST(small_steps_are_not_lost_to_truncation) {
    Ewma e;
    e.record(0);
    for (int i = 0; i < 4; i++) e.record(4);  // 4 * (1 - (7/8)^4) = 1.65
    CHECK_EQ(e.value_us(), 2u);
}

TEST(negative_durations_count_as_zero) {
    Ewma e;
    e.record(-5);
    CHECK_EQ(e.value_us(), 0u);
}

TEST_MAIN()
