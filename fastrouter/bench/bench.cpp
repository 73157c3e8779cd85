// fastrouter_bench: the native side of `manage.py parallel_bench router`. Echo workers, a
// round-trip prober, a closed-loop load generator and the direct socket ping-pong floor, each
// printing one JSON line so the Python bench can tabulate them.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "auth.h"
#include "frame.h"
#include "sha256.h"

namespace {

const char kUsage[] =
    "usage: fastrouter_bench MODE [options]\n"
    "  echo ADDRESS [--workers N]              N echo workers (threads) until the router closes\n"
    "  rtt ADDRESS [--count N] [--size B]      sequential SUBMIT->RESULT round trips\n"
    "  load ADDRESS [--masters M] [--size B] [--batch K] [--seconds S]\n"
    "                                          M closed-loop submitters, K jobs per write\n"
    "  pingpong [--count N] [--size B]         the same frame bounced over a socketpair\n"
    "Each mode but echo prints one JSON line. ADDRESS is unix:///path or tcp://host:port.\n"
    "  --key-file PATH     authenticate with the router's --auth-key-file (any mode but pingpong);\n"
    "                      without it, the one-byte HELLO of a router started with --no-auth\n";

[[noreturn]] void die(const char* what) {
    fprintf(stderr, "fastrouter_bench: %s: %s\n", what, strerror(errno));
    exit(1);
}

int64_t now_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int connect_to(const std::string& address) {
    int fd = -1;
    if (address.compare(0, 7, "unix://") == 0) {
        std::string path = address.substr(7);
        sockaddr_un sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        std::memcpy(sa.sun_path, path.c_str(), std::min(path.size() + 1, sizeof sa.sun_path));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0)
            die(("connect " + address).c_str());
        return fd;
    }
    if (address.compare(0, 6, "tcp://") == 0) {
        std::string rest = address.substr(6);
        size_t colon = rest.rfind(':');
        std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
        if (!host.empty() && host[0] == '[') host = host.substr(1, host.size() - 2);
        addrinfo hints;
        std::memset(&hints, 0, sizeof hints);
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* res = nullptr;
        if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) die("getaddrinfo");
        fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) != 0) die(("connect " + address).c_str());
        freeaddrinfo(res);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        return fd;
    }
    fprintf(stderr, "fastrouter_bench: bad address %s\n", address.c_str());
    exit(2);
}

bool write_all(int fd, const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= static_cast<size_t>(w);
    }
    return true;
}

void put_frame(std::vector<uint8_t>* out, uint8_t type, uint64_t id, const uint8_t* payload,
               size_t len, uint32_t timeout_ms = 0) {
    const fr::FrameHeader h{type, 0, id, timeout_ms, static_cast<uint32_t>(len)};
    uint8_t hdr[fr::kHeaderSize];
    fr::frame_encode_header(h, hdr);
    out->insert(out->end(), hdr, hdr + sizeof hdr);
    if (len) out->insert(out->end(), payload, payload + len);
}

bool read_frames(int fd, fr::FrameParser* in);

// --key-file: set once in main() before any thread starts.
bool g_has_key = false;
uint8_t g_key[fr::kAuthKeySize];

// PROTOCOL.md "Handshake", the peer's side: HELLO role || Np, check the CHALLENGE's proof,
// AUTH. Without a key, the one-byte HELLO of a --no-auth router is the whole handshake.
void hello(int fd, fr::Role role) {
    std::vector<uint8_t> out;
    uint8_t payload[1 + fr::kNonceSize] = {role};
    if (!g_has_key) {
        put_frame(&out, fr::kHello, 0, payload, 1);
        if (!write_all(fd, out.data(), out.size())) die("write HELLO");
        return;
    }
    if (!fr::random_bytes(payload + 1, fr::kNonceSize)) die("getrandom");
    put_frame(&out, fr::kHello, 0, payload, sizeof payload);
    if (!write_all(fd, out.data(), out.size())) die("write HELLO");
    fr::FrameParser in;
    fr::Frame f;
    while (in.next(&f) != fr::FrameParser::Status::kFrame)
        if (in.error() != fr::DecodeError::kNone || !read_frames(fd, &in))
            die("the router closed the connection during the handshake");
    if (f.header.type != fr::kChallenge || f.header.length != fr::kChallengePayload) {
        fprintf(stderr, "fastrouter_bench: the router answered HELLO with %s: %.*s\n",
                fr::frame_type_name(f.header.type), static_cast<int>(f.header.length),
                reinterpret_cast<const char*>(f.payload));
        exit(1);
    }
    const uint8_t* nr = f.payload;
    uint8_t want[fr::kProofSize], proof[fr::kProofSize];
    fr::auth_router_proof(g_key, role, payload + 1, nr, want);
    if (!fr::constant_time_equal(want, nr + fr::kNonceSize, fr::kProofSize)) {
        fprintf(stderr, "fastrouter_bench: the router's proof is wrong: it does not hold this key\n");
        exit(1);
    }
    fr::auth_peer_proof(g_key, role, payload + 1, nr, proof);
    out.clear();
    put_frame(&out, fr::kAuth, 0, proof, sizeof proof);
    if (!write_all(fd, out.data(), out.size())) die("write AUTH");
}

// Reads until at least one whole frame is parsed; false on EOF.
bool read_frames(int fd, fr::FrameParser* in) {
    size_t avail = 0;
    uint8_t* p = in->reserve(64 << 10, &avail);
    for (;;) {
        ssize_t n = read(fd, p, avail);
        if (n > 0) {
            in->commit(static_cast<size_t>(n));
            return true;
        }
        if (n < 0 && errno == EINTR) continue;
        return false;
    }
}

struct Percentiles {
    double p50, p90, p99, mean;
};

Percentiles percentiles(std::vector<int64_t>& ns) {
    Percentiles p{0, 0, 0, 0};
    if (ns.empty()) return p;
    std::sort(ns.begin(), ns.end());
    auto at = [&](double q) {
        size_t rank = static_cast<size_t>(q * static_cast<double>(ns.size()) + 0.5);
        rank = std::max<size_t>(1, std::min(rank, ns.size()));
        return static_cast<double>(ns[rank - 1]) / 1000.0;
    };
    double sum = 0;
    for (int64_t v : ns) sum += static_cast<double>(v);
    p.p50 = at(0.50);
    p.p90 = at(0.90);
    p.p99 = at(0.99);
    p.mean = sum / static_cast<double>(ns.size()) / 1000.0;
    return p;
}

// ---- echo workers ------------------------------------------------------------------------

void echo_worker(std::string address, std::atomic<int>* ready) {
    int fd = connect_to(address);
    hello(fd, fr::kRoleWorker);
    std::vector<uint8_t> ready_frame;
    put_frame(&ready_frame, fr::kReady, 0, nullptr, 0);
    if (!write_all(fd, ready_frame.data(), ready_frame.size())) die("write READY");
    ready->fetch_add(1);
    fr::FrameParser in;
    uint8_t hdr[2 * fr::kHeaderSize];
    while (read_frames(fd, &in)) {
        fr::Frame f;
        while (in.next(&f) == fr::FrameParser::Status::kFrame) {
            if (f.header.type != fr::kJob) continue;
            // RESULT (echoing the body) and READY in one gather write, as a real worker would.
            fr::frame_encode_header({fr::kResult, 0, f.header.job_id, 0, f.header.length}, hdr);
            fr::frame_encode_header({fr::kReady, 0, 0, 0, 0}, hdr + fr::kHeaderSize);
            struct iovec iov[3] = {{hdr, fr::kHeaderSize},
                                   {const_cast<uint8_t*>(f.payload), f.header.length},
                                   {hdr + fr::kHeaderSize, fr::kHeaderSize}};
            size_t total = 2 * fr::kHeaderSize + f.header.length;
            ssize_t w = writev(fd, iov, 3);
            if (w < 0) return;
            if (static_cast<size_t>(w) < total) {
                // Rare (large bodies): finish with plain writes.
                std::vector<uint8_t> rest;
                for (auto& v : iov) {
                    auto* b = static_cast<uint8_t*>(v.iov_base);
                    rest.insert(rest.end(), b, b + v.iov_len);
                }
                if (!write_all(fd, rest.data() + w, total - static_cast<size_t>(w))) return;
            }
        }
        if (in.error() != fr::DecodeError::kNone) return;
    }
    close(fd);
}

int mode_echo(const std::string& address, int workers) {
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < workers; i++) threads.emplace_back(echo_worker, address, &ready);
    while (ready.load() < workers) usleep(1000);
    printf("READY %d\n", workers);
    fflush(stdout);
    for (auto& t : threads) t.join();
    return 0;
}

// ---- one master, sequential round trips ----------------------------------------------------

int mode_rtt(const std::string& address, int count, size_t size) {
    int fd = connect_to(address);
    hello(fd, fr::kRoleMaster);
    std::vector<uint8_t> body(size, 'x');
    std::vector<uint8_t> out;
    fr::FrameParser in;
    std::vector<int64_t> lat;
    lat.reserve(static_cast<size_t>(count));
    int warmup = std::min(count / 10 + 1, 1000);
    int errors = 0;
    for (int i = 0; i < warmup + count; i++) {
        out.clear();
        put_frame(&out, fr::kSubmit, static_cast<uint64_t>(i) + 1, body.data(), body.size(), 5000);
        int64_t t0 = now_ns();
        if (!write_all(fd, out.data(), out.size())) die("write SUBMIT");
        fr::Frame f;
        while (in.next(&f) != fr::FrameParser::Status::kFrame)
            if (!read_frames(fd, &in)) die("router closed");
        int64_t t1 = now_ns();
        if (f.header.type != fr::kResult) errors++;
        if (i >= warmup) lat.push_back(t1 - t0);
    }
    Percentiles p = percentiles(lat);
    printf("{\"n\":%d,\"size\":%zu,\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f,"
           "\"errors\":%d}\n",
           count, size, p.p50, p.p90, p.p99, p.mean, errors);
    close(fd);
    return errors ? 1 : 0;
}

// ---- closed-loop load ----------------------------------------------------------------------

struct LoadResult {
    uint64_t jobs = 0;
    uint64_t errors = 0;
    std::vector<int64_t> lat;  // per batch round trip, sampled
};

void load_master(std::string address, size_t size, int batch, std::atomic<bool>* go,
                 std::atomic<bool>* stop, LoadResult* res) {
    int fd = connect_to(address);
    hello(fd, fr::kRoleMaster);
    std::vector<uint8_t> body(size, 'x');
    std::vector<uint8_t> out;
    fr::FrameParser in;
    uint64_t next_id = 1;
    while (!go->load()) std::this_thread::yield();
    while (!stop->load(std::memory_order_relaxed)) {
        out.clear();
        for (int k = 0; k < batch; k++)
            put_frame(&out, fr::kSubmit, next_id++, body.data(), body.size(), 10000);
        int64_t t0 = now_ns();
        if (!write_all(fd, out.data(), out.size())) die("write SUBMIT");
        int got = 0;
        fr::Frame f;
        while (got < batch) {
            while (got < batch && in.next(&f) == fr::FrameParser::Status::kFrame) {
                got++;
                if (f.header.type != fr::kResult) res->errors++;
            }
            if (got < batch && !read_frames(fd, &in)) die("router closed");
        }
        if ((res->jobs & 15) == 0) res->lat.push_back(now_ns() - t0);
        res->jobs += static_cast<uint64_t>(batch);
    }
    close(fd);
}

int mode_load(const std::string& address, int masters, size_t size, int batch, double seconds) {
    std::atomic<bool> go{false}, stop{false};
    std::vector<LoadResult> results(static_cast<size_t>(masters));
    std::vector<std::thread> threads;
    for (int i = 0; i < masters; i++)
        threads.emplace_back(load_master, address, size, batch, &go, &stop, &results[static_cast<size_t>(i)]);
    usleep(50000);  // let every master connect before the clock starts
    int64_t t0 = now_ns();
    go.store(true);
    usleep(static_cast<useconds_t>(seconds * 1e6));
    stop.store(true);
    for (auto& t : threads) t.join();
    double elapsed = static_cast<double>(now_ns() - t0) / 1e9;
    uint64_t jobs = 0, errors = 0;
    std::vector<int64_t> lat;
    for (auto& r : results) {
        jobs += r.jobs;
        errors += r.errors;
        lat.insert(lat.end(), r.lat.begin(), r.lat.end());
    }
    Percentiles p = percentiles(lat);
    printf("{\"masters\":%d,\"size\":%zu,\"batch\":%d,\"seconds\":%.3f,\"jobs\":%llu,"
           "\"jobs_s\":%.0f,\"errors\":%llu,\"batch_p50_us\":%.2f,\"batch_p99_us\":%.2f}\n",
           masters, size, batch, elapsed, static_cast<unsigned long long>(jobs),
           static_cast<double>(jobs) / elapsed, static_cast<unsigned long long>(errors), p.p50,
           p.p99);
    return errors ? 1 : 0;
}

// ---- the floor: a frame bounced between two processes over a Unix socket pair --------------

int mode_pingpong(int count, size_t size) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    size_t frame = fr::kHeaderSize + size;
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(sv[0]);
        std::vector<uint8_t> buf(frame);
        for (;;) {
            size_t got = 0;
            while (got < frame) {
                ssize_t n = read(sv[1], buf.data() + got, frame - got);
                if (n <= 0) _exit(0);
                got += static_cast<size_t>(n);
            }
            if (!write_all(sv[1], buf.data(), frame)) _exit(0);
        }
    }
    close(sv[1]);
    std::vector<uint8_t> buf(frame, 'x');
    std::vector<int64_t> lat;
    lat.reserve(static_cast<size_t>(count));
    int warmup = std::min(count / 10 + 1, 1000);
    for (int i = 0; i < warmup + count; i++) {
        int64_t t0 = now_ns();
        if (!write_all(sv[0], buf.data(), frame)) die("write");
        size_t got = 0;
        while (got < frame) {
            ssize_t n = read(sv[0], buf.data() + got, frame - got);
            if (n <= 0) die("read");
            got += static_cast<size_t>(n);
        }
        if (i >= warmup) lat.push_back(now_ns() - t0);
    }
    close(sv[0]);
    waitpid(child, nullptr, 0);
    Percentiles p = percentiles(lat);
    printf("{\"n\":%d,\"size\":%zu,\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f}\n",
           count, size, p.p50, p.p90, p.p99, p.mean);
    return 0;
}

long number(const char* opt, const char* v) {
    char* end = nullptr;
    long n = std::strtol(v, &end, 10);
    if (!*v || *end || n < 0) {
        fprintf(stderr, "fastrouter_bench: %s: expected a number, got '%s'\n", opt, v);
        exit(2);
    }
    return n;
}

}  // namespace

int main(int argc, char** argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fputs(kUsage, stderr);
        return 2;
    }
    std::string mode = argv[1];
    std::string address;
    int i = 2;
    if (mode != "pingpong") {
        if (argc < 3) {
            fputs(kUsage, stderr);
            return 2;
        }
        address = argv[2];
        i = 3;
    }
    long workers = 4, count = 10000, size = 0, masters = 8, batch = 1;
    double seconds = 2.0;
    for (; i < argc; i++) {
        std::string opt = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "fastrouter_bench: %s needs a value\n", opt.c_str());
            return 2;
        }
        const char* v = argv[++i];
        if (opt == "--key-file") {
            std::string err;
            if (!fr::read_auth_key_file(v, geteuid(), g_key, &err)) {
                fprintf(stderr, "fastrouter_bench: --key-file: %s\n", err.c_str());
                return 2;
            }
            g_has_key = true;
        } else if (opt == "--workers") workers = number(argv[i - 1], v);
        else if (opt == "--count") count = number(argv[i - 1], v);
        else if (opt == "--size") size = number(argv[i - 1], v);
        else if (opt == "--masters") masters = number(argv[i - 1], v);
        else if (opt == "--batch") batch = number(argv[i - 1], v);
        else if (opt == "--seconds") seconds = std::atof(v);
        else {
            fprintf(stderr, "fastrouter_bench: unknown option %s\n%s", opt.c_str(), kUsage);
            return 2;
        }
    }
    if (mode == "echo") return mode_echo(address, static_cast<int>(workers));
    if (mode == "rtt") return mode_rtt(address, static_cast<int>(count), static_cast<size_t>(size));
    if (mode == "load")
        return mode_load(address, static_cast<int>(masters), static_cast<size_t>(size),
                         static_cast<int>(std::max(1L, batch)), seconds);
    if (mode == "pingpong") return mode_pingpong(static_cast<int>(count), static_cast<size_t>(size));
    fputs(kUsage, stderr);
    return 2;
}
