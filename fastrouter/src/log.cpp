// stderr logging; see log.h.
#include "log.h"

#include <time.h>

#include <cstdarg>
#include <cstdio>

namespace fr {

namespace {
bool g_quiet = false;

void vlog(const char* fmt, va_list ap) {
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    // One fprintf per line so concurrent writers to the same stderr do not interleave.
    fprintf(stderr, "fastrouter: %s\n", line);
}
double monotonic_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

double (*g_now)() = monotonic_seconds;
// A token bucket: a line costs one token; tokens come back at kPeerLogPerSecond.
double g_tokens = kPeerLogBurst;
double g_refilled_at = -1;
unsigned long long g_left_out = 0;
}  // namespace

void log_set_clock(double (*now)()) {
    g_now = now ? now : monotonic_seconds;
    g_tokens = kPeerLogBurst;
    g_refilled_at = -1;
    g_left_out = 0;
}

void log_peer(const char* fmt, ...) {
    if (g_quiet) return;
    double now = g_now();
    if (g_refilled_at >= 0) {
        g_tokens += (now - g_refilled_at) * kPeerLogPerSecond;
        if (g_tokens > kPeerLogBurst) g_tokens = kPeerLogBurst;
    }
    g_refilled_at = now;
    if (g_tokens < 1) {
        g_left_out++;
        return;
    }
    g_tokens -= 1;
    if (g_left_out) {
        fprintf(stderr, "fastrouter: (%llu more messages about peers were left out: at most %g a second)\n",
                g_left_out, kPeerLogPerSecond);
        g_left_out = 0;
    }
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void log_set_quiet(bool quiet) { g_quiet = quiet; }

void log_info(const char* fmt, ...) {
    if (g_quiet) return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void log_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

}  // namespace fr
