// Routing rules of PROTOCOL.md "Semantics"; see router.h.
#include "router.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "log.h"
#include "sha256.h"

namespace fr {

namespace {

constexpr size_t kKeepJobPayload = 256 << 10;

const char* role_name(Role r) {
    switch (r) {
        case kRoleMaster: return "master";
        case kRoleWorker: return "worker";
        default: return "unidentified";
    }
}

// What an authenticated connection may send; before that, Router::handshake() decides.
bool allowed(Role role, uint8_t type) {
    switch (role) {
        case kRoleNone: return false;
        case kRoleMaster:
            return type == kSubmit || type == kStats || type == kCancel || type == kWithdraw;
        case kRoleWorker: return type == kReady || type == kResult || type == kStats;
    }
    return false;
}

uint32_t slot_of(uint64_t id) { return static_cast<uint32_t>(id); }
uint32_t gen_of(uint64_t id) { return static_cast<uint32_t>(id >> 32); }
uint64_t make_id(uint32_t gen, uint32_t slot) { return (static_cast<uint64_t>(gen) << 32) | slot; }
uint32_t next_gen(uint32_t g) { return g + 1 == 0 ? 1 : g + 1; }

}  // namespace

Router::Router(const RouterConfig& cfg)
    : cfg_(cfg), queue_(cfg.max_queue, cfg.max_queue_bytes) {}

Router::~Router() = default;

// ---- connections -------------------------------------------------------------------------

uint64_t Router::open(int fd, int64_t now, const PeerCred* cred) {
    uint32_t slot;
    if (!conn_free_.empty()) {
        slot = conn_free_.back();
        conn_free_.pop_back();
    } else {
        slot = static_cast<uint32_t>(conns_.size());
        conns_.emplace_back();
        conn_gen_.push_back(0);
    }
    conn_gen_[slot] = next_gen(conn_gen_[slot]);
    conns_[slot].reset(new Conn());
    Conn* c = conns_[slot].get();
    c->id = make_id(conn_gen_[slot], slot);
    c->fd = fd;
    c->opened_at = now;
    // No frame before the handshake needs more; a larger length is refused from the header.
    c->in.set_max_payload(kMaxPreAuthPayload);
    live_conns_++;
    if (cred && !peer_allowed(*cred, cfg_.euid, cfg_.allow_uids, cfg_.allow_gids)) {
        stats_.peers_refused++;
        char reason[200];
        if (!cred->known)
            snprintf(reason, sizeof reason, "peer credentials unavailable (SO_PEERCRED failed)");
        else
            snprintf(reason, sizeof reason,
                     "peer uid %u gid %u is not allowed: only the router's own user, or one "
                     "given with --allow-uid or --allow-gid",
                     cred->uid, cred->gid);
        protocol_error(c, reason);
        return c->id;
    }
    if (unauth_.size >= cfg_.max_pending) {
        if (Conn* oldest = list_front(unauth_)) {
            stats_.evicted_pending++;
            protocol_error(oldest, "too many connections waiting to authenticate (--max-pending): "
                                   "closing the oldest");
        }
    }
    list_push(unauth_, &Conn::unauth_link, c);
    return c->id;
}

Conn* Router::get(uint64_t id) {
    uint32_t slot = slot_of(id);
    if (slot >= conns_.size() || !conns_[slot] || conn_gen_[slot] != gen_of(id)) return nullptr;
    return conns_[slot].get();
}

void Router::closed(uint64_t id) {
    Conn* c = get(id);
    if (!c) return;
    if (c->state == ConnState::kOpen && c->in.buffered() > 0 && !c->warned) {
        c->warned = true;
        log_peer("%s connection %" PRIu64 " closed in the middle of a frame (%zu bytes unparsed)",
                 role_name(c->role), c->id, c->in.buffered());
    }
    detach(c);
    drain_kills();
    conns_[slot_of(id)].reset();
    conn_free_.push_back(slot_of(id));
    live_conns_--;
}

void Router::list_push(ConnList& l, ListLinks Conn::*m, Conn* c) {
    ListLinks& k = c->*m;
    if (k.linked) return;
    uint32_t s = slot_of(c->id);
    k.linked = true;
    k.next = kNoSlot;
    k.prev = l.tail;
    if (l.tail != kNoSlot)
        (conns_[l.tail].get()->*m).next = s;
    else
        l.head = s;
    l.tail = s;
    l.size++;
}

void Router::list_remove(ConnList& l, ListLinks Conn::*m, Conn* c) {
    ListLinks& k = c->*m;
    if (!k.linked) return;
    if (k.prev != kNoSlot)
        (conns_[k.prev].get()->*m).next = k.next;
    else
        l.head = k.next;
    if (k.next != kNoSlot)
        (conns_[k.next].get()->*m).prev = k.prev;
    else
        l.tail = k.prev;
    k = ListLinks();
    l.size--;
}

Conn* Router::list_front(const ConnList& l) const {
    return l.head == kNoSlot ? nullptr : conns_[l.head].get();
}

void Router::mark(Conn* c) {
    if (!c->pending) {
        c->pending = true;
        pending_.push_back(c->id);
    }
}

void Router::take_pending(std::vector<uint64_t>* out) {
    out->clear();
    out->swap(pending_);
    for (uint64_t id : *out)
        if (Conn* c = get(id)) c->pending = false;
}

void Router::kill(Conn* c) {
    if (c->state == ConnState::kDead) return;
    log_peer("disconnecting %s connection %" PRIu64 ": %zu bytes of output unread (limit %zu)",
             role_name(c->role), c->id, c->out.size(), cfg_.max_output);
    c->state = ConnState::kDead;
    c->out.clear();
    idle_remove(c);
    kills_.push_back(c->id);
    mark(c);
}

void Router::drain_kills() {
    // detach() can kill further connections (a master whose output overflows while it is
    // told WORKER_LOST), so loop until quiet.
    while (!kills_.empty()) {
        uint64_t id = kills_.back();
        kills_.pop_back();
        if (Conn* c = get(id)) detach(c);
    }
}

void Router::detach(Conn* c) {
    list_remove(unauth_, &Conn::unauth_link, c);
    list_remove(partial_, &Conn::frame_link, c);
    c->frame_since = 0;
    if (c->role == kRoleMaster) {
        masters_--;
        queue_.remove_owner(c->id, [this](const QueueEntry& e) {
            stats_.dropped++;
            job_free(e.job);
        });
        c->jobs.for_each([this](uint64_t, uint64_t rid) {
            Job* j = job_get(rid);
            if (!j || j->orphan) return;
            j->orphan = true;
            if (j->in_flight) in_flight_--;
        });
        c->jobs.clear();
    } else if (c->role == kRoleWorker) {
        workers_--;
        idle_remove(c);
        if (c->job) {
            Job* j = job_get(c->job);
            c->job = 0;
            if (j) {
                in_flight_ -= j->orphan ? 0 : 1;
                if (!j->orphan)
                    answer(j, kError, kErrWorkerLost, "worker lost");
                else
                    job_free(make_id(j->gen, static_cast<uint32_t>(j - jobs_.data())));
            }
        }
    }
    c->role = kRoleNone;
}

// ---- jobs --------------------------------------------------------------------------------

uint64_t Router::job_alloc() {
    uint32_t slot;
    if (!job_free_.empty()) {
        slot = job_free_.back();
        job_free_.pop_back();
    } else {
        slot = static_cast<uint32_t>(jobs_.size());
        jobs_.emplace_back();
    }
    Job& j = jobs_[slot];
    j.gen = next_gen(j.gen);
    j.live = true;
    jobs_live_++;
    j.in_flight = false;
    j.orphan = false;
    j.flags = 0;
    j.master = j.master_job = j.worker = 0;
    j.qh = 0;
    j.deadline = kNoDeadline;
    j.payload.clear();
    return make_id(j.gen, slot);
}

Router::Job* Router::job_get(uint64_t id) {
    uint32_t slot = slot_of(id);
    if (slot >= jobs_.size()) return nullptr;
    Job& j = jobs_[slot];
    if (!j.live || j.gen != gen_of(id)) return nullptr;
    return &j;
}

void Router::job_free(uint64_t id) {
    Job* j = job_get(id);
    if (!j) return;
    j->live = false;
    jobs_live_--;
    // Keep modest payload buffers for the next job in this slot (a pool in all but name);
    // drop big ones so memory stays flat after a burst of large fragments.
    if (j->payload.capacity() > kKeepJobPayload)
        std::vector<uint8_t>().swap(j->payload);
    else
        j->payload.clear();
    job_free_.push_back(slot_of(id));
}

void Router::answer(Job* j, uint8_t type, uint16_t flags, const char* reason) {
    uint64_t rid = make_id(j->gen, static_cast<uint32_t>(j - jobs_.data()));
    Conn* m = get(j->master);
    if (m && m->role == kRoleMaster) {
        m->jobs.erase(j->master_job);
        send(m, type, flags, j->master_job, 0, reinterpret_cast<const uint8_t*>(reason),
             reason ? std::strlen(reason) : 0);
    }
    switch (type) {
        case kError: stats_.errors++; break;
        case kTimeout: stats_.timeouts++; break;
        case kBusy: stats_.busy++; break;
        default: break;
    }
    job_free(rid);
}

// ---- output ------------------------------------------------------------------------------

void Router::send(Conn* c, uint8_t type, uint16_t flags, uint64_t job_id, uint32_t timeout_ms,
                  const uint8_t* payload, size_t len) {
    if (c->state == ConnState::kDead) return;
    uint8_t hdr[kHeaderSize];
    const FrameHeader h{type, flags, job_id, timeout_ms, static_cast<uint32_t>(len)};
    frame_encode_header(h, hdr);
    c->out.append(hdr, sizeof hdr, payload, len);
    after_send(c);
}

void Router::send_owned(Conn* c, uint8_t type, uint16_t flags, uint64_t job_id,
                        uint32_t timeout_ms, std::vector<uint8_t>& payload) {
    if (c->state == ConnState::kDead) return;
    uint8_t hdr[kHeaderSize];
    const FrameHeader h{type, flags, job_id, timeout_ms, static_cast<uint32_t>(payload.size())};
    frame_encode_header(h, hdr);
    c->out.append_owned(hdr, sizeof hdr, payload);
    after_send(c);
}

void Router::after_send(Conn* c) {
    if (c->out.size() > cfg_.max_output)
        kill(c);
    else
        mark(c);
}

void Router::protocol_error(Conn* c, const char* reason) {
    stats_.protocol_errors++;
    if (!c->warned) {
        c->warned = true;
        log_peer("protocol error from %s connection %" PRIu64 ": %s; closing it",
                 role_name(c->role), c->id, reason);
    }
    send(c, kProtocolError, 0, 0, 0, reinterpret_cast<const uint8_t*>(reason),
         std::strlen(reason));
    if (c->state == ConnState::kOpen) c->state = ConnState::kClosing;
    detach(c);
    mark(c);
}

// ---- input -------------------------------------------------------------------------------

void Router::input(uint64_t id, int64_t now) {
    Conn* c = get(id);
    if (!c) return;
    // Expire first so a RESULT that arrives after its deadline is treated as late.
    tick(now);
    Frame f;
    bool handled_any = false;
    while (c->state == ConnState::kOpen) {
        FrameParser::Status st = c->in.next(&f);
        if (st == FrameParser::Status::kNeedMore) break;
        if (st == FrameParser::Status::kError) {
            if (c->role == kRoleNone && c->in.error() == DecodeError::kTooLong)
                protocol_error(c, "frame length exceeds 64 bytes before the handshake is complete "
                                  "(HELLO and AUTH are shorter)");
            else
                protocol_error(c, decode_error_message(c->in.error()));
            break;
        }
        handle(c, f, now);
        handled_any = true;
        drain_kills();
    }
    if (c->state != ConnState::kOpen)
        c->in = FrameParser(cfg_.max_frame);
    else
        track_partial_frame(c, handled_any, now);
    drain_kills();
}

void Router::track_partial_frame(Conn* c, bool handled_any, int64_t now) {
    if (c->role == kRoleNone) return;  // the handshake deadline covers it
    if (c->in.buffered() == 0) {
        list_remove(partial_, &Conn::frame_link, c);
        c->frame_since = 0;
        return;
    }
    // The same frame still arriving keeps its start; a frame begun in this read starts now.
    if (c->frame_link.linked && !handled_any) return;
    list_remove(partial_, &Conn::frame_link, c);
    c->frame_since = now;
    list_push(partial_, &Conn::frame_link, c);
}

void Router::handle(Conn* c, const Frame& f, int64_t now) {
    const FrameHeader& h = f.header;
    if (c->role == kRoleNone) {
        handshake(c, f);
        return;
    }
    if (!allowed(c->role, h.type)) {
        char reason[160];
        snprintf(reason, sizeof reason, "%s is not allowed on a %s connection",
                 frame_type_name(h.type), role_name(c->role));
        protocol_error(c, reason);
        return;
    }
    uint16_t allowed_flags = h.type == kSubmit ? (kFlagHighPriority | kFlagNoQueue) : 0;
    if (h.flags & ~allowed_flags) {
        char reason[120];
        snprintf(reason, sizeof reason, "unknown flag bits 0x%04x in %s", h.flags & ~allowed_flags,
                 frame_type_name(h.type));
        protocol_error(c, reason);
        return;
    }
    switch (h.type) {
        case kSubmit: on_submit(c, f, now); break;
        case kCancel: on_cancel(c, f); break;
        case kWithdraw: on_withdraw(c, f); break;
        case kReady: on_ready(c, now); break;
        case kResult: on_result(c, f, now); break;
        case kStats: on_stats(c, f); break;
        default: break;
    }
}

// ---- handshake (PROTOCOL.md "Handshake") --------------------------------------------------

void Router::handshake(Conn* c, const Frame& f) {
    const FrameHeader& h = f.header;
    char reason[160];
    if (c->hs == Handshake::kAwaitHello && h.type != kHello) {
        snprintf(reason, sizeof reason, "%s before HELLO (the first frame must be HELLO)",
                 frame_type_name(h.type));
        protocol_error(c, reason);
        return;
    }
    if (c->hs == Handshake::kAwaitAuth && h.type != kAuth) {
        if (h.type == kHello)
            snprintf(reason, sizeof reason, "second HELLO (answer the CHALLENGE with AUTH)");
        else
            snprintf(reason, sizeof reason,
                     "%s before AUTH (nothing but AUTH is accepted until the handshake is "
                     "complete)",
                     frame_type_name(h.type));
        protocol_error(c, reason);
        return;
    }
    if (h.flags != 0) {
        snprintf(reason, sizeof reason, "unknown flag bits 0x%04x in %s", h.flags,
                 frame_type_name(h.type));
        protocol_error(c, reason);
        return;
    }
    if (h.type == kHello)
        on_hello(c, f);
    else
        on_auth(c, f);
}

void Router::on_hello(Conn* c, const Frame& f) {
    const uint32_t len = f.header.length;
    if (len < 1 || (f.payload[0] != kRoleMaster && f.payload[0] != kRoleWorker)) {
        protocol_error(c, "HELLO payload must start with one role byte: 1 (master) or 2 (worker)");
        return;
    }
    const Role role = static_cast<Role>(f.payload[0]);
    char reason[200];
    if (!cfg_.has_key) {
        if (len == 1) {
            become(c, role);
        } else if (len == kHelloAuthPayload) {
            protocol_error(c, "this router has no key (--no-auth): send HELLO with the role byte "
                              "only, or give the router --auth-key-file");
        } else {
            snprintf(reason, sizeof reason,
                     "HELLO payload must be one role byte on a router without a key, not %u "
                     "bytes",
                     len);
            protocol_error(c, reason);
        }
        return;
    }
    if (len == 1) {
        protocol_error(c, "authentication required: this router has a key; send HELLO with the "
                          "role byte and a 32-byte nonce, then answer the CHALLENGE with AUTH");
        return;
    }
    if (len != kHelloAuthPayload) {
        snprintf(reason, sizeof reason,
                 "HELLO payload must be the role byte and a 32-byte nonce (33 bytes), not %u "
                 "bytes",
                 len);
        protocol_error(c, reason);
        return;
    }
    uint8_t challenge[kChallengePayload];
    uint8_t* nr = challenge;
    bool ok = cfg_.nonce_source ? cfg_.nonce_source(nr, kNonceSize) : random_bytes(nr, kNonceSize);
    if (!ok) {
        log_error("cannot read random bytes for a CHALLENGE (getrandom failed)");
        protocol_error(c, "the router could not make a nonce; try again");
        return;
    }
    const uint8_t* np = f.payload + 1;
    auth_router_proof(cfg_.key, role, np, nr, challenge + kNonceSize);
    auth_peer_proof(cfg_.key, role, np, nr, c->expect_proof);
    c->claimed = role;
    c->hs = Handshake::kAwaitAuth;
    send(c, kChallenge, 0, 0, 0, challenge, sizeof challenge);
}

void Router::on_auth(Conn* c, const Frame& f) {
    const uint32_t len = f.header.length;
    if (len != kProofSize) {
        stats_.auth_failures++;
        char reason[120];
        snprintf(reason, sizeof reason,
                 "authentication failed: AUTH must carry a 32-byte proof, not %u bytes", len);
        protocol_error(c, reason);
        return;
    }
    if (!constant_time_equal(f.payload, c->expect_proof, kProofSize)) {
        stats_.auth_failures++;
        protocol_error(c, "authentication failed: wrong proof in AUTH (this peer does not hold "
                          "the router's key)");
        return;
    }
    become(c, c->claimed);
}

void Router::become(Conn* c, Role role) {
    size_t& count = role == kRoleMaster ? masters_ : workers_;
    size_t limit = role == kRoleMaster ? cfg_.max_masters : cfg_.max_workers;
    if (count >= limit) {
        char reason[120];
        snprintf(reason, sizeof reason, "too many %ss (--max-%ss %zu)", role_name(role),
                 role_name(role), limit);
        protocol_error(c, reason);
        return;
    }
    list_remove(unauth_, &Conn::unauth_link, c);
    secure_zero(c->expect_proof, sizeof c->expect_proof);
    c->hs = Handshake::kDone;
    c->role = role;
    count++;
    c->in.set_max_payload(cfg_.max_frame);
}

void Router::on_stats(Conn* c, const Frame& f) {
    if (f.header.length != 0) {
        protocol_error(c, "STATS request payload must be empty");
        return;
    }
    std::string js = stats_json();
    send(c, kStats, 0, f.header.job_id, 0, reinterpret_cast<const uint8_t*>(js.data()),
         js.size());
}

void Router::on_submit(Conn* c, const Frame& f, int64_t now) {
    const FrameHeader& h = f.header;
    stats_.submitted++;
    if (stopping_) {
        static const char kReason[] = "router is shutting down";
        stats_.errors++;
        send(c, kError, kErrShutdown, h.job_id, 0, reinterpret_cast<const uint8_t*>(kReason),
             sizeof kReason - 1);
        return;
    }
    if (c->jobs.get(h.job_id) != 0) {
        static const char kReason[] = "duplicate job id on this connection";
        stats_.errors++;
        send(c, kError, kErrRejected, h.job_id, 0, reinterpret_cast<const uint8_t*>(kReason),
             sizeof kReason - 1);
        return;
    }
    Conn* w = idle_pop();
    JobQueue::Priority prio = (h.flags & kFlagHighPriority) ? JobQueue::kHigh : JobQueue::kNormal;
    if (!w && ((h.flags & kFlagNoQueue) || queue_.count() + 1 > queue_.max_count() ||
               queue_.bytes() + h.length > queue_.max_bytes())) {
        stats_.busy++;
        send(c, kBusy, 0, h.job_id, 0, nullptr, 0);
        return;
    }
    uint64_t rid = job_alloc();
    Job* j = job_get(rid);
    j->flags = h.flags;
    j->master = c->id;
    j->master_job = h.job_id;
    uint32_t timeout = h.timeout_ms ? h.timeout_ms : cfg_.default_timeout_ms;
    j->deadline = now + static_cast<int64_t>(timeout) * 1000;
    j->submitted_at = now;
    j->payload.assign(f.payload, f.payload + h.length);
    c->jobs.insert(h.job_id, rid);
    if (w) {
        dispatch(w, rid, now);
        return;
    }
    QueueEntry e;
    e.job = rid;
    e.owner = c->id;
    e.deadline = j->deadline;
    e.bytes = h.length;
    j->qh = queue_.push(prio, e);  // cannot fail: checked above
}

void Router::on_cancel(Conn* c, const Frame& f) {
    if (f.header.length != 0) {
        protocol_error(c, "CANCEL payload must be empty");
        return;
    }
    uint64_t rid = c->jobs.get(f.header.job_id);
    if (!rid) return;
    c->jobs.erase(f.header.job_id);
    stats_.cancelled++;
    Job* j = job_get(rid);
    if (!j) return;
    if (j->in_flight) {
        j->orphan = true;
        in_flight_--;
    } else {
        queue_.remove(j->qh);
        job_free(rid);
    }
}

void Router::on_withdraw(Conn* c, const Frame& f) {
    if (f.header.length != 0) {
        protocol_error(c, "WITHDRAW payload must be empty");
        return;
    }
    // A job in the master's map is either queued or with a worker: answered, cancelled and
    // drained jobs have left it. Only a queued one can be taken back.
    uint64_t rid = c->jobs.get(f.header.job_id);
    Job* j = rid ? job_get(rid) : nullptr;
    uint16_t flags = 0;
    if (j && !j->in_flight) {
        queue_.remove(j->qh);
        c->jobs.erase(f.header.job_id);
        job_free(rid);
        flags = kFlagTaken;
        stats_.withdrawn++;
    } else {
        stats_.withdraw_missed++;
    }
    send(c, kWithdrawn, flags, f.header.job_id, 0, nullptr, 0);
}

void Router::on_ready(Conn* c, int64_t now) {
    if (c->job != 0) {
        char reason[120];
        snprintf(reason, sizeof reason,
                 "READY while holding job %" PRIu64 " (send its RESULT first)", c->job);
        protocol_error(c, reason);
        return;
    }
    if (c->idle || stopping_) return;
    // Deadlines are checked on every input, so a popped job is live; the queue and the idle
    // list are never both non-empty, so this worker is the longest idle one.
    QueueEntry e;
    while (queue_.pop(&e)) {
        Job* j = job_get(e.job);
        if (!j) continue;
        if (j->deadline <= now) {
            answer(j, kTimeout, 0, nullptr);
            continue;
        }
        dispatch(c, e.job, now);
        return;
    }
    idle_push(c);
}

void Router::on_result(Conn* c, const Frame& f, int64_t now) {
    uint64_t rid = f.header.job_id;
    if (c->job == 0 || rid != c->job) {
        stats_.dropped++;
        if (!c->warned) {
            c->warned = true;
            log_peer("worker connection %" PRIu64 " sent RESULT for job %" PRIu64
                     " which it does not hold; dropped",
                     c->id, rid);
        }
        return;
    }
    c->job = 0;
    Job* j = job_get(rid);
    if (!j) return;
    service_ewma_.record(now - j->dispatched_at);
    if (j->orphan) {
        stats_.dropped++;
        job_free(rid);
        return;
    }
    in_flight_--;
    service_us_.record(now - j->dispatched_at);
    Conn* m = get(j->master);
    if (m && m->role == kRoleMaster) {
        m->jobs.erase(j->master_job);
        send(m, kResult, 0, j->master_job, 0, f.payload, f.header.length);
        stats_.completed++;
    } else {
        stats_.dropped++;
    }
    job_free(rid);
}

void Router::dispatch(Conn* w, uint64_t rid, int64_t now) {
    Job* j = job_get(rid);
    j->in_flight = true;
    j->qh = 0;
    j->worker = w->id;
    j->dispatched_at = now;
    queue_wait_us_.record(now - j->submitted_at);
    queue_wait_ewma_.record(now - j->submitted_at);
    w->job = rid;
    in_flight_++;
    int64_t left_us = j->deadline - now;
    uint32_t left_ms = left_us <= 0 ? 1 : static_cast<uint32_t>((left_us + 999) / 1000);
    in_flight_deadlines_.push(j->deadline, rid);
    send_owned(w, kJob, j->flags, rid, left_ms, j->payload);
}

// ---- deadlines ---------------------------------------------------------------------------

void Router::tick(int64_t now) {
    queue_.expire(now, [this](const QueueEntry& e) {
        if (Job* j = job_get(e.job)) answer(j, kTimeout, 0, nullptr);
    });
    expire_in_flight(now);
    expire_connections(now);
    drain_kills();
}

void Router::expire_connections(int64_t now) {
    // Both lists are in deadline order: connections join them at `now`, which only grows.
    const int64_t handshake_us = static_cast<int64_t>(cfg_.handshake_ms) * 1000;
    while (Conn* c = list_front(unauth_)) {
        if (c->state != ConnState::kOpen) {  // killed earlier in this tick; detached soon
            list_remove(unauth_, &Conn::unauth_link, c);
            continue;
        }
        if (c->opened_at + handshake_us > now) break;
        stats_.handshake_timeouts++;
        char reason[120];
        snprintf(reason, sizeof reason,
                 "handshake timeout: not authenticated within %u ms of connecting",
                 cfg_.handshake_ms);
        protocol_error(c, reason);  // detaches, so the loop moves on
    }
    const int64_t frame_us = static_cast<int64_t>(cfg_.frame_ms) * 1000;
    while (Conn* c = list_front(partial_)) {
        if (c->state != ConnState::kOpen) {
            list_remove(partial_, &Conn::frame_link, c);
            continue;
        }
        if (c->frame_since + frame_us > now) break;
        stats_.frame_timeouts++;
        char reason[160];
        snprintf(reason, sizeof reason,
                 "frame not completed in time: %zu bytes of it arrived, the rest not within %u ms",
                 c->in.buffered(), cfg_.frame_ms);
        protocol_error(c, reason);
    }
}

void Router::expire_in_flight(int64_t now) {
    uint64_t rid;
    while (in_flight_deadlines_.pop_due(now, &rid)) {
        Job* j = job_get(rid);
        if (!j || !j->in_flight || j->orphan) continue;
        // The worker keeps the job until it answers; its late RESULT is then dropped.
        j->orphan = true;
        in_flight_--;
        Conn* m = get(j->master);
        if (m && m->role == kRoleMaster) {
            m->jobs.erase(j->master_job);
            send(m, kTimeout, 0, j->master_job, 0, nullptr, 0);
        }
        stats_.timeouts++;
    }
    if (in_flight_deadlines_.size() > 2 * in_flight_ + 64) {
        in_flight_deadlines_.compact([this](uint64_t id, int64_t) {
            Job* j = job_get(id);
            return j && j->in_flight && !j->orphan;
        });
    }
}

int64_t Router::next_deadline() {
    int64_t d = queue_.next_deadline();
    int64_t f = in_flight_deadlines_.top_deadline();
    if (f < d) d = f;
    if (const Conn* c = list_front(unauth_)) {
        int64_t h = c->opened_at + static_cast<int64_t>(cfg_.handshake_ms) * 1000;
        if (h < d) d = h;
    }
    if (const Conn* c = list_front(partial_)) {
        int64_t p = c->frame_since + static_cast<int64_t>(cfg_.frame_ms) * 1000;
        if (p < d) d = p;
    }
    return d;
}

void Router::drain() {
    stopping_ = true;
    static const char kReason[] = "router is shutting down";
    QueueEntry e;
    while (queue_.pop(&e))
        if (Job* j = job_get(e.job)) answer(j, kError, kErrShutdown, kReason);
    drain_kills();
}

void Router::shutdown() {
    drain();
    static const char kReason[] = "router is shutting down";
    for (Job& j : jobs_) {
        if (!j.live || !j.in_flight || j.orphan) continue;
        j.orphan = true;  // the worker still holds it; its RESULT is dropped
        in_flight_--;
        Conn* m = get(j.master);
        if (m && m->role == kRoleMaster) {
            m->jobs.erase(j.master_job);
            send(m, kError, kErrShutdown, j.master_job, 0,
                 reinterpret_cast<const uint8_t*>(kReason), sizeof kReason - 1);
        }
        stats_.errors++;
    }
    drain_kills();
}

// ---- idle workers ------------------------------------------------------------------------

void Router::idle_push(Conn* w) {
    uint32_t s = slot_of(w->id);
    w->idle = true;
    w->idle_next = kNil;
    w->idle_prev = idle_tail_;
    if (idle_tail_ != kNil)
        conns_[idle_tail_]->idle_next = s;
    else
        idle_head_ = s;
    idle_tail_ = s;
    workers_idle_++;
}

void Router::idle_remove(Conn* w) {
    if (!w->idle) return;
    if (w->idle_prev != kNil)
        conns_[w->idle_prev]->idle_next = w->idle_next;
    else
        idle_head_ = w->idle_next;
    if (w->idle_next != kNil)
        conns_[w->idle_next]->idle_prev = w->idle_prev;
    else
        idle_tail_ = w->idle_prev;
    w->idle = false;
    workers_idle_--;
}

Conn* Router::idle_pop() {
    if (idle_head_ == kNil) return nullptr;
    Conn* w = conns_[idle_head_].get();
    idle_remove(w);
    return w;
}

// ---- stats -------------------------------------------------------------------------------

RouterLoad Router::load() const {
    RouterLoad l;
    l.workers = workers_;
    l.workers_idle = workers_idle_;
    l.queued = queue_.count();
    l.in_flight = in_flight_;
    l.service_ewma_us = service_ewma_.value_us();
    l.queue_wait_ewma_us = queue_wait_ewma_.value_us();
    l.stopping = stopping_;
    return l;
}

std::string Router::stats_json() {
    // Room for every number at its widest (20 digits); the clamp below is belt and braces.
    char buf[3072];
    int n = snprintf(
        buf, sizeof buf,
        "{\"queued\":%zu,\"queued_bytes\":%zu,\"in_flight\":%zu,\"workers_idle\":%zu,"
        "\"workers_busy\":%zu,\"masters\":%zu,\"workers\":%zu,\"connections\":%zu,"
        "\"jobs_live\":%zu,"
        "\"submitted\":%" PRIu64 ",\"completed\":%" PRIu64 ",\"errors\":%" PRIu64
        ",\"timeouts\":%" PRIu64 ",\"busy\":%" PRIu64 ",\"cancelled\":%" PRIu64
        ",\"dropped\":%" PRIu64 ",\"protocol_errors\":%" PRIu64
        ",\"withdrawn\":%" PRIu64 ",\"withdraw_missed\":%" PRIu64
        ",\"auth_failures\":%" PRIu64 ",\"peers_refused\":%" PRIu64
        ",\"handshake_timeouts\":%" PRIu64 ",\"frame_timeouts\":%" PRIu64
        ",\"pending\":%zu,\"evicted_pending\":%" PRIu64
        ",\"queue_wait_p50_us\":%" PRIu64 ",\"queue_wait_p99_us\":%" PRIu64
        ",\"service_p50_us\":%" PRIu64 ",\"service_p99_us\":%" PRIu64
        ",\"queue_wait_ewma_us\":%" PRIu64 ",\"service_ewma_us\":%" PRIu64
        ",\"max_queue\":%zu,\"max_queue_bytes\":%zu,\"max_frame\":%u,\"auth\":%s,"
        "\"stopping\":%s}",
        queue_.count(), queue_.bytes(), in_flight_, workers_idle_, workers_ - workers_idle_,
        masters_, workers_, live_conns_, jobs_live_, stats_.submitted, stats_.completed, stats_.errors,
        stats_.timeouts, stats_.busy, stats_.cancelled, stats_.dropped, stats_.protocol_errors,
        stats_.withdrawn, stats_.withdraw_missed, stats_.auth_failures, stats_.peers_refused,
        stats_.handshake_timeouts, stats_.frame_timeouts, unauth_.size, stats_.evicted_pending,
        queue_wait_us_.percentile(0.5), queue_wait_us_.percentile(0.99), service_us_.percentile(0.5),
        service_us_.percentile(0.99), queue_wait_ewma_.value_us(), service_ewma_.value_us(),
        queue_.max_count(), queue_.max_bytes(), cfg_.max_frame, cfg_.has_key ? "true" : "false",
        stopping_ ? "true" : "false");
    if (n < 0) n = 0;
    return std::string(buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
}

}  // namespace fr
