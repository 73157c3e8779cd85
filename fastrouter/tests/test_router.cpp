// Unit tests of the routing core, driven through byte streams without sockets.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "auth.h"
#include "check.h"
#include "log.h"
#include "router.h"

using namespace fr;

namespace {

struct Out {
    FrameHeader h;
    std::string payload;
};

std::string frame(uint8_t type, uint16_t flags, uint64_t job, uint32_t timeout,
                  const std::string& p = "") {
    const FrameHeader h{type, flags, job, timeout, static_cast<uint32_t>(p.size())};
    uint8_t hdr[kHeaderSize];
    frame_encode_header(h, hdr);
    return std::string(reinterpret_cast<char*>(hdr), kHeaderSize) + p;
}

// The key of PROTOCOL.md's examples: the bytes 00 01 .. 1f.
RouterConfig keyed(RouterConfig cfg = RouterConfig()) {
    cfg.has_key = true;
    for (size_t i = 0; i < kAuthKeySize; i++) cfg.key[i] = static_cast<uint8_t>(i);
    return cfg;
}

RouterConfig no_auth(RouterConfig cfg = RouterConfig()) {
    cfg.has_key = false;
    return cfg;
}

std::string bytes(const uint8_t* p, size_t n) {
    return std::string(reinterpret_cast<const char*>(p), n);
}

const std::string kNp(kNonceSize, '\x11');  // the peer nonce of PROTOCOL.md's examples

struct Harness {
    int next_nonce = 0x22;  // Nr of the first CHALLENGE is 32 x 22 (PROTOCOL.md), then 23, ...
    Router r;
    int64_t now = 1000000;
    // Keyed by default: every connect() below does the whole handshake, as real peers do.
    explicit Harness(RouterConfig cfg = keyed()) : r(with_nonces(cfg)) { log_set_quiet(true); }

    RouterConfig with_nonces(RouterConfig cfg) {
        cfg.nonce_source = [this](uint8_t* out, size_t n) {
            std::memset(out, next_nonce++, n);
            return true;
        };
        return cfg;
    }

    uint64_t open() { return r.open(-1, now); }

    // HELLO; with a key, also checks the CHALLENGE's proof and answers it with AUTH.
    uint64_t connect(Role role) {
        uint64_t id = open();
        if (role == kRoleNone) return id;
        if (!r.config().has_key) {
            send(id, frame(kHello, 0, 0, 0, std::string(1, char(role))));
            return id;
        }
        send(id, frame(kHello, 0, 0, 0, std::string(1, char(role)) + kNp));
        send(id, frame(kAuth, 0, 0, 0, answer(id, role)));
        return id;
    }

    // Reads the CHALLENGE sent to `id` and returns the AUTH payload for it (empty if none).
    std::string answer(uint64_t id, Role role, bool check_router = true) {
        std::vector<Out> out = recv(id);
        if (out.size() != 1 || out[0].h.type != kChallenge ||
            out[0].payload.size() != kChallengePayload) {
            CHECK(false);
            return std::string();
        }
        const uint8_t* np = reinterpret_cast<const uint8_t*>(kNp.data());
        const uint8_t* nr = reinterpret_cast<const uint8_t*>(out[0].payload.data());
        uint8_t want[kProofSize], proof[kProofSize];
        auth_router_proof(r.config().key, role, np, nr, want);
        if (check_router) CHECK(std::memcmp(want, nr + kNonceSize, kProofSize) == 0);
        auth_peer_proof(r.config().key, role, np, nr, proof);
        return bytes(proof, sizeof proof);
    }
    void send(uint64_t id, const std::string& bytes) {
        Conn* c = r.get(id);
        c->in.feed(bytes.data(), bytes.size());
        r.input(id, now);
    }
    // Everything the router has written to `id` since the last call.
    std::vector<Out> recv(uint64_t id) {
        std::vector<Out> out;
        Conn* c = r.get(id);
        if (!c) return out;
        std::string bytes;
        struct iovec iov[OutBuf::kMaxIov];
        while (!c->out.empty()) {
            int n = c->out.fill_iov(iov, OutBuf::kMaxIov);
            size_t got = 0;
            for (int i = 0; i < n; i++) {
                bytes.append(static_cast<char*>(iov[i].iov_base), iov[i].iov_len);
                got += iov[i].iov_len;
            }
            c->out.consume(got);
        }
        FrameParser p(UINT32_MAX);
        p.feed(bytes.data(), bytes.size());
        Frame f;
        while (p.next(&f) == FrameParser::Status::kFrame)
            out.push_back({f.header, std::string(reinterpret_cast<const char*>(f.payload),
                                                 f.header.length)});
        return out;
    }
    void advance_ms(int64_t ms) {
        now += ms * 1000;
        r.tick(now);
    }
};

}  // namespace

TEST(round_trip_translates_ids) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, kFlagHighPriority, 42, 250, "body"));
    std::vector<Out> jobs = t.recv(w);
    CHECK_EQ(jobs.size(), 1u);
    if (jobs.size() != 1) return;
    CHECK_EQ(jobs[0].h.type, kJob);
    CHECK_EQ(jobs[0].h.flags, kFlagHighPriority);
    CHECK_EQ(jobs[0].h.timeout_ms, 250u);
    CHECK_EQ(jobs[0].payload, std::string("body"));
    uint64_t rid = jobs[0].h.job_id;
    CHECK(rid != 42);
    t.send(w, frame(kResult, 0, rid, 0, "html") + frame(kReady, 0, 0, 0));
    std::vector<Out> res = t.recv(m);
    CHECK_EQ(res.size(), 1u);
    CHECK_EQ(res[0].h.type, kResult);
    CHECK_EQ(res[0].h.job_id, 42u);
    CHECK_EQ(res[0].payload, std::string("html"));
    CHECK_EQ(t.r.stats().completed, 1u);
    CHECK_EQ(t.r.in_flight(), 0u);
}

TEST(lru_idle_worker_and_priority) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w1 = t.connect(kRoleWorker), w2 = t.connect(kRoleWorker);
    t.send(m, frame(kSubmit, 0, 1, 0, "n1"));
    t.send(m, frame(kSubmit, 0, 2, 0, "n2"));
    t.send(m, frame(kSubmit, kFlagHighPriority, 3, 0, "h3"));
    CHECK_EQ(t.r.queued(), 3u);
    t.send(w2, frame(kReady, 0, 0, 0));
    t.send(w1, frame(kReady, 0, 0, 0));
    CHECK_EQ(t.recv(w2)[0].payload, std::string("h3"));
    CHECK_EQ(t.recv(w1)[0].payload, std::string("n1"));
}

TEST(lru_order_among_idle_workers) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w[3] = {t.connect(kRoleWorker), t.connect(kRoleWorker), t.connect(kRoleWorker)};
    t.send(w[1], frame(kReady, 0, 0, 0));
    t.send(w[2], frame(kReady, 0, 0, 0));
    t.send(w[0], frame(kReady, 0, 0, 0));
    t.send(w[1], frame(kReady, 0, 0, 0));  // already idle: keeps its place
    t.send(m, frame(kSubmit, 0, 1, 0, "a"));
    t.send(m, frame(kSubmit, 0, 2, 0, "b"));
    t.send(m, frame(kSubmit, 0, 3, 0, "c"));
    CHECK_EQ(t.recv(w[1])[0].payload, std::string("a"));
    CHECK_EQ(t.recv(w[2])[0].payload, std::string("b"));
    CHECK_EQ(t.recv(w[0])[0].payload, std::string("c"));
}

TEST(busy_when_queue_full) {
    RouterConfig cfg;
    cfg.max_queue = 2;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    for (uint64_t i = 1; i <= 3; i++) t.send(m, frame(kSubmit, 0, i, 0, "x"));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kBusy);
    CHECK_EQ(out[0].h.job_id, 3u);
    CHECK_EQ(t.r.stats().busy, 1u);
}

TEST(busy_on_bytes_but_not_with_idle_worker) {
    RouterConfig cfg;
    cfg.max_queue_bytes = 4;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 1, 0, "0123456789"));  // straight to the worker
    t.send(m, frame(kSubmit, 0, 2, 0, "0123456789"));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kBusy);
    CHECK_EQ(out[0].h.job_id, 2u);
    CHECK_EQ(t.recv(w).size(), 1u);
}

TEST(queued_timeout_never_delivered) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 5, 100, "x"));
    t.advance_ms(99);
    CHECK(t.recv(m).empty());
    t.advance_ms(1);
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kTimeout);
    CHECK_EQ(out[0].h.job_id, 5u);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    CHECK(t.recv(w).empty());
}

TEST(default_timeout_applies) {
    RouterConfig cfg;
    cfg.default_timeout_ms = 50;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 5, 0, "x"));
    CHECK_EQ(t.r.next_deadline(), t.now + 50000);
    t.advance_ms(50);
    CHECK_EQ(t.recv(m).size(), 1u);
}

TEST(in_flight_timeout_drops_late_result) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 9, 100, "x"));
    uint64_t rid = t.recv(w)[0].h.job_id;
    t.advance_ms(100);
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kTimeout);
    t.send(w, frame(kResult, 0, rid, 0, "late") + frame(kReady, 0, 0, 0));
    CHECK(t.recv(m).empty());
    CHECK_EQ(t.r.stats().dropped, 1u);
    // The worker is usable again and the master may reuse its id.
    t.send(m, frame(kSubmit, 0, 9, 100, "y"));
    CHECK_EQ(t.recv(w)[0].payload, std::string("y"));
}

TEST(worker_lost_mid_job) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 11, 0, "x"));
    t.r.closed(w);
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kError);
    CHECK_EQ(out[0].h.flags, kErrWorkerLost);
    CHECK_EQ(out[0].h.job_id, 11u);
    CHECK_EQ(t.r.in_flight(), 0u);
}

TEST(master_lost_drops_queue_and_discards_results) {
    Harness t;
    uint64_t m1 = t.connect(kRoleMaster), m2 = t.connect(kRoleMaster);
    uint64_t w1 = t.connect(kRoleWorker), w2 = t.connect(kRoleWorker);
    t.send(w1, frame(kReady, 0, 0, 0));
    t.send(m1, frame(kSubmit, 0, 1, 0, "inflight"));
    t.send(m1, frame(kSubmit, 0, 2, 0, "queued"));
    t.send(m2, frame(kSubmit, 0, 1, 0, "other"));
    uint64_t rid = t.recv(w1)[0].h.job_id;
    t.r.closed(m1);
    CHECK_EQ(t.r.queued(), 1u);
    t.send(w2, frame(kReady, 0, 0, 0));
    std::vector<Out> got = t.recv(w2);
    CHECK_EQ(got.size(), 1u);
    CHECK_EQ(got[0].payload, std::string("other"));
    t.send(w1, frame(kResult, 0, rid, 0, "r"));
    CHECK(t.recv(m2).empty());
    CHECK_EQ(t.r.stats().dropped, 2u);
}

TEST(cancel_queued_and_in_flight) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 1, 0, "a"));
    t.send(m, frame(kSubmit, 0, 2, 0, "b"));
    uint64_t rid = t.recv(w)[0].h.job_id;
    t.send(m, frame(kCancel, 0, 2, 0) + frame(kCancel, 0, 1, 0) + frame(kCancel, 0, 99, 0));
    CHECK_EQ(t.r.queued(), 0u);
    CHECK_EQ(t.r.stats().cancelled, 2u);
    t.send(w, frame(kResult, 0, rid, 0, "r") + frame(kReady, 0, 0, 0));
    CHECK(t.recv(m).empty());
    CHECK(t.recv(w).empty());
}

TEST(duplicate_id_rejected) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 1, 0, "a") + frame(kSubmit, 0, 1, 0, "b"));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kError);
    CHECK_EQ(out[0].h.flags, kErrRejected);
    CHECK_EQ(t.r.queued(), 1u);
}

TEST(protocol_errors_close_only_the_offender) {
    struct Bad {
        Role role;
        std::string bytes;
    };
    std::vector<Bad> bad = {
        {kRoleNone, "GET / HTTP/1.1\r\n"},
        {kRoleNone, frame(kSubmit, 0, 1, 0, "x")},
        {kRoleMaster, frame(kReady, 0, 0, 0)},
        {kRoleWorker, frame(kSubmit, 0, 1, 0)},
        {kRoleMaster, frame(kHello, 0, 0, 0, "\x01")},
        {kRoleNone, frame(kHello, 0, 0, 0, "\x03")},
        {kRoleMaster, frame(kSubmit, 0x0004, 1, 0)},
        {kRoleMaster, frame(kJob, 0, 1, 0)},
    };
    for (const Bad& b : bad) {
        Harness t;
        uint64_t good = t.connect(kRoleMaster);
        uint64_t w = t.connect(kRoleWorker);
        uint64_t c = t.connect(b.role);
        t.send(c, b.bytes);
        std::vector<Out> out = t.recv(c);
        CHECK_EQ(out.size(), 1u);
        if (out.size() == 1) CHECK_EQ(out[0].h.type, kProtocolError);
        CHECK(t.r.get(c)->state == ConnState::kClosing);
        t.send(w, frame(kReady, 0, 0, 0));
        t.send(good, frame(kSubmit, 0, 1, 0, "ok"));
        CHECK_EQ(t.recv(w).size(), 1u);
        CHECK_EQ(t.r.stats().protocol_errors, 1u);
    }
}

TEST(protocol_error_by_worker_holding_job_is_worker_lost) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 3, 0, "x"));
    t.send(w, "garbage");
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.flags, kErrWorkerLost);
}

TEST(stats_keys) {
    Harness t;
    uint64_t c = t.connect(kRoleMaster);
    t.send(c, frame(kStats, 0, 77, 0));
    std::vector<Out> out = t.recv(c);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kStats);
    CHECK_EQ(out[0].h.job_id, 77u);
    for (const char* key : {"queued", "queued_bytes", "in_flight", "workers_idle", "workers_busy",
                            "masters", "workers", "submitted", "completed", "errors", "timeouts",
                            "busy", "cancelled", "dropped", "protocol_errors", "auth_failures",
                            "peers_refused", "handshake_timeouts", "pending", "evicted_pending",
                            "frame_timeouts"})
        CHECK(out[0].payload.find(std::string("\"") + key + "\":") != std::string::npos);
}

TEST(shutdown_answers_everything) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 1, 0, "a") + frame(kSubmit, 0, 2, 0, "b"));
    t.r.shutdown();
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 2u);
    for (const Out& o : out) {
        CHECK_EQ(o.h.type, kError);
        CHECK_EQ(o.h.flags, kErrShutdown);
    }
    t.send(m, frame(kSubmit, 0, 3, 0, "c"));
    out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.flags, kErrShutdown);
}

TEST(output_cap_disconnects_slow_master) {
    RouterConfig cfg;
    cfg.max_output = 1000;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(m, frame(kSubmit, 0, 1, 0, "a") + frame(kSubmit, 0, 2, 0, "b"));
    t.send(w, frame(kReady, 0, 0, 0));
    uint64_t rid = t.recv(w)[0].h.job_id;
    // The master never reads; a big result pushes it over the cap.
    t.send(w, frame(kResult, 0, rid, 0, std::string(2000, 'r')) + frame(kReady, 0, 0, 0));
    CHECK(t.r.get(m)->state == ConnState::kDead);
    CHECK_EQ(t.r.queued(), 0u);  // its queued job was dropped with it
    CHECK(t.recv(w).empty());
}

TEST(result_for_unheld_job_is_dropped) {
    Harness t;
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kResult, 0, 12345, 0, "x"));
    CHECK_EQ(t.r.stats().dropped, 1u);
    CHECK(t.r.get(w)->state == ConnState::kOpen);
}

TEST(many_jobs_reuse_slots) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    for (uint64_t i = 1; i <= 20000; i++) {
        t.send(m, frame(kSubmit, 0, i, 0, "p"));
        std::vector<Out> j = t.recv(w);
        if (j.size() != 1) {
            CHECK_EQ(j.size(), 1u);
            return;
        }
        t.send(w, frame(kResult, 0, j[0].h.job_id, 0, "r") + frame(kReady, 0, 0, 0));
        std::vector<Out> r = t.recv(m);
        if (r.size() != 1 || r[0].h.job_id != i) {
            CHECK(false);
            return;
        }
    }
    CHECK_EQ(t.r.stats().completed, 20000u);
}

TEST(drain_answers_queued_and_lets_in_flight_finish) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    uint64_t idle = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 1, 0, "a") + frame(kSubmit, 0, 2, 0, "b"));
    std::vector<Out> job = t.recv(w);
    CHECK_EQ(job.size(), 1u);
    t.r.drain();
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.job_id, 2u);
    CHECK_EQ(out[0].h.flags, kErrShutdown);
    CHECK_EQ(t.r.in_flight(), 1u);
    t.send(idle, frame(kReady, 0, 0, 0));  // no new work during the drain
    t.send(m, frame(kSubmit, 0, 3, 0, "c"));
    CHECK_EQ(t.recv(idle).size(), 0u);
    out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.flags, kErrShutdown);
    t.send(w, frame(kResult, 0, job[0].h.job_id, 0, "done"));
    out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kResult);
    CHECK_EQ(t.r.in_flight(), 0u);
}

TEST(stats_percentiles_of_queue_wait_and_service) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(m, frame(kSubmit, 0, 1, 0, "a"));
    t.now += 7000;  // queued 7 ms
    t.send(w, frame(kReady, 0, 0, 0));
    std::vector<Out> job = t.recv(w);
    t.now += 20000;  // served in 20 ms
    t.send(w, frame(kResult, 0, job[0].h.job_id, 0, "r"));
    std::string js = t.r.stats_json();
    auto value = [&](const char* key) {
        size_t at = js.find(std::string("\"") + key + "\":");
        return at == std::string::npos ? -1L : std::atol(js.c_str() + at + std::strlen(key) + 3);
    };
    CHECK(value("queue_wait_p50_us") >= 6600 && value("queue_wait_p50_us") <= 7400);
    CHECK(value("service_p99_us") >= 19000 && value("service_p99_us") <= 21000);
}

TEST(withdraw_queued_job_is_taken_and_never_delivered) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 1, 0, "one") + frame(kSubmit, 0, 2, 0, "two") +
                  frame(kSubmit, 0, 3, 0, "three"));
    CHECK_EQ(t.r.queued(), 3u);
    // Newest first, as a master waiting on its own page does.
    t.send(m, frame(kWithdraw, 0, 3, 0));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    if (out.size() != 1) return;
    CHECK_EQ(out[0].h.type, kWithdrawn);
    CHECK_EQ(out[0].h.flags, kFlagTaken);
    CHECK_EQ(out[0].h.job_id, 3u);
    CHECK_EQ(out[0].payload, std::string());
    CHECK_EQ(t.r.queued(), 2u);
    CHECK_EQ(t.r.stats().withdrawn, 1u);
    // A worker takes from the head; the withdrawn job never reaches one.
    uint64_t w = t.connect(kRoleWorker);
    std::vector<std::string> seen;
    t.send(w, frame(kReady, 0, 0, 0));
    for (int i = 0; i < 3; i++) {
        std::vector<Out> jobs = t.recv(w);
        if (jobs.empty()) break;
        seen.push_back(jobs[0].payload);
        t.send(w, frame(kResult, 0, jobs[0].h.job_id, 0, "r") + frame(kReady, 0, 0, 0));
    }
    CHECK_EQ(seen.size(), 2u);
    if (seen.size() == 2) {
        CHECK_EQ(seen[0], std::string("one"));
        CHECK_EQ(seen[1], std::string("two"));
    }
    out = t.recv(m);
    CHECK_EQ(out.size(), 2u);
    for (const Out& o : out) CHECK_EQ(o.h.type, kResult);
    // The id is free again at once, and nothing is left behind.
    t.send(m, frame(kSubmit, 0, 3, 0, "again"));
    CHECK_EQ(t.recv(w)[0].payload, std::string("again"));
    t.r.closed(m);
    t.r.closed(w);
    CHECK(t.r.stats_json().find("\"jobs_live\":0,") != std::string::npos);
}

TEST(withdraw_in_flight_job_is_not_taken_and_its_result_follows) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 8, 0, "x"));
    uint64_t rid = t.recv(w)[0].h.job_id;
    t.send(m, frame(kWithdraw, 0, 8, 0));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    if (out.size() != 1) return;
    CHECK_EQ(out[0].h.type, kWithdrawn);
    CHECK_EQ(out[0].h.flags, 0);
    CHECK_EQ(out[0].h.job_id, 8u);
    CHECK_EQ(t.r.in_flight(), 1u);
    t.send(w, frame(kResult, 0, rid, 0, "html"));
    out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) {
        CHECK_EQ(out[0].h.type, kResult);
        CHECK_EQ(out[0].payload, std::string("html"));
    }
    CHECK_EQ(t.r.stats().withdraw_missed, 1u);
    CHECK_EQ(t.r.stats().withdrawn, 0u);
}

TEST(withdraw_answered_cancelled_or_unknown_is_not_taken_after_the_answer) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 1, 10, "x"));
    t.advance_ms(10);  // answered TIMEOUT while queued
    t.send(m, frame(kSubmit, 0, 2, 0, "y") + frame(kCancel, 0, 2, 0));
    t.send(m, frame(kWithdraw, 0, 1, 0) + frame(kWithdraw, 0, 2, 0) + frame(kWithdraw, 0, 77, 0));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 4u);
    if (out.size() != 4) return;
    CHECK_EQ(out[0].h.type, kTimeout);  // the earlier answer comes first
    for (size_t i = 1; i < 4; i++) {
        CHECK_EQ(out[i].h.type, kWithdrawn);
        CHECK_EQ(out[i].h.flags, 0);
    }
    CHECK_EQ(out[1].h.job_id, 1u);
    CHECK_EQ(out[2].h.job_id, 2u);
    CHECK_EQ(out[3].h.job_id, 77u);
    CHECK_EQ(t.r.stats().withdraw_missed, 3u);
}

TEST(withdraw_is_only_for_the_submitting_connection) {
    Harness t;
    uint64_t m1 = t.connect(kRoleMaster), m2 = t.connect(kRoleMaster);
    t.send(m1, frame(kSubmit, 0, 5, 0, "mine"));
    t.send(m2, frame(kWithdraw, 0, 5, 0));
    std::vector<Out> out = t.recv(m2);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) CHECK_EQ(out[0].h.flags, 0);
    CHECK_EQ(t.r.queued(), 1u);
    CHECK(t.recv(m1).empty());
}

TEST(ready_and_withdraw_race_is_decided_by_arrival_order) {
    // READY first: the worker gets the job, the master is told not taken.
    {
        Harness t;
        uint64_t m = t.connect(kRoleMaster);
        uint64_t w = t.connect(kRoleWorker);
        t.send(m, frame(kSubmit, 0, 1, 0, "x"));
        t.send(w, frame(kReady, 0, 0, 0));
        t.send(m, frame(kWithdraw, 0, 1, 0));
        CHECK_EQ(t.recv(w).size(), 1u);
        std::vector<Out> out = t.recv(m);
        CHECK_EQ(out.size(), 1u);
        if (out.size() == 1) CHECK_EQ(out[0].h.flags, 0);
    }
    // WITHDRAW first: the master has it, the worker stays idle and gets the next job.
    {
        Harness t;
        uint64_t m = t.connect(kRoleMaster);
        uint64_t w = t.connect(kRoleWorker);
        t.send(m, frame(kSubmit, 0, 1, 0, "x"));
        t.send(m, frame(kWithdraw, 0, 1, 0));
        t.send(w, frame(kReady, 0, 0, 0));
        CHECK(t.recv(w).empty());
        std::vector<Out> out = t.recv(m);
        CHECK_EQ(out.size(), 1u);
        if (out.size() == 1) CHECK_EQ(out[0].h.flags, kFlagTaken);
        t.send(m, frame(kSubmit, 0, 2, 0, "next"));
        std::vector<Out> jobs = t.recv(w);
        CHECK_EQ(jobs.size(), 1u);
        if (jobs.size() == 1) CHECK_EQ(jobs[0].payload, std::string("next"));
    }
}

TEST(withdraw_of_a_high_priority_job_and_queue_bytes) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, kFlagHighPriority, 1, 0, "12345") + frame(kSubmit, 0, 2, 0, "678"));
    t.send(m, frame(kWithdraw, 0, 1, 0));
    CHECK_EQ(t.recv(m)[0].h.flags, kFlagTaken);
    CHECK(t.r.stats_json().find("\"queued_bytes\":3,") != std::string::npos);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    CHECK_EQ(t.recv(w)[0].payload, std::string("678"));
}

TEST(withdraw_during_drain_is_not_taken_and_answers_once) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 1, 0, "queued"));
    t.r.drain();
    t.send(m, frame(kWithdraw, 0, 1, 0));
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 2u);
    if (out.size() != 2) return;
    CHECK_EQ(out[0].h.type, kError);
    CHECK_EQ(out[0].h.flags, kErrShutdown);
    CHECK_EQ(out[1].h.type, kWithdrawn);
    CHECK_EQ(out[1].h.flags, 0);
    CHECK_EQ(t.r.stats().withdrawn, 0u);
}

TEST(withdraw_frames_that_break_the_rules) {
    struct Bad {
        Role role;
        std::string bytes;
        const char* reason;
    };
    std::vector<Bad> bad = {
        {kRoleMaster, frame(kWithdraw, 0, 1, 0, "x"), "WITHDRAW payload must be empty"},
        {kRoleMaster, frame(kWithdraw, kFlagTaken, 1, 0), "unknown flag bits 0x0001 in WITHDRAW"},
        {kRoleWorker, frame(kWithdraw, 0, 1, 0), "WITHDRAW is not allowed on a worker"},
        {kRoleNone, frame(kWithdraw, 0, 1, 0), "WITHDRAW before HELLO"},
        {kRoleMaster, frame(kWithdrawn, 0, 1, 0), "WITHDRAWN is not allowed on a master"},
    };
    for (const Bad& b : bad) {
        Harness t;
        uint64_t c = t.connect(b.role);
        if (b.role == kRoleMaster) t.send(c, frame(kSubmit, 0, 1, 0, "q"));
        t.send(c, b.bytes);
        std::vector<Out> out = t.recv(c);
        CHECK_EQ(out.size(), 1u);
        if (out.size() != 1) continue;
        CHECK_EQ(out[0].h.type, kProtocolError);
        CHECK_EQ(out[0].payload.find(b.reason), 0u);
        CHECK_EQ(t.r.queued(), 0u);  // the offender's queued job went with it
    }
}

TEST(load_follows_workers_queue_and_recent_durations) {
    Harness t;
    RouterLoad l = t.r.load();
    CHECK_EQ(l.workers, 0u);
    CHECK_EQ(l.service_ewma_us, 0u);
    CHECK_EQ(l.queue_wait_ewma_us, 0u);
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w1 = t.connect(kRoleWorker), w2 = t.connect(kRoleWorker);
    t.connect(kRoleNone);  // not a worker until HELLO
    CHECK_EQ(t.r.load().workers, 2u);
    CHECK_EQ(t.r.load().workers_idle, 0u);
    t.send(m, frame(kSubmit, 0, 1, 0, "a") + frame(kSubmit, 0, 2, 0, "b"));
    CHECK_EQ(t.r.load().queued, 2u);
    t.now += 4000;  // both queued 4 ms
    t.send(w1, frame(kReady, 0, 0, 0));
    l = t.r.load();
    CHECK_EQ(l.queued, 1u);
    CHECK_EQ(l.in_flight, 1u);
    CHECK_EQ(l.queue_wait_ewma_us, 4000u);  // the first sample as is
    t.now += 4000;
    t.send(w2, frame(kReady, 0, 0, 0));
    CHECK_EQ(t.r.load().queue_wait_ewma_us, 4500u);  // 4000 + (8000 - 4000) / 8
    uint64_t j1 = t.recv(w1)[0].h.job_id, j2 = t.recv(w2)[0].h.job_id;
    t.now += 16000;
    t.send(w1, frame(kResult, 0, j1, 0, "r") + frame(kReady, 0, 0, 0));
    l = t.r.load();
    CHECK_EQ(l.service_ewma_us, 20000u);  // dispatched 4 ms + 16 ms ago
    CHECK_EQ(l.workers_idle, 1u);
    CHECK_EQ(l.in_flight, 1u);
    t.r.drain();
    CHECK(t.r.load().stopping);
    t.now += 8000;
    t.send(w2, frame(kResult, 0, j2, 0, "r"));
    CHECK_EQ(t.r.load().service_ewma_us, 20500u);  // 20000 + (24000 - 20000) / 8
    t.r.closed(w1);
    CHECK_EQ(t.r.load().workers, 1u);
    CHECK_EQ(t.r.load().workers_idle, 0u);
}

TEST(late_results_count_in_the_service_average_but_not_the_percentiles) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t w = t.connect(kRoleWorker);
    t.send(w, frame(kReady, 0, 0, 0));
    t.send(m, frame(kSubmit, 0, 1, 10, "x"));
    uint64_t rid = t.recv(w)[0].h.job_id;
    t.advance_ms(30);  // timed out at 10 ms; the worker answers at 30
    t.send(w, frame(kResult, 0, rid, 0, "late"));
    CHECK_EQ(t.r.load().service_ewma_us, 30000u);
    CHECK(t.r.stats_json().find("\"service_p50_us\":0,") != std::string::npos);
    CHECK(t.r.stats_json().find("\"service_ewma_us\":30000,") != std::string::npos);
}

TEST(load_compares_field_by_field) {
    RouterLoad a, b;
    CHECK(a == b);
    b.queue_wait_ewma_us = 1;
    CHECK(a != b);
    b = a;
    b.stopping = true;
    CHECK(a != b);
}

// ---- handshake (PROTOCOL.md "Handshake") ---------------------------------------------------

namespace {

// PROTOCOL.md "Examples (hex)": CHALLENGE for Nr = 32 x 22 and the master's AUTH.
const std::string kDocRouterProof = bytes(
    std::vector<uint8_t>{0x2b, 0xd7, 0x97, 0xe6, 0xe9, 0xbf, 0x0a, 0x29, 0x45, 0x5b, 0xe6,
                         0x1d, 0xec, 0xda, 0x02, 0xf1, 0x7e, 0xd4, 0x9c, 0x1d, 0x3d, 0xfa,
                         0xa3, 0x39, 0x1d, 0xc6, 0x88, 0x25, 0x35, 0xa5, 0x64, 0x55}
        .data(),
    32);
const std::string kDocPeerProof = bytes(
    std::vector<uint8_t>{0x4e, 0x77, 0x31, 0x99, 0x1c, 0x07, 0x66, 0xa0, 0x1f, 0xff, 0xec,
                         0x11, 0x75, 0xbb, 0x12, 0x9e, 0xf4, 0xdc, 0x45, 0x41, 0xbe, 0x7e,
                         0x88, 0xd7, 0x7c, 0x7b, 0x3a, 0x0f, 0xe3, 0x51, 0x0a, 0x11}
        .data(),
    32);

std::string hello(Role role, const std::string& np = kNp) {
    return frame(kHello, 0, 0, 0, std::string(1, char(role)) + np);
}

// One PROTOCOL_ERROR whose reason starts with `reason`, and the connection is closing.
void check_refused(Harness& t, uint64_t id, const char* reason) {
    std::vector<Out> out = t.recv(id);
    CHECK_EQ(out.size(), 1u);
    if (out.size() != 1) return;
    CHECK_EQ(out[0].h.type, kProtocolError);
    CHECK_EQ(out[0].payload.substr(0, std::strlen(reason)), std::string(reason));
    CHECK(t.r.get(id)->state == ConnState::kClosing);
    CHECK_EQ(t.r.get(id)->role, kRoleNone);
}

}  // namespace

TEST(handshake_reproduces_the_protocol_examples) {
    Harness t;
    uint64_t c = t.open();
    CHECK_EQ(t.r.unauthenticated(), 1u);
    t.send(c, hello(kRoleMaster));
    std::vector<Out> out = t.recv(c);
    CHECK_EQ(out.size(), 1u);
    if (out.size() != 1) return;
    CHECK_EQ(out[0].h.type, kChallenge);
    CHECK_EQ(out[0].h.job_id, 0u);
    CHECK_EQ(out[0].payload, std::string(32, '\x22') + kDocRouterProof);
    CHECK_EQ(t.r.get(c)->role, kRoleNone);  // not a master until AUTH
    t.send(c, frame(kAuth, 0, 0, 0, kDocPeerProof));
    CHECK(t.recv(c).empty());  // nothing is sent on success
    CHECK_EQ(t.r.get(c)->role, kRoleMaster);
    CHECK_EQ(t.r.unauthenticated(), 0u);
    CHECK_EQ(t.r.stats().auth_failures, 0u);
    CHECK_EQ(t.r.stats().protocol_errors, 0u);
}

TEST(wrong_proof_is_refused_and_counted) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    uint64_t c = t.open();
    t.send(c, hello(kRoleWorker));
    std::string proof = t.answer(c, kRoleWorker);
    proof[31] ^= 1;
    t.send(c, frame(kAuth, 0, 0, 0, proof) + frame(kReady, 0, 0, 0));
    check_refused(t, c, "authentication failed");
    CHECK_EQ(t.r.stats().auth_failures, 1u);
    CHECK_EQ(t.r.load().workers, 0u);
    // A proof for another role (HELLO said worker, AUTH proves master) is wrong too.
    uint64_t d = t.open();
    t.send(d, hello(kRoleWorker));
    std::string as_master;
    {
        std::vector<Out> out = t.recv(d);
        CHECK_EQ(out.size(), 1u);
        uint8_t p[kProofSize];
        auth_peer_proof(t.r.config().key, kRoleMaster,
                        reinterpret_cast<const uint8_t*>(kNp.data()),
                        reinterpret_cast<const uint8_t*>(out[0].payload.data()), p);
        as_master = bytes(p, sizeof p);
    }
    t.send(d, frame(kAuth, 0, 0, 0, as_master));
    check_refused(t, d, "authentication failed");
    // A short proof is an authentication failure as well.
    uint64_t e = t.open();
    t.send(e, hello(kRoleMaster));
    t.recv(e);
    t.send(e, frame(kAuth, 0, 0, 0, std::string(31, 'x')));
    check_refused(t, e, "authentication failed: AUTH must carry a 32-byte proof");
    CHECK_EQ(t.r.stats().auth_failures, 3u);
    // The authenticated master was never disturbed.
    CHECK(t.r.get(m)->state == ConnState::kOpen);
    CHECK_EQ(t.r.load().workers, 0u);
}

TEST(a_recorded_auth_replayed_on_a_new_connection_is_refused) {
    Harness t;
    uint64_t a = t.open();
    t.send(a, hello(kRoleWorker));
    std::string recorded = t.answer(a, kRoleWorker);
    t.send(a, frame(kAuth, 0, 0, 0, recorded));
    CHECK_EQ(t.r.get(a)->role, kRoleWorker);
    // Same HELLO, same AUTH, but the router picked a new Nr.
    uint64_t b = t.open();
    t.send(b, hello(kRoleWorker));
    std::vector<Out> ch = t.recv(b);
    CHECK_EQ(ch.size(), 1u);
    t.send(b, frame(kAuth, 0, 0, 0, recorded));
    check_refused(t, b, "authentication failed");
    // The router's own proof replayed as a peer proof is refused: the labels differ.
    uint64_t c = t.open();
    t.send(c, hello(kRoleMaster));
    std::vector<Out> out = t.recv(c);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) t.send(c, frame(kAuth, 0, 0, 0, out[0].payload.substr(kNonceSize)));
    check_refused(t, c, "authentication failed");
}

TEST(handshake_frames_out_of_order) {
    struct Case {
        std::string bytes;
        const char* reason;
    };
    std::string auth = frame(kAuth, 0, 0, 0, std::string(32, 'p'));
    std::vector<Case> cases = {
        {auth, "AUTH before HELLO"},
        {frame(kStats, 0, 1, 0), "STATS before HELLO"},
        {frame(kSubmit, 0, 1, 0, "x"), "SUBMIT before HELLO"},
        {hello(kRoleMaster) + frame(kSubmit, 0, 1, 0, "x"), "SUBMIT before AUTH"},
        {hello(kRoleMaster) + frame(kStats, 0, 1, 0), "STATS before AUTH"},
        {hello(kRoleWorker) + frame(kReady, 0, 0, 0), "READY before AUTH"},
        {hello(kRoleWorker) + hello(kRoleWorker), "second HELLO"},
        {hello(kRoleMaster) + frame(kChallenge, 0, 0, 0, std::string(64, 'c')), "CHALLENGE before AUTH"},
        {frame(kHello, 0, 0, 0, std::string(1, '\x03') + kNp), "HELLO payload must start with one role byte"},
        {frame(kHello, 0, 0, 0, ""), "HELLO payload must start"},
        {frame(kHello, 0, 0, 0, "\x01"), "authentication required"},
        {frame(kHello, 0, 0, 0, "\x01" + kNp.substr(1)), "HELLO payload must be the role byte and a 32-byte nonce"},
        {frame(kHello, 1, 0, 0, "\x01" + kNp), "unknown flag bits 0x0001 in HELLO"},
    };
    for (const Case& k : cases) {
        Harness t;
        uint64_t c = t.open();
        t.send(c, k.bytes);
        std::vector<Out> out = t.recv(c);
        if (!out.empty() && out[0].h.type == kChallenge) out.erase(out.begin());
        CHECK_EQ(out.size(), 1u);
        if (out.size() != 1) continue;
        CHECK_EQ(out[0].h.type, kProtocolError);
        if (out[0].payload.find(k.reason) != 0)
            fprintf(stderr, "expected '%s', got '%s'\n", k.reason, out[0].payload.c_str());
        CHECK_EQ(out[0].payload.find(k.reason), 0u);
        CHECK(t.r.get(c)->state == ConnState::kClosing);
        CHECK_EQ(t.r.load().workers, 0u);
        CHECK_EQ(t.r.stats().protocol_errors, 1u);
    }
}

TEST(no_auth_router_takes_the_one_byte_hello_only) {
    Harness t(no_auth());
    uint64_t m = t.connect(kRoleMaster);
    CHECK_EQ(t.r.get(m)->role, kRoleMaster);
    CHECK(t.recv(m).empty());  // the router does not answer it
    uint64_t c = t.open();
    t.send(c, hello(kRoleMaster));
    check_refused(t, c, "this router has no key");
    uint64_t d = t.open();
    t.send(d, frame(kAuth, 0, 0, 0, std::string(32, 'p')));
    check_refused(t, d, "AUTH before HELLO");
    uint64_t e = t.open();
    t.send(e, frame(kStats, 0, 1, 0));
    check_refused(t, e, "STATS before HELLO");
}

TEST(auth_may_share_a_write_with_the_next_frames) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 5, 0, "job"));
    uint64_t w = t.open();
    t.send(w, hello(kRoleWorker));
    std::string proof = t.answer(w, kRoleWorker);
    t.send(w, frame(kAuth, 0, 0, 0, proof) + frame(kReady, 0, 0, 0));
    std::vector<Out> jobs = t.recv(w);
    CHECK_EQ(jobs.size(), 1u);
    if (jobs.size() == 1) CHECK_EQ(jobs[0].payload, std::string("job"));
}

TEST(an_unauthenticated_worker_gets_no_job) {
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    t.send(m, frame(kSubmit, 0, 1, 0, "secret"));
    uint64_t w = t.open();
    t.send(w, hello(kRoleWorker) + frame(kReady, 0, 0, 0));
    std::vector<Out> out = t.recv(w);
    CHECK_EQ(out.size(), 2u);
    if (out.size() == 2) {
        CHECK_EQ(out[0].h.type, kChallenge);
        CHECK_EQ(out[1].h.type, kProtocolError);
    }
    CHECK_EQ(t.r.queued(), 1u);
    uint64_t good = t.connect(kRoleWorker);
    t.send(good, frame(kReady, 0, 0, 0));
    std::vector<Out> jobs = t.recv(good);
    CHECK_EQ(jobs.size(), 1u);
    if (jobs.size() == 1) CHECK_EQ(jobs[0].payload, std::string("secret"));
}

TEST(oversize_header_before_authentication_is_refused_from_the_header) {
    for (uint32_t len : {65u, 1u << 24, 0xffffffffu}) {
        Harness t;
        uint64_t c = t.open();
        const FrameHeader h{kSubmit, 0, 1, 0, len};
        uint8_t hdr[kHeaderSize];
        frame_encode_header(h, hdr);
        t.send(c, bytes(hdr, sizeof hdr) + "x");  // the header and one byte of the payload
        check_refused(t, c, "frame length exceeds 64 bytes before the handshake");
    }
    // The same header after authentication waits for its bytes in a buffer sized by them.
    Harness t;
    uint64_t m = t.connect(kRoleMaster);
    const FrameHeader h{kSubmit, 0, 1, 0, 1u << 24};
    uint8_t hdr[kHeaderSize];
    frame_encode_header(h, hdr);
    t.send(m, bytes(hdr, sizeof hdr) + "x");
    CHECK(t.r.get(m)->state == ConnState::kOpen);
    CHECK(t.r.get(m)->in.capacity() < 64 * 1024);
    // 64 bytes is the limit, not 63: a 64-byte HELLO is refused for its content, not its size.
    Harness u;
    uint64_t d = u.open();
    u.send(d, frame(kHello, 0, 0, 0, "\x01" + std::string(63, 'n')));
    check_refused(u, d, "HELLO payload must be the role byte and a 32-byte nonce");
}

TEST(handshake_deadline_and_idle_authenticated_connections) {
    RouterConfig cfg = keyed();
    cfg.handshake_ms = 2000;
    cfg.frame_ms = 10000;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    uint64_t silent = t.open();
    t.now += 500000;
    uint64_t halfway = t.open();
    t.send(halfway, hello(kRoleWorker));  // never answers the CHALLENGE
    CHECK_EQ(t.r.next_deadline(), t.now - 500000 + 2000000);
    t.advance_ms(1499);
    CHECK(t.r.get(silent)->state == ConnState::kOpen);
    t.advance_ms(1);
    check_refused(t, silent, "handshake timeout");
    CHECK(t.r.get(halfway)->state == ConnState::kOpen);
    t.advance_ms(500);
    std::vector<Out> out = t.recv(halfway);
    CHECK_EQ(out.size(), 2u);  // CHALLENGE, then the timeout
    if (out.size() == 2) CHECK_EQ(out[1].payload.find("handshake timeout"), 0u);
    CHECK_EQ(t.r.stats().handshake_timeouts, 2u);
    CHECK_EQ(t.r.unauthenticated(), 0u);
    // An authenticated connection that sends nothing is never closed for it.
    CHECK_EQ(t.r.next_deadline(), kNoDeadline);
    t.advance_ms(3600 * 1000);
    CHECK(t.r.get(m)->state == ConnState::kOpen);
    CHECK(t.recv(m).empty());
}

TEST(max_pending_closes_the_oldest_unauthenticated_connection) {
    RouterConfig cfg = keyed();
    cfg.max_pending = 3;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);  // authenticated: never evicted
    uint64_t p[4];
    for (uint64_t& id : p) {
        id = t.open();
        t.now += 1000;
    }
    check_refused(t, p[0], "too many connections waiting to authenticate");
    for (int i = 1; i < 4; i++) CHECK(t.r.get(p[i])->state == ConnState::kOpen);
    CHECK_EQ(t.r.unauthenticated(), 3u);
    CHECK_EQ(t.r.stats().evicted_pending, 1u);
    // One of them completes the handshake and leaves the pending set: room for another.
    t.send(p[2], hello(kRoleWorker));
    t.send(p[2], frame(kAuth, 0, 0, 0, t.answer(p[2], kRoleWorker)));
    CHECK_EQ(t.r.get(p[2])->role, kRoleWorker);
    uint64_t q = t.open();
    CHECK(t.r.get(p[1])->state == ConnState::kOpen);
    CHECK(t.r.get(q)->state == ConnState::kOpen);
    CHECK_EQ(t.r.stats().evicted_pending, 1u);
    t.open();
    check_refused(t, p[1], "too many connections waiting to authenticate");
    CHECK(t.r.get(m)->state == ConnState::kOpen);
    CHECK(t.r.stats_json().find("\"pending\":3,") != std::string::npos);
}

TEST(partial_frame_after_authentication_must_complete_in_time) {
    RouterConfig cfg = keyed();
    cfg.frame_ms = 1000;
    Harness t(cfg);
    uint64_t m = t.connect(kRoleMaster);
    std::string submit = frame(kSubmit, 0, 1, 0, std::string(100, 's'));
    t.send(m, submit.substr(0, 10));
    CHECK_EQ(t.r.next_deadline(), t.now + 1000000);
    t.advance_ms(600);
    t.send(m, submit.substr(10, 50));  // more of the same frame: the deadline does not move
    t.advance_ms(399);
    CHECK(t.r.get(m)->state == ConnState::kOpen);
    t.advance_ms(1);
    std::vector<Out> out = t.recv(m);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) CHECK_EQ(out[0].payload.find("frame not completed in time"), 0u);
    CHECK(t.r.get(m)->state == ConnState::kClosing);
    CHECK(t.r.stats_json().find("\"frame_timeouts\":1,") != std::string::npos);
    // A frame that completes, followed by the start of the next, restarts the clock.
    uint64_t n = t.connect(kRoleMaster);
    t.send(n, submit.substr(0, 50));
    t.advance_ms(900);
    t.send(n, submit.substr(50) + submit.substr(0, 5));
    t.advance_ms(900);
    CHECK(t.r.get(n)->state == ConnState::kOpen);
    t.send(n, submit.substr(5));
    t.advance_ms(5000);
    CHECK(t.r.get(n)->state == ConnState::kOpen);
    CHECK_EQ(t.r.queued(), 1u);
}

TEST(connections_per_role_are_capped) {
    RouterConfig cfg = keyed();
    cfg.max_workers = 2;
    cfg.max_masters = 1;
    Harness t(cfg);
    uint64_t w1 = t.connect(kRoleWorker);
    t.connect(kRoleWorker);
    uint64_t w3 = t.connect(kRoleWorker);
    std::vector<Out> out = t.recv(w3);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) CHECK_EQ(out[0].payload, std::string("too many workers (--max-workers 2)"));
    CHECK_EQ(t.r.load().workers, 2u);
    t.connect(kRoleMaster);
    uint64_t m2 = t.connect(kRoleMaster);
    out = t.recv(m2);
    CHECK_EQ(out.size(), 1u);
    if (out.size() == 1) CHECK_EQ(out[0].payload.find("too many masters"), 0u);
    t.r.closed(w1);
    uint64_t w4 = t.connect(kRoleWorker);
    CHECK_EQ(t.r.get(w4)->role, kRoleWorker);
}

TEST(peer_credentials_are_checked_on_open) {
    RouterConfig cfg = keyed();
    cfg.euid = 1000;
    cfg.allow_uids = {2000};
    cfg.allow_gids = {3000};
    Harness t(cfg);
    PeerCred same{true, 1000, 1000}, listed_uid{true, 2000, 9}, listed_gid{true, 9, 3000},
        stranger{true, 65534, 65534}, unknown{false, 0, 0};
    for (const PeerCred* ok : {&same, &listed_uid, &listed_gid}) {
        uint64_t id = t.r.open(-1, t.now, ok);
        CHECK(t.r.get(id)->state == ConnState::kOpen);
        CHECK(t.recv(id).empty());
    }
    uint64_t bad = t.r.open(-1, t.now, &stranger);
    check_refused(t, bad, "peer uid 65534 gid 65534 is not allowed");
    uint64_t unk = t.r.open(-1, t.now, &unknown);
    check_refused(t, unk, "peer credentials unavailable");
    CHECK_EQ(t.r.stats().peers_refused, 2u);
    CHECK_EQ(t.r.unauthenticated(), 3u);  // the refused ones are not waiting to authenticate
    // Without a key too.
    RouterConfig plain = no_auth();
    plain.euid = 1000;
    Harness u(plain);
    uint64_t id = u.r.open(-1, u.now, &stranger);
    check_refused(u, id, "peer uid 65534");
}

TEST_MAIN()
