// log_peer: a burst of lines at once, then a few a second, and a count of those left out.
#include "log.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "check.h"

namespace {

double g_clock = 1000.0;
double fake_now() { return g_clock; }

// Runs fn with stderr sent to a temporary file and returns what it wrote.
template <typename Fn>
std::string captured_stderr(Fn fn) {
    fflush(stderr);
    char path[] = "/tmp/fastrouter-test-log-XXXXXX";
    int fd = mkstemp(path);
    int saved = dup(2);
    dup2(fd, 2);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    std::string out;
    if (FILE* f = fopen(path, "r")) {
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
        fclose(f);
    }
    close(fd);
    unlink(path);
    return out;
}

size_t count(const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) n++;
    return n;
}

}  // namespace

TEST(a_flood_prints_a_burst_then_says_how_many_were_left_out) {
    fr::log_set_clock(fake_now);
    std::string out = captured_stderr([] {
        for (int i = 0; i < 1000; i++) fr::log_peer("protocol error from connection %d", i);
    });
    CHECK_EQ(count(out, "protocol error"), static_cast<size_t>(fr::kPeerLogBurst));
    CHECK_EQ(count(out, "left out"), 0u);
    // A second later there is room for kPeerLogPerSecond lines; the first says what was dropped.
    g_clock += 1.0;
    out = captured_stderr([] {
        for (int i = 0; i < 100; i++) fr::log_peer("protocol error again %d", i);
    });
    CHECK_EQ(count(out, "protocol error again"), static_cast<size_t>(fr::kPeerLogPerSecond));
    CHECK(out.find("(980 more messages about peers were left out") != std::string::npos);
    fr::log_set_clock(nullptr);
}

TEST(a_quiet_stretch_refills_the_burst_but_no_more) {
    fr::log_set_clock(fake_now);
    captured_stderr([] {
        for (int i = 0; i < 30; i++) fr::log_peer("x %d", i);
    });
    g_clock += 3600;
    std::string out = captured_stderr([] {
        for (int i = 0; i < 100; i++) fr::log_peer("later %d", i);
    });
    CHECK_EQ(count(out, "later"), static_cast<size_t>(fr::kPeerLogBurst));
    CHECK(out.find("(10 more messages") != std::string::npos);
    fr::log_set_clock(nullptr);
}

TEST(quiet_mode_prints_nothing) {
    fr::log_set_clock(fake_now);
    fr::log_set_quiet(true);
    std::string out = captured_stderr([] { fr::log_peer("hidden"); });
    fr::log_set_quiet(false);
    CHECK_EQ(out.size(), 0u);
    fr::log_set_clock(nullptr);
}

TEST_MAIN()
