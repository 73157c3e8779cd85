// stderr logging with the "fastrouter:" prefix that launchers grep for.
#pragma once

namespace fr {

void log_set_quiet(bool quiet);
// Informational and per-peer messages; silenced by --quiet.
void log_info(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Fatal or operator-facing errors; always printed.
void log_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace fr
