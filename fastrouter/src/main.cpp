// Command line of the fastrouter binary: parse and validate options, then hand off to net.cpp.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <sys/stat.h>
#include <unistd.h>

#include "auth.h"
#include "log.h"
#include "net.h"

#ifndef FASTROUTER_VERSION
#define FASTROUTER_VERSION "0.0.0"
#endif

namespace {

const char kUsage[] =
    "usage: fastrouter --listen ADDRESS [options]\n"
    "\n"
    "Routes jobs from masters to idle workers (parallel_render's queue server).\n"
    "\n"
    "  --listen ADDRESS          unix:///abs/path/router.sock or tcp://HOST:PORT (PORT 0 picks one;\n"
    "                            tcp://:PORT is 127.0.0.1)\n"
    "  --auth-key-file PATH      every peer proves it holds this key (challenge-response, PROTOCOL.md\n"
    "                            Handshake): 64 hex characters in a regular file owned by the\n"
    "                            router's user, mode 0600 or stricter\n"
    "  --no-auth                 no key: the one-byte HELLO is the whole handshake (benchmarks and\n"
    "                            tests; refused with tcp). One of the two is required\n"
    "  --allow-uid UID           also accept Unix-socket peers of this uid (repeatable; the\n"
    "                            router's own euid is always accepted)\n"
    "  --allow-gid GID           also accept Unix-socket peers of this gid (repeatable)\n"
    "  --handshake-ms N          time a new connection has to authenticate (default 2000)\n"
    "  --max-pending N           connections authenticating at once; the oldest is closed to make\n"
    "                            room (default 128)\n"
    "  --frame-ms N              time a frame that has started arriving has to complete (default\n"
    "                            10000); idle connections are never closed\n"
    "  --max-masters N           authenticated master connections (default 4096)\n"
    "  --max-workers N           authenticated worker connections (default 4096)\n"
    "  --max-queue N             queued jobs before SUBMIT is answered BUSY (default 10000)\n"
    "  --max-queue-bytes N       queued payload bytes before BUSY (default 268435456)\n"
    "  --max-frame N             largest accepted payload in bytes (default 16777216)\n"
    "  --max-output N            unread output per peer before it is disconnected (default 67108864)\n"
    "  --default-timeout-ms N    deadline for SUBMITs with timeout 0 (default 30000)\n"
    "  --parent-pid PID          exit when process PID (our parent) exits\n"
    "  --cpu N                   pin the router to CPU N\n"
    "  --drain-ms N              after SIGTERM, time jobs already with a worker get (default 5000)\n"
    "  --status-file PATH        publish the load for masters in this file (absolute path; default\n"
    "                            SOCKET.status next to a unix socket, none for tcp)\n"
    "  --no-status-file          publish no status file\n"
    "  --quiet                   log only fatal errors\n"
    "  --help                    show this help\n"
    "  --version                 print the version\n"
    "\n"
    "Prints 'READY ADDRESS' on stdout once listening. SIGTERM/SIGINT drain: stop accepting,\n"
    "answer queued jobs with ERROR SHUTDOWN, let jobs in flight finish for up to --drain-ms (a\n"
    "second signal ends the wait), then exit 0. Exit code 2 means a bad option, an unsafe socket\n"
    "or status file directory or key file, or a CPU that cannot be used.\n";

[[noreturn]] void usage_error(const std::string& msg) {
    fprintf(stderr, "fastrouter: %s\n(run fastrouter --help for usage)\n", msg.c_str());
    exit(2);
}

uint64_t parse_number(const std::string& opt, const std::string& value, uint64_t min,
                      uint64_t max) {
    if (value.empty() || value[0] < '0' || value[0] > '9')
        usage_error(opt + ": expected a number, got '" + value + "'");
    char* end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    if (*end != '\0' || errno == ERANGE)
        usage_error(opt + ": expected a number, got '" + value + "'");
    if (v < min || v > max)
        usage_error(opt + ": " + value + " is out of range (" + std::to_string(min) + ".." +
                    std::to_string(max) + ")");
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    fr::ServerOptions opts;
    bool have_listen = false;
    bool no_status_file = false;
    bool no_auth = false;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        std::string value;
        bool has_inline = false;
        size_t eq = arg.find('=');
        if (arg.compare(0, 2, "--") == 0 && eq != std::string::npos) {
            value = arg.substr(eq + 1);
            arg = arg.substr(0, eq);
            has_inline = true;
        }
        auto need_value = [&]() -> std::string {
            if (has_inline) return value;
            if (i + 1 >= argc) usage_error(arg + ": missing value");
            return argv[++i];
        };
        auto no_value = [&]() {
            if (has_inline) usage_error(arg + ": takes no value");
        };
        if (arg == "--help" || arg == "-h") {
            no_value();
            fputs(kUsage, stdout);
            return 0;
        } else if (arg == "--version") {
            no_value();
            printf("fastrouter %s (protocol 1)\n", FASTROUTER_VERSION);
            return 0;
        } else if (arg == "--quiet") {
            no_value();
            fr::log_set_quiet(true);
        } else if (arg == "--listen") {
            std::string err;
            std::string v = need_value();
            if (!fr::parse_listen_address(v, &opts.listen, &err)) usage_error("--listen: " + err);
            have_listen = true;
        } else if (arg == "--max-queue") {
            opts.router.max_queue = parse_number(arg, need_value(), 1, 100000000);
        } else if (arg == "--max-queue-bytes") {
            opts.router.max_queue_bytes = parse_number(arg, need_value(), 1, UINT64_MAX >> 1);
        } else if (arg == "--max-frame") {
            opts.router.max_frame =
                static_cast<uint32_t>(parse_number(arg, need_value(), 1, UINT32_MAX));
        } else if (arg == "--max-output") {
            opts.router.max_output = parse_number(arg, need_value(), 1, UINT64_MAX >> 1);
        } else if (arg == "--default-timeout-ms") {
            opts.router.default_timeout_ms =
                static_cast<uint32_t>(parse_number(arg, need_value(), 1, UINT32_MAX));
        } else if (arg == "--parent-pid") {
            opts.parent_pid = static_cast<pid_t>(parse_number(arg, need_value(), 1, INT32_MAX));
        } else if (arg == "--cpu") {
            opts.cpu = static_cast<int>(parse_number(arg, need_value(), 0, 4095));
        } else if (arg == "--drain-ms") {
            opts.drain_ms = static_cast<int64_t>(parse_number(arg, need_value(), 0, 3600000));
        } else if (arg == "--status-file") {
            opts.status_file = need_value();
            if (opts.status_file.empty() || opts.status_file[0] != '/' ||
                opts.status_file.back() == '/')
                usage_error("--status-file: expected an absolute file path, got '" +
                            opts.status_file + "'");
        } else if (arg == "--no-status-file") {
            no_value();
            no_status_file = true;
        } else if (arg == "--auth-key-file") {
            opts.auth_key_file = need_value();
            if (opts.auth_key_file.empty()) usage_error("--auth-key-file: expected a file path");
        } else if (arg == "--no-auth") {
            no_value();
            no_auth = true;
        } else if (arg == "--allow-uid") {
            opts.router.allow_uids.push_back(
                static_cast<uint32_t>(parse_number(arg, need_value(), 0, UINT32_MAX - 1)));
        } else if (arg == "--allow-gid") {
            opts.router.allow_gids.push_back(
                static_cast<uint32_t>(parse_number(arg, need_value(), 0, UINT32_MAX - 1)));
        } else if (arg == "--handshake-ms") {
            opts.router.handshake_ms =
                static_cast<uint32_t>(parse_number(arg, need_value(), 1, 3600000));
        } else if (arg == "--frame-ms") {
            opts.router.frame_ms = static_cast<uint32_t>(parse_number(arg, need_value(), 1, 86400000));
        } else if (arg == "--max-pending") {
            opts.router.max_pending = parse_number(arg, need_value(), 1, 1000000);
        } else if (arg == "--max-masters") {
            opts.router.max_masters = parse_number(arg, need_value(), 1, 10000000);
        } else if (arg == "--max-workers") {
            opts.router.max_workers = parse_number(arg, need_value(), 1, 10000000);
        } else if (arg == "--auth-token-file") {
            usage_error("--auth-token-file was replaced by --auth-key-file: peers now prove they "
                        "hold a 32-byte key (64 hex characters) in a challenge-response; see "
                        "PROTOCOL.md \"Handshake\"");
        } else {
            usage_error("unknown option '" + std::string(argv[i]) + "'");
        }
    }
    if (!have_listen) usage_error("--listen is required (unix:///abs/path or tcp://host:port)");
    if (no_auth && !opts.auth_key_file.empty())
        usage_error("--auth-key-file and --no-auth contradict each other; pass one");
    if (!no_auth && opts.auth_key_file.empty())
        usage_error("pass --auth-key-file PATH (peers must prove they hold the key in it) or "
                    "--no-auth (no authentication: for benchmarks and tests)");
    if (no_auth && !opts.listen.is_unix)
        usage_error("--no-auth is refused with a tcp listener: every TCP peer must authenticate; "
                    "pass --auth-key-file");
    opts.router.euid = static_cast<uint32_t>(geteuid());
    if (!opts.auth_key_file.empty()) {
        std::string err;
        if (!fr::read_auth_key_file(opts.auth_key_file, geteuid(), opts.router.key, &err))
            usage_error("--auth-key-file: " + err);
        opts.router.has_key = true;
    }
    uint8_t probe[fr::kNonceSize];
    if (!fr::random_bytes(probe, sizeof probe)) {
        fprintf(stderr, "fastrouter: the kernel's random source (getrandom) fails: %s\n",
                strerror(errno));
        return 1;
    }
    if (no_status_file && !opts.status_file.empty())
        usage_error("--status-file and --no-status-file contradict each other; pass one");
    if (no_status_file)
        opts.status_file.clear();
    else if (opts.status_file.empty() && opts.listen.is_unix)
        opts.status_file = opts.listen.path + ".status";
    if (opts.router.max_output < static_cast<uint64_t>(opts.router.max_frame) + fr::kHeaderSize)
        usage_error("--max-output (" + std::to_string(opts.router.max_output) +
                    ") must be at least --max-frame + 24 (" +
                    std::to_string(static_cast<uint64_t>(opts.router.max_frame) + fr::kHeaderSize) +
                    "), or a peer could never receive a maximal frame");
    return fr::run_server(opts);
}
