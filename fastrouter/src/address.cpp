// Parsing of --listen addresses and the loopback test; kept apart from net.cpp so they are
// unit-tested without sockets.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "net.h"

namespace fr {

bool is_loopback_address(const sockaddr* sa) {
    if (sa->sa_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
        const uint8_t* b = in6->sin6_addr.s6_addr;
        static const uint8_t kLoop[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (std::memcmp(b, kLoop, 16) == 0) return true;
        return std::memcmp(b, kMapped, 12) == 0 && b[12] == 127;  // ::ffff:127.x.y.z
    }
    return false;
}

std::string address_text(const sockaddr* sa) {
    char buf[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr, buf, sizeof buf);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr, buf, sizeof buf);
    return buf;
}

bool parse_listen_address(const std::string& s, ListenAddress* out, std::string* err) {
    static const std::string kUnix = "unix://";
    static const std::string kTcp = "tcp://";
    if (s.compare(0, kUnix.size(), kUnix) == 0) {
        std::string path = s.substr(kUnix.size());
        if (path.empty() || path[0] != '/') {
            *err = "a unix address needs an absolute path, as in unix:///run/app/router.sock";
            return false;
        }
        if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
            *err = "unix socket path is too long (" + std::to_string(path.size()) +
                   " bytes; the limit is " + std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) +
                   ")";
            return false;
        }
        if (path.back() == '/') {
            *err = "unix socket path names a directory; add a file name";
            return false;
        }
        out->is_unix = true;
        out->path = path;
        return true;
    }
    if (s.compare(0, kTcp.size(), kTcp) == 0) {
        std::string rest = s.substr(kTcp.size());
        std::string host, port;
        if (!rest.empty() && rest[0] == '[') {
            size_t close = rest.find(']');
            if (close == std::string::npos || close + 1 >= rest.size() || rest[close + 1] != ':') {
                *err = "expected tcp://[v6-address]:port";
                return false;
            }
            host = rest.substr(1, close - 1);
            port = rest.substr(close + 2);
        } else {
            size_t colon = rest.rfind(':');
            if (colon == std::string::npos) {
                *err = "a tcp address needs a port, as in tcp://127.0.0.1:7070 (0 picks one)";
                return false;
            }
            host = rest.substr(0, colon);
            port = rest.substr(colon + 1);
        }
        if (host.empty()) host = "127.0.0.1";  // tcp://:PORT: loopback unless told otherwise
        char* end = nullptr;
        errno = 0;
        unsigned long p = std::strtoul(port.c_str(), &end, 10);
        if (port.empty() || *end != '\0' || errno != 0 || p > 65535) {
            *err = "bad tcp port '" + port + "' (expected 0-65535)";
            return false;
        }
        out->is_unix = false;
        out->host = host;
        out->port = static_cast<uint16_t>(p);
        return true;
    }
    *err = "expected unix:///absolute/path or tcp://host:port, got '" + s + "'";
    return false;
}

}  // namespace fr
