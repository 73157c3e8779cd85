// stderr logging; see log.h.
#include "log.h"

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
}  // namespace

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
