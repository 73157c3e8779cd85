// The socket side: listener setup with its safety checks, and the epoll event loop.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <string>

#include "router.h"

namespace fr {

struct ListenAddress {
    bool is_unix = true;
    std::string path;  // unix
    std::string host;  // tcp, without brackets
    uint16_t port = 0;
};

// Parses unix:///abs/path or tcp://host:port ([v6]:port allowed). On failure returns false
// with a message in *err.
bool parse_listen_address(const std::string& s, ListenAddress* out, std::string* err);

struct ServerOptions {
    ListenAddress listen;
    RouterConfig router;
    pid_t parent_pid = 0;  // 0 = none
    int cpu = -1;          // pin the router to this CPU; -1 = leave it to the scheduler
    int64_t drain_ms = 5000;  // after SIGTERM, how long jobs already with a worker may take
    std::string auth_key_file;  // empty with --no-auth
    std::string status_file;  // the status page (PROTOCOL.md "Status page"); empty = none
};

// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104: addresses other machines cannot reach.
// Decided on a resolved address, never on a host name.
bool is_loopback_address(const sockaddr* sa);
// The numeric form of an address, e.g. "0.0.0.0" or "::1".
std::string address_text(const sockaddr* sa);

// Runs until SIGTERM/SIGINT (or the parent dies); returns the process exit code.
int run_server(const ServerOptions& opts);

}  // namespace fr
