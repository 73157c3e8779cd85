// A tiny test harness: TEST(name) blocks, CHECK/CHECK_EQ that keep going, a summary line.
#pragma once

#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace check {

struct Case {
    const char* name;
    std::function<void()> fn;
};

inline std::vector<Case>& cases() {
    static std::vector<Case> all;
    return all;
}
inline int& failures() {
    static int n = 0;
    return n;
}

struct Register {
    Register(const char* name, std::function<void()> fn) { cases().push_back({name, fn}); }
};

template <typename T>
std::string show(const T& v) {
    std::ostringstream os;
    os << v;
    return os.str();
}
inline std::string show(unsigned char v) { return std::to_string(v); }

inline int run_all() {
    int passed = 0, failed = 0;
    for (const Case& c : cases()) {
        int before = failures();
        c.fn();
        if (failures() == before) {
            passed++;
        } else {
            failed++;
            fprintf(stderr, "FAILED %s\n", c.name);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)
#define TEST(name)                                                              \
    static void name();                                                         \
    static check::Register CHECK_CAT(register_, name)(#name, name);             \
    static void name()

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            check::failures()++;                                                     \
        }                                                                            \
    } while (0)

#define CHECK_EQ(a, b)                                                                    \
    do {                                                                                  \
        auto check_a_ = (a);                                                              \
        auto check_b_ = (b);                                                              \
        if (!(check_a_ == check_b_)) {                                                    \
            fprintf(stderr, "%s:%d: CHECK_EQ(%s, %s) failed: %s != %s\n", __FILE__,       \
                    __LINE__, #a, #b, check::show(check_a_).c_str(),                      \
                    check::show(check_b_).c_str());                                       \
            check::failures()++;                                                          \
        }                                                                                 \
    } while (0)

#define TEST_MAIN() \
    int main() { return check::run_all(); }
