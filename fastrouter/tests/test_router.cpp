// Unit tests of the routing core, driven through byte streams without sockets.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

struct Harness {
    Router r;
    int64_t now = 1000000;
    explicit Harness(RouterConfig cfg = RouterConfig()) : r(cfg) { log_set_quiet(true); }

    uint64_t connect(Role role) {
        uint64_t id = r.open(-1);
        if (role != kRoleNone) send(id, frame(kHello, 0, 0, 0, std::string(1, char(role))));
        return id;
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

TEST(stats_without_hello_and_keys) {
    Harness t;
    uint64_t c = t.connect(kRoleNone);
    t.send(c, frame(kStats, 0, 77, 0));
    std::vector<Out> out = t.recv(c);
    CHECK_EQ(out.size(), 1u);
    CHECK_EQ(out[0].h.type, kStats);
    CHECK_EQ(out[0].h.job_id, 77u);
    for (const char* key : {"queued", "queued_bytes", "in_flight", "workers_idle", "workers_busy",
                            "masters", "workers", "submitted", "completed", "errors", "timeouts",
                            "busy", "cancelled", "dropped", "protocol_errors"})
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

TEST(token_required_only_where_the_loop_says_so) {
    RouterConfig cfg;
    cfg.auth_token = "0123456789abcdef";
    Harness t(cfg);
    uint64_t unix_peer = t.r.open(-1, false);
    t.send(unix_peer, frame(kHello, 0, 0, 0, std::string(1, char(kRoleMaster))));
    CHECK_EQ(t.r.get(unix_peer)->role, kRoleMaster);
    uint64_t tcp_bad = t.r.open(-1, true);
    t.send(tcp_bad, frame(kHello, 0, 0, 0, std::string(1, char(kRoleMaster))));
    CHECK(t.r.get(tcp_bad)->state != ConnState::kOpen);
    uint64_t tcp_wrong = t.r.open(-1, true);
    t.send(tcp_wrong, frame(kHello, 0, 0, 0, std::string(1, char(kRoleMaster)) + "0123456789abcdeX"));
    CHECK(t.r.get(tcp_wrong)->state != ConnState::kOpen);
    uint64_t tcp_stats = t.r.open(-1, true);
    t.send(tcp_stats, frame(kStats, 0, 1, 0));
    CHECK(t.r.get(tcp_stats)->state != ConnState::kOpen);
    uint64_t tcp_ok = t.r.open(-1, true);
    t.send(tcp_ok, frame(kHello, 0, 0, 0, std::string(1, char(kRoleWorker)) + "0123456789abcdef"));
    CHECK_EQ(t.r.get(tcp_ok)->role, kRoleWorker);
    CHECK(t.r.get(tcp_ok)->state == ConnState::kOpen);
    CHECK_EQ(t.r.stats().protocol_errors, 3u);
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

TEST_MAIN()
