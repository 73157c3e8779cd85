// The epoll event loop: accepts peers, moves bytes between sockets and the Router, drives
// timers from epoll_wait's timeout, and shuts down on SIGTERM/SIGINT.
#include "net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "log.h"
#include "status.h"

namespace fr {

namespace {

constexpr uint64_t kTagListen = 1;
constexpr uint64_t kTagSignal = 2;  // connection ids are >= 1<<32, so tags never collide
constexpr int64_t kLingerUs = 1000 * 1000;
constexpr int64_t kShutdownFlushUs = 1000 * 1000;
constexpr int64_t kParentCheckUs = 1000 * 1000;
constexpr int kReadsPerEvent = 8;
// Room asked of the parser per read: the buffer grows with what arrives (FrameParser::reserve).
constexpr size_t kReadMin = 4096;
// Before the handshake no frame is longer than 88 bytes, so a read never needs more.
constexpr size_t kPreAuthRead = 128;

int64_t now_us() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

std::string dir_of(const std::string& path) {
    size_t slash = path.rfind('/');
    return slash == 0 ? "/" : path.substr(0, slash);
}

struct Listener {
    int fd = -1;
    std::string unlink_path;  // set once we own a socket file
    std::string shown;        // the address printed on the READY line
};

// The socket's and the status page's directory must be private and ours: others could
// otherwise replace the file or read the page. `what` completes "refusing to ... in DIR".
bool private_dir_ok(const std::string& dir, const char* what, const char* alternative) {
    struct stat st;
    if (stat(dir.c_str(), &st) != 0) {
        log_error("cannot %s in %s: %s", what, dir.c_str(), strerror(errno));
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        log_error("cannot %s in %s: it is not a directory", what, dir.c_str());
        return false;
    }
    if (st.st_uid != geteuid()) {
        log_error("refusing to %s in %s: the directory is owned by uid %u, not by this router's "
                  "user (uid %u); use a directory the router's user owns (chown it)%s",
                  what, dir.c_str(), static_cast<unsigned>(st.st_uid),
                  static_cast<unsigned>(geteuid()), alternative);
        return false;
    }
    if (st.st_mode & (S_IRGRP | S_IWGRP | S_IROTH | S_IWOTH)) {
        log_error("refusing to %s in %s: the directory is readable or writable by group or "
                  "others (mode %04o); use a private directory (chmod 700 %s)%s",
                  what, dir.c_str(), static_cast<unsigned>(st.st_mode & 07777), dir.c_str(),
                  alternative);
        return false;
    }
    return true;
}

// Returns an exit code: 0 on success, 2 for a refusal the operator must fix.
int listen_unix(const ListenAddress& a, Listener* l) {
    if (!private_dir_ok(dir_of(a.path), "listen", "")) return 2;
    struct stat st;
    sockaddr_un sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, a.path.c_str(), a.path.size() + 1);

    if (lstat(a.path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            log_error("refusing to replace %s: it exists and is not a socket", a.path.c_str());
            return 2;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
            close(probe);
            log_error("another process is already listening on %s; stop it or pick another path",
                      a.path.c_str());
            return 2;
        }
        if (probe >= 0) close(probe);
        log_info("removing stale socket %s", a.path.c_str());
        unlink(a.path.c_str());
    }

    l->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (l->fd < 0) {
        log_error("socket(AF_UNIX): %s", strerror(errno));
        return 1;
    }
    // The umask closes the window between bind() and chmod() in which the file is looser.
    mode_t old = umask(0177);
    int rc = bind(l->fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    umask(old);
    if (rc != 0) {
        log_error("cannot bind %s: %s", a.path.c_str(), strerror(errno));
        return 1;
    }
    l->unlink_path = a.path;
    if (chmod(a.path.c_str(), 0600) != 0) {
        log_error("chmod 0600 %s: %s", a.path.c_str(), strerror(errno));
        return 1;
    }
    if (listen(l->fd, SOMAXCONN) != 0) {
        log_error("listen on %s: %s", a.path.c_str(), strerror(errno));
        return 1;
    }
    l->shown = "unix://" + a.path;
    return 0;
}

int listen_tcp(const ListenAddress& a, bool has_key, Listener* l) {
    addrinfo hints;
    std::memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    std::string port = std::to_string(a.port);
    int gai = getaddrinfo(a.host.c_str(), port.c_str(), &hints, &res);
    if (gai != 0) {
        log_error("cannot resolve tcp host '%s': %s", a.host.c_str(), gai_strerror(gai));
        return 2;
    }
    int err = 0;
    std::string bound;
    for (addrinfo* ai = res; ai; ai = ai->ai_next) {
        // Loopback or not is decided on the resolved address, never on the name.
        std::string shown = address_text(ai->ai_addr);
        if (!is_loopback_address(ai->ai_addr) && !has_key) {
            log_error("refusing to listen on %s (tcp host '%s'): it is not a loopback address, so "
                      "peers must authenticate; pass --auth-key-file",
                      shown.c_str(), a.host.c_str());
            freeaddrinfo(res);
            return 2;
        }
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
            l->fd = fd;
            if (!is_loopback_address(ai->ai_addr)) bound = shown;
            break;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (l->fd < 0) {
        log_error("cannot listen on tcp %s:%u: %s", a.host.c_str(), a.port, strerror(err));
        return 1;
    }
    sockaddr_storage ss;
    socklen_t len = sizeof ss;
    getsockname(l->fd, reinterpret_cast<sockaddr*>(&ss), &len);
    uint16_t real = ss.ss_family == AF_INET6
                        ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                        : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    bool v6 = a.host.find(':') != std::string::npos;
    l->shown = "tcp://" + (v6 ? "[" + a.host + "]" : a.host) + ":" + std::to_string(real);
    if (!bound.empty())
        // Printed even with --quiet: the operator must see that the router is reachable.
        log_error("WARNING: listening on %s port %u, which is NOT a loopback address: other "
                  "machines can connect. Every peer must prove it holds the key; frames travel "
                  "unencrypted (job bodies are sealed end to end by parallel_render)",
                  bound.c_str(), real);
    return 0;
}

class Loop {
public:
    Loop(const ServerOptions& opts, Listener* l, StatusPage* status)
        : opts_(opts), router_(opts.router), listener_(l), status_(status) {}

    int run(int sigfd);

private:
    void accept_all();
    void on_readable(uint64_t id);
    void flush(Conn* c);
    void process_pending();
    void close_conn(uint64_t id);
    void set_write_interest(Conn* c, bool on);
    void begin_shutdown(const char* why);
    void end_drain();
    bool output_pending();
    int timeout_ms();

    const ServerOptions& opts_;
    Router router_;
    Listener* listener_;
    StatusPage* status_;  // not open when disabled
    int epfd_ = -1;
    int spare_fd_ = -1;
    int64_t now_ = 0;
    int64_t next_parent_check_ = 0;
    int64_t drain_deadline_ = 0;     // end of the grace period for in-flight jobs
    int64_t shutdown_deadline_ = 0;  // last moment to flush answers before exiting
    bool stopping_ = false;
    bool draining_ = false;
    bool warned_emfile_ = false;
    std::vector<uint64_t> pending_;
    std::vector<uint64_t> lingering_;
};

void Loop::set_write_interest(Conn* c, bool on) {
    if (c->want_write == on) return;
    c->want_write = on;
    epoll_event ev;
    ev.events = EPOLLIN | EPOLLRDHUP;
    if (on) ev.events |= EPOLLOUT;
    ev.data.u64 = c->id;
    epoll_ctl(epfd_, EPOLL_CTL_MOD, c->fd, &ev);
}

void Loop::close_conn(uint64_t id) {
    Conn* c = router_.get(id);
    if (!c) return;
    epoll_ctl(epfd_, EPOLL_CTL_DEL, c->fd, nullptr);
    close(c->fd);
    router_.closed(id);
}

void Loop::accept_all() {
    for (;;) {
        int fd = accept4(listener_->fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE) {
                // Accept and drop one peer with the spare descriptor; otherwise the listening
                // socket stays readable and the loop spins.
                if (!warned_emfile_) {
                    warned_emfile_ = true;
                    log_error("out of file descriptors; refusing new connections (raise ulimit -n)");
                }
                if (spare_fd_ >= 0) {
                    close(spare_fd_);
                    int drop = accept(listener_->fd, nullptr, nullptr);
                    if (drop >= 0) close(drop);
                    spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
                    continue;
                }
            }
            return;  // EAGAIN, or an error the next event will report again
        }
        uint64_t id;
        if (opts_.listen.is_unix) {
            // Who is at the other end, as the kernel saw it at connect(); checked by the router.
            PeerCred cred;
            ucred uc;
            socklen_t len = sizeof uc;
            if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) == 0 && len == sizeof uc) {
                cred.known = true;
                cred.uid = uc.uid;
                cred.gid = uc.gid;
            }
            id = router_.open(fd, now_, &cred);
        } else {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            id = router_.open(fd, now_);
        }
        epoll_event ev;
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.u64 = id;
        if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
            close(fd);
            router_.closed(id);
        }
    }
}

void Loop::on_readable(uint64_t id) {
    for (int i = 0; i < kReadsPerEvent; i++) {
        Conn* c = router_.get(id);
        if (!c) return;
        if (c->state == ConnState::kDead) return;
        if (c->state == ConnState::kClosing) {
            // Discard what the offender still sends; EOF ends the linger early.
            char sink[4096];
            ssize_t n = read(c->fd, sink, sizeof sink);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) close_conn(id);
            if (n <= 0) return;
            continue;
        }
        size_t avail = 0;
        uint8_t* p = c->in.reserve(c->role == kRoleNone ? kPreAuthRead : kReadMin, &avail);
        ssize_t n = read(c->fd, p, avail);
        if (n > 0) {
            c->in.commit(static_cast<size_t>(n));
            router_.input(id, now_);
            if (static_cast<size_t>(n) < avail) return;  // drained for now
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        close_conn(id);  // EOF, or a reset
        return;
    }
}

void Loop::flush(Conn* c) {
    struct iovec iov[OutBuf::kMaxIov];
    while (!c->out.empty()) {
        int n = c->out.fill_iov(iov, OutBuf::kMaxIov);
        ssize_t w = writev(c->fd, iov, n);
        if (w > 0) {
            c->out.consume(static_cast<size_t>(w));
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            set_write_interest(c, true);
            return;
        }
        close_conn(c->id);  // EPIPE/ECONNRESET: the peer is gone
        return;
    }
    set_write_interest(c, false);
    if (c->state == ConnState::kClosing && !c->shut_wr) {
        // Half-close so the peer reads PROTOCOL_ERROR and then EOF, instead of a reset.
        c->shut_wr = true;
        shutdown(c->fd, SHUT_WR);
    }
}

void Loop::process_pending() {
    // Closing a connection can queue output for others (WORKER_LOST), hence the loop.
    for (;;) {
        router_.take_pending(&pending_);
        if (pending_.empty()) return;
        for (uint64_t id : pending_) {
            Conn* c = router_.get(id);
            if (!c) continue;
            if (c->state == ConnState::kDead) {
                close_conn(id);
                continue;
            }
            if (c->state == ConnState::kClosing && c->linger_deadline == 0) {
                c->linger_deadline = now_ + kLingerUs;
                lingering_.push_back(id);
            }
            flush(c);
        }
    }
}

bool Loop::output_pending() {
    bool any = false;
    router_.for_each_conn([&](Conn* c) {
        if (!c->out.empty() && c->state != ConnState::kDead) any = true;
    });
    return any;
}

void Loop::begin_shutdown(const char* why) {
    if (stopping_) return;
    stopping_ = true;
    log_info("draining (%s): no new connections or jobs; queued jobs answered ERROR SHUTDOWN, "
             "%zu in flight get up to %" PRId64 " ms to finish",
             why, router_.in_flight(), opts_.drain_ms);
    epoll_ctl(epfd_, EPOLL_CTL_DEL, listener_->fd, nullptr);
    close(listener_->fd);
    listener_->fd = -1;
    if (!listener_->unlink_path.empty()) {
        unlink(listener_->unlink_path.c_str());
        listener_->unlink_path.clear();
    }
    router_.drain();
    draining_ = true;
    drain_deadline_ = now_ + opts_.drain_ms * 1000;
}

void Loop::end_drain() {
    if (!draining_) return;
    draining_ = false;
    if (router_.in_flight())
        log_info("grace period over: answering %zu jobs still in flight with ERROR SHUTDOWN",
                 router_.in_flight());
    router_.shutdown();
    shutdown_deadline_ = now_ + kShutdownFlushUs;
}

int Loop::timeout_ms() {
    int64_t until = router_.next_deadline();
    for (uint64_t id : lingering_)
        if (Conn* c = router_.get(id))
            if (c->linger_deadline < until) until = c->linger_deadline;
    if (opts_.parent_pid && next_parent_check_ < until) until = next_parent_check_;
    if (draining_ && drain_deadline_ < until) until = drain_deadline_;
    if (stopping_ && !draining_ && shutdown_deadline_ < until) until = shutdown_deadline_;
    if (status_->is_open() && status_->next_refresh() < until) until = status_->next_refresh();
    if (until == kNoDeadline) return -1;
    int64_t left = until - now_;
    if (left <= 0) return 0;
    int64_t ms = (left + 999) / 1000;  // round up: waking early would just spin
    return ms > 60000 ? 60000 : static_cast<int>(ms);
}

int Loop::run(int sigfd) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) {
        log_error("epoll_create1: %s", strerror(errno));
        return 1;
    }
    spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
    epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.u64 = kTagListen;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, listener_->fd, &ev);
    ev.data.u64 = kTagSignal;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, sigfd, &ev);

    now_ = now_us();
    next_parent_check_ = now_ + kParentCheckUs;
    epoll_event events[256];
    for (;;) {
        now_ = now_us();
        router_.tick(now_);
        for (size_t i = 0; i < lingering_.size();) {
            Conn* c = router_.get(lingering_[i]);
            if (!c || c->linger_deadline <= now_) {
                if (c) close_conn(lingering_[i]);
                lingering_[i] = lingering_.back();
                lingering_.pop_back();
            } else {
                i++;
            }
        }
        if (opts_.parent_pid && now_ >= next_parent_check_) {
            next_parent_check_ = now_ + kParentCheckUs;
            if (getppid() != opts_.parent_pid) begin_shutdown("parent process exited");
        }
        if (draining_ && (router_.in_flight() == 0 || now_ >= drain_deadline_)) end_drain();
        process_pending();
        if (stopping_ && !draining_ && (!output_pending() || now_ >= shutdown_deadline_)) break;
        // Before sleeping, once per turn: a few stores, and only if the load changed.
        status_->publish(router_.load(), now_);

        int n = epoll_wait(epfd_, events, 256, timeout_ms());
        if (n < 0) {
            if (errno == EINTR) continue;
            log_error("epoll_wait: %s", strerror(errno));
            return 1;
        }
        now_ = now_us();
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == kTagListen) {
                if (!stopping_) accept_all();
            } else if (tag == kTagSignal) {
                signalfd_siginfo si;
                while (read(sigfd, &si, sizeof si) == sizeof si) {
                    if (stopping_) {
                        // A second signal: the operator wants out now.
                        if (draining_) end_drain();
                        continue;
                    }
                    begin_shutdown(si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
                }
            } else {
                if (events[i].events & EPOLLOUT)
                    if (Conn* c = router_.get(tag)) flush(c);
                if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
                    on_readable(tag);
                if (Conn* c = router_.get(tag)) c->in.release_if_empty();
            }
        }
    }
    std::vector<uint64_t> all;
    router_.for_each_conn([&](Conn* c) { all.push_back(c->id); });
    for (uint64_t id : all) close_conn(id);
    log_info("stopped");
    return 0;
}

}  // namespace

int run_server(const ServerOptions& opts) {
    // Signals are read from a signalfd inside the loop, so no handler runs at a bad moment.
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, nullptr);
    signal(SIGPIPE, SIG_IGN);
    int sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) {
        log_error("signalfd: %s", strerror(errno));
        return 1;
    }
    if (opts.parent_pid) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        // The parent may have died before prctl took effect.
        if (getppid() != opts.parent_pid) {
            log_error("parent process %d is gone; exiting", static_cast<int>(opts.parent_pid));
            return 1;
        }
    }
    if (opts.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opts.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) {
            log_error("cannot pin to CPU %d: %s (see nproc / taskset -p $$ for the CPUs allowed)",
                      opts.cpu, strerror(errno));
            return 2;
        }
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    Listener l;
    int rc = opts.listen.is_unix ? listen_unix(opts.listen, &l)
                                 : listen_tcp(opts.listen, opts.router.has_key, &l);
    if (rc != 0) {
        if (l.fd >= 0) close(l.fd);
        if (!l.unlink_path.empty()) unlink(l.unlink_path.c_str());
        return rc;
    }
    StatusPage status;
    if (!opts.status_file.empty()) {
        std::string err;
        bool ok = private_dir_ok(dir_of(opts.status_file), "write the status file",
                                 ", or pass --no-status-file");
        if (ok && !status.open(opts.status_file, now_us(), &err)) {
            log_error("%s", err.c_str());
            ok = false;
        }
        if (!ok) {
            close(l.fd);
            if (!l.unlink_path.empty()) unlink(l.unlink_path.c_str());
            return 2;
        }
    }
    printf("READY %s\n", l.shown.c_str());
    fflush(stdout);
    log_info("listening on %s (max queue %zu jobs / %zu bytes, max frame %u bytes; %s)",
             l.shown.c_str(), opts.router.max_queue, opts.router.max_queue_bytes,
             opts.router.max_frame,
             opts.router.has_key ? ("peers authenticate with the key in " + opts.auth_key_file).c_str()
                                 : "no authentication (--no-auth)");

    Loop loop(opts, &l, &status);
    rc = loop.run(sigfd);
    status.close();
    if (l.fd >= 0) close(l.fd);
    if (!l.unlink_path.empty()) unlink(l.unlink_path.c_str());
    close(sigfd);
    return rc;
}

}  // namespace fr
