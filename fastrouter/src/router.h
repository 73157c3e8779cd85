// The routing core: connections and their roles, the job table, the LRU idle-worker list and
// every rule of PROTOCOL.md "Semantics". No sockets: the event loop feeds bytes into a
// connection's parser, calls input(), and writes out whatever the connection's OutBuf holds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "auth.h"
#include "ewma.h"
#include "frame.h"
#include "histogram.h"
#include "idmap.h"
#include "outbuf.h"
#include "queue.h"

namespace fr {

struct RouterConfig {
    size_t max_queue = 10000;
    size_t max_queue_bytes = 256u << 20;
    uint32_t max_frame = kDefaultMaxFrame;
    size_t max_output = 64u << 20;
    uint32_t default_timeout_ms = 30000;

    // PROTOCOL.md "Handshake". With a key every peer answers a CHALLENGE before it is a master
    // or a worker; without one (--no-auth) the one-byte HELLO is the whole handshake.
    bool has_key = false;
    uint8_t key[kAuthKeySize] = {};
    // Peer credentials (Unix sockets): who may connect besides the router's own euid.
    uint32_t euid = 0;
    std::vector<uint32_t> allow_uids;
    std::vector<uint32_t> allow_gids;
    // Bounds before authentication: time to complete the handshake, and how many connections
    // may be in it at once (the oldest is closed to make room).
    uint32_t handshake_ms = 2000;
    size_t max_pending = 128;
    // Bounds after it: time for a frame that has started arriving to complete, and connections
    // per role.
    uint32_t frame_ms = 10000;
    size_t max_masters = 4096;
    size_t max_workers = 4096;
    // Fills the router's nonce; empty = random_bytes() (getrandom(2)). Unit tests and the
    // fuzzer make it deterministic.
    std::function<bool(uint8_t*, size_t)> nonce_source;
};

struct RouterStats {
    uint64_t submitted = 0;
    uint64_t completed = 0;
    uint64_t errors = 0;
    uint64_t timeouts = 0;
    uint64_t busy = 0;
    uint64_t cancelled = 0;
    uint64_t dropped = 0;
    uint64_t protocol_errors = 0;
    uint64_t withdrawn = 0;        // WITHDRAWN with TAKEN
    uint64_t withdraw_missed = 0;  // WITHDRAWN without it
    uint64_t auth_failures = 0;       // AUTH with a wrong (or malformed) proof
    uint64_t peers_refused = 0;       // Unix peers whose credentials are not allowed
    uint64_t handshake_timeouts = 0;  // not authenticated within handshake_ms
    uint64_t evicted_pending = 0;     // closed to make room under max_pending
    uint64_t frame_timeouts = 0;      // a started frame not completed within frame_ms
};

// What a master needs to decide whether a job would only queue (PROTOCOL.md "Status page").
struct RouterLoad {
    uint64_t workers = 0;
    uint64_t workers_idle = 0;
    uint64_t queued = 0;
    uint64_t in_flight = 0;
    uint64_t service_ewma_us = 0;     // JOB handed to a worker -> its RESULT received
    uint64_t queue_wait_ewma_us = 0;  // SUBMIT received -> JOB handed to a worker
    bool stopping = false;

    bool operator==(const RouterLoad& o) const {
        return workers == o.workers && workers_idle == o.workers_idle && queued == o.queued &&
               in_flight == o.in_flight && service_ewma_us == o.service_ewma_us &&
               queue_wait_ewma_us == o.queue_wait_ewma_us && stopping == o.stopping;
    }
    bool operator!=(const RouterLoad& o) const { return !(*this == o); }
};

constexpr uint32_t kNoSlot = 0xffffffffu;

// Links of a connection in one of the router's intrusive FIFO lists (by slot).
struct ListLinks {
    uint32_t prev = kNoSlot;
    uint32_t next = kNoSlot;
    bool linked = false;
};

enum class Handshake : uint8_t {
    kAwaitHello,
    kAwaitAuth,  // CHALLENGE sent
    kDone,       // role is master or worker
};

enum class ConnState : uint8_t {
    kOpen,
    kClosing,  // sent PROTOCOL_ERROR; flush it, then close. Already detached from routing.
    kDead,     // close now without flushing (output cap exceeded). Detached from routing.
};

struct Conn {
    uint64_t id = 0;
    int fd = -1;
    Role role = kRoleNone;  // master or worker once the handshake is complete, never before
    ConnState state = ConnState::kOpen;
    FrameParser in;
    OutBuf out;

    // Master: its unanswered jobs, master's id -> router's id. A job leaves this map the
    // moment it is answered or cancelled, so the master may reuse the id right after.
    IdMap jobs;

    // Worker: the job it holds (0 = none; kept after a timeout so the late RESULT is
    // recognised), and its place in the LRU idle list.
    uint64_t job = 0;
    bool idle = false;
    uint32_t idle_prev = 0;
    uint32_t idle_next = 0;

    bool pending = false;  // queued in Router::pending_
    bool warned = false;   // this peer's misbehaviour was logged already

    // Handshake: the role HELLO claimed and the proof AUTH must carry.
    Handshake hs = Handshake::kAwaitHello;
    Role claimed = kRoleNone;
    uint8_t expect_proof[kProofSize] = {};
    int64_t opened_at = 0;
    ListLinks unauth_link;  // in Router::unauth_ until authenticated
    // After it: when the frame now arriving started (0 = no partial frame buffered).
    int64_t frame_since = 0;
    ListLinks frame_link;  // in Router::partial_ while frame_since != 0

    // Owned by the event loop.
    bool want_write = false;
    bool shut_wr = false;
    int64_t linger_deadline = 0;
};

class Router {
public:
    explicit Router(const RouterConfig& cfg);
    ~Router();
    Router(const Router&) = delete;
    Router& operator=(const Router&) = delete;

    // A new connection, accepted at `now_us`. With `cred` (a Unix socket) the peer is refused
    // at once unless peer_allowed(); without it (TCP) there is nothing to check.
    uint64_t open(int fd, int64_t now_us, const PeerCred* cred = nullptr);
    Conn* get(uint64_t id);
    // Handles every whole frame buffered in the connection's parser.
    void input(uint64_t id, int64_t now_us);
    // The peer is gone (or the loop gave up on it): apply the disconnect rules, free the slot.
    void closed(uint64_t id);
    // Answers jobs whose deadline has passed; closes connections past the handshake or frame
    // deadline.
    void tick(int64_t now_us);
    int64_t next_deadline();
    // Graceful stop, first half: queued jobs are answered ERROR SHUTDOWN, new SUBMITs too, and
    // workers get no new work; jobs already with a worker may still finish (in_flight() > 0).
    void drain();
    // Second half (the grace period is over): in-flight jobs are answered ERROR SHUTDOWN too.
    void shutdown();

    // Connections with new output or a new state since the last call.
    void take_pending(std::vector<uint64_t>* out);

    template <typename F>
    void for_each_conn(F&& fn) {
        for (auto& c : conns_)
            if (c) fn(c.get());
    }

    std::string stats_json();
    RouterLoad load() const;
    const RouterStats& stats() const { return stats_; }
    const RouterConfig& config() const { return cfg_; }
    size_t queued() const { return queue_.count(); }
    size_t in_flight() const { return in_flight_; }
    size_t connections() const { return live_conns_; }
    size_t unauthenticated() const { return unauth_.size; }

private:
    static constexpr uint32_t kNil = 0xffffffffu;

    struct Job {
        uint32_t gen = 0;
        bool live = false;
        bool in_flight = false;
        bool orphan = false;  // answered, cancelled or master gone: discard its result
        uint16_t flags = 0;
        uint64_t master = 0;
        uint64_t master_job = 0;
        uint64_t worker = 0;
        JobQueue::Handle qh = 0;
        int64_t deadline = kNoDeadline;
        int64_t submitted_at = 0;
        int64_t dispatched_at = 0;
        std::vector<uint8_t> payload;
    };

    uint64_t job_alloc();
    Job* job_get(uint64_t id);
    void job_free(uint64_t id);

    struct ConnList {
        uint32_t head = kNoSlot;
        uint32_t tail = kNoSlot;
        size_t size = 0;
    };
    void list_push(ConnList& l, ListLinks Conn::*m, Conn* c);
    void list_remove(ConnList& l, ListLinks Conn::*m, Conn* c);
    Conn* list_front(const ConnList& l) const;

    void handle(Conn* c, const Frame& f, int64_t now);
    void handshake(Conn* c, const Frame& f);
    void on_hello(Conn* c, const Frame& f);
    void on_auth(Conn* c, const Frame& f);
    void become(Conn* c, Role role);
    void track_partial_frame(Conn* c, bool handled_any, int64_t now);
    void expire_connections(int64_t now);
    void on_submit(Conn* c, const Frame& f, int64_t now);
    void on_cancel(Conn* c, const Frame& f);
    void on_withdraw(Conn* c, const Frame& f);
    void on_ready(Conn* c, int64_t now);
    void on_result(Conn* c, const Frame& f, int64_t now);
    void on_stats(Conn* c, const Frame& f);

    void dispatch(Conn* w, uint64_t job_id, int64_t now);
    // Answers a job's master with a frame without payload ownership and retires the job.
    void answer(Job* j, uint8_t type, uint16_t flags, const char* reason);

    void send(Conn* c, uint8_t type, uint16_t flags, uint64_t job_id, uint32_t timeout_ms,
              const uint8_t* payload, size_t len);
    void send_owned(Conn* c, uint8_t type, uint16_t flags, uint64_t job_id, uint32_t timeout_ms,
                    std::vector<uint8_t>& payload);
    void after_send(Conn* c);
    void protocol_error(Conn* c, const char* reason);
    void kill(Conn* c);
    void detach(Conn* c);
    void drain_kills();
    void mark(Conn* c);

    void idle_push(Conn* w);
    Conn* idle_pop();
    void idle_remove(Conn* w);

    void expire_in_flight(int64_t now);

    RouterConfig cfg_;
    RouterStats stats_;
    Histogram queue_wait_us_;  // SUBMIT received -> JOB handed to a worker
    Histogram service_us_;     // JOB handed to a worker -> its RESULT received
    Ewma queue_wait_ewma_;     // the same two durations, recent-weighted, for the status page
    Ewma service_ewma_;        // (includes late RESULTs: the worker spent that time too)
    JobQueue queue_;
    DeadlineHeap in_flight_deadlines_;

    std::vector<std::unique_ptr<Conn>> conns_;
    std::vector<uint32_t> conn_gen_;
    std::vector<uint32_t> conn_free_;
    std::vector<Job> jobs_;
    std::vector<uint32_t> job_free_;

    uint32_t idle_head_ = kNil;
    uint32_t idle_tail_ = kNil;
    size_t workers_idle_ = 0;
    size_t in_flight_ = 0;
    size_t masters_ = 0;
    size_t workers_ = 0;
    size_t live_conns_ = 0;
    size_t jobs_live_ = 0;  // job slots in use; 0 whenever no master or worker holds one
    bool stopping_ = false;
    // Connections not yet authenticated, oldest first: the handshake deadline and eviction.
    ConnList unauth_;
    // Authenticated connections with a partial frame buffered, by when it started arriving.
    ConnList partial_;

    std::vector<uint64_t> pending_;
    std::vector<uint64_t> kills_;
};

}  // namespace fr
