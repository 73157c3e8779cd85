// stderr logging with the "fastrouter:" prefix that launchers grep for.
#pragma once

namespace fr {

void log_set_quiet(bool quiet);
// Informational and per-peer messages; silenced by --quiet.
void log_info(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Fatal or operator-facing errors; always printed.
void log_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// What one peer did wrong (a protocol error, a failed handshake, a slow reader): like
// log_info, but at most kPeerLogBurst lines at once and kPeerLogPerSecond a second after that,
// so a flood of bad connections cannot fill the operator's log (or slow the loop writing it).
// The next line printed says how many were left out.
void log_peer(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
constexpr double kPeerLogBurst = 20;
constexpr double kPeerLogPerSecond = 5;
// For tests: the clock log_peer reads (seconds, monotonic); nullptr restores the real one.
void log_set_clock(double (*now)());

}  // namespace fr
