// The socket side: listener setup with its safety checks, and the epoll event loop.
#pragma once

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
};

// Runs until SIGTERM/SIGINT (or the parent dies); returns the process exit code.
int run_server(const ServerOptions& opts);

}  // namespace fr
