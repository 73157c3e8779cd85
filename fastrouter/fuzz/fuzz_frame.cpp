// libFuzzer target: arbitrary bytes, cut into arbitrary reads, through the frame parser and
// then the routing core, as one peer of each role would send them. Any crash, sanitizer report
// or broken invariant (a job entry or a connection left behind once every peer is gone, a
// CHALLENGE whose proof is wrong) is a finding.
//
// The first byte: bits 0-5 choose the parser's read size (part 1) and bit 0 whether the honest
// worker answers its CHALLENGE wrongly; bit 6 gives the router a key (without it, --no-auth);
// bit 7 makes the harness write the correct proof into every 32-byte AUTH the input sends, so
// an input can get past the handshake and reach the routing core while the rest of its bytes
// (HELLO, the frames around AUTH, what follows) stay the fuzzer's.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "auth.h"
#include "frame.h"
#include "log.h"
#include "router.h"

namespace {

constexpr uint8_t kFlagHonestLies = 0x01;
constexpr uint8_t kFlagKey = 0x40;
constexpr uint8_t kFlagProve = 0x80;
constexpr size_t kChunk = 37;
constexpr size_t kNone = static_cast<size_t>(-1);

// What a peer has been sent, parsed: the last CHALLENGE's Nr and proof.
struct Seen {
    fr::FrameParser parser{1u << 20};
    bool challenged = false;
    uint8_t nr[fr::kNonceSize];
    uint8_t proof[fr::kProofSize];
};

void drain_output(fr::Router& r, uint64_t id, Seen* seen) {
    fr::Conn* c = r.get(id);
    if (!c) return;
    struct iovec iov[fr::OutBuf::kMaxIov];
    while (!c->out.empty()) {
        int n = c->out.fill_iov(iov, fr::OutBuf::kMaxIov);
        size_t got = 0;
        for (int i = 0; i < n; i++) {
            if (seen) seen->parser.feed(iov[i].iov_base, iov[i].iov_len);
            got += iov[i].iov_len;
        }
        c->out.consume(got);
    }
    if (!seen) return;
    fr::Frame f;
    while (seen->parser.next(&f) == fr::FrameParser::Status::kFrame) {
        if (f.header.type != fr::kChallenge) continue;
        if (f.header.length != fr::kChallengePayload) abort();
        seen->challenged = true;
        std::memcpy(seen->nr, f.payload, fr::kNonceSize);
        std::memcpy(seen->proof, f.payload + fr::kNonceSize, fr::kProofSize);
    }
    if (seen->parser.error() != fr::DecodeError::kNone) abort();  // the router's output parses
}

uint32_t get32(const uint8_t* p) {
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
           static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

std::vector<uint8_t> frame(uint8_t type, const uint8_t* payload, size_t len) {
    const fr::FrameHeader h{type, 0, 0, 0, static_cast<uint32_t>(len)};
    std::vector<uint8_t> out(fr::kHeaderSize);
    fr::frame_encode_header(h, out.data());
    out.insert(out.end(), payload, payload + len);
    return out;
}

// One peer's bytes from the input, with where its first 33-byte HELLO's payload and its 32-byte
// AUTH payloads are (found by walking the frame headers as the router will).
struct Stream {
    std::vector<uint8_t> bytes;
    size_t hello = kNone;
    std::vector<size_t> auths;

    Stream(const uint8_t* p, size_t n) : bytes(p, p + n) {
        for (size_t off = 0; off + fr::kHeaderSize <= n;) {
            uint8_t type = bytes[off + 3];
            uint32_t len = get32(&bytes[off + 20]);
            const bool whole = off + fr::kHeaderSize + len <= n;  // not cut off by the input's end
            if (type == fr::kHello && len == fr::kHelloAuthPayload && whole && hello == kNone)
                hello = off + fr::kHeaderSize;
            if (type == fr::kAuth && len == fr::kProofSize && whole)
                auths.push_back(off + fr::kHeaderSize);
            if (len > n) break;
            off += fr::kHeaderSize + len;
        }
    }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fr::log_set_quiet(true);
    if (size < 2) return 0;
    const uint8_t flags = data[0];

    // 1. The parser alone, fed in chunks whose sizes come from the first byte; its buffer must
    //    grow with what it was given, never with the lengths the headers announce.
    {
        fr::FrameParser p(1 << 16);
        size_t chunk = 1 + data[0] % 64;
        size_t fed = 0;
        fr::Frame f;
        for (size_t off = 1; off < size; off += chunk) {
            size_t n = size - off < chunk ? size - off : chunk;
            p.feed(data + off, n);
            fed += n;
            if (p.capacity() > 2 * fed + 128) abort();
            while (p.next(&f) == fr::FrameParser::Status::kFrame)
                if (f.header.length > (1u << 16)) abort();  // the limit must hold
            if (p.error() != fr::DecodeError::kNone) break;
        }
    }

    // 2. The router: a master and a worker speak the input; an honest worker answers jobs.
    fr::RouterConfig cfg;
    cfg.max_frame = 1 << 16;
    cfg.max_queue = 8;
    cfg.max_output = 1 << 18;
    cfg.handshake_ms = 10;  // 20 reads of the input below
    cfg.frame_ms = 20;
    cfg.max_pending = 3;
    cfg.max_workers = 2;  // the honest worker and one more
    cfg.euid = 1000;
    if (flags & kFlagKey) {
        cfg.has_key = true;
        for (size_t i = 0; i < fr::kAuthKeySize; i++) cfg.key[i] = static_cast<uint8_t>(0xa0 + i);
    }
    uint8_t counter = 0;
    cfg.nonce_source = [&counter](uint8_t* out, size_t n) {
        for (size_t i = 0; i < n; i++) out[i] = static_cast<uint8_t>(counter + i * 7);
        counter++;
        return true;
    };
    fr::Router r(cfg);
    int64_t now = 1000000;
    const fr::PeerCred ours{true, 1000, 1000}, stranger{true, 4242, 4242};
    r.closed(r.open(-1, now, &stranger));  // refused on open, gone at once

    // The honest worker: HELLO, then AUTH (wrong if the input says so) and READY.
    const uint64_t honest = r.open(-1, now, &ours);
    Seen honest_seen;
    {
        const uint8_t np[fr::kNonceSize] = {7, 7, 7};
        uint8_t hello[1 + fr::kNonceSize] = {fr::kRoleWorker};
        std::memcpy(hello + 1, np, sizeof np);
        std::vector<uint8_t> bytes = frame(fr::kHello, hello, cfg.has_key ? sizeof hello : 1);
        r.get(honest)->in.feed(bytes.data(), bytes.size());
        r.input(honest, now);
        drain_output(r, honest, &honest_seen);
        bytes.clear();
        if (cfg.has_key) {
            if (!honest_seen.challenged) abort();
            uint8_t want[fr::kProofSize], proof[fr::kProofSize];
            fr::auth_router_proof(cfg.key, fr::kRoleWorker, np, honest_seen.nr, want);
            if (std::memcmp(want, honest_seen.proof, sizeof want) != 0) abort();
            fr::auth_peer_proof(cfg.key, fr::kRoleWorker, np, honest_seen.nr, proof);
            if (flags & kFlagHonestLies) proof[0] ^= 1;
            bytes = frame(fr::kAuth, proof, sizeof proof);
        }
        std::vector<uint8_t> ready = frame(fr::kReady, nullptr, 0);
        bytes.insert(bytes.end(), ready.begin(), ready.end());
        r.get(honest)->in.feed(bytes.data(), bytes.size());
        r.input(honest, now);
    }

    // Each peer connects when its turn comes (the first over a Unix socket, the second as TCP),
    // so the second's handshake deadline does not run out while the first speaks.
    uint64_t peers[2] = {0, 0};
    Seen seen[2];
    size_t half = size / 2;
    Stream streams[2] = {Stream(data + 1, half > 0 ? half - 1 : 0),
                         Stream(data + 1 + half, size - 1 - half)};
    for (int i = 0; i < 2; i++) {
        Stream& s = streams[i];
        peers[i] = i == 0 ? r.open(-1, now, &ours) : r.open(-1, now);
        size_t next_auth = 0;
        for (size_t off = 0; off < s.bytes.size();) {
            fr::Conn* c = r.get(peers[i]);
            if (!c || c->state != fr::ConnState::kOpen) break;
            // A read never runs into an AUTH payload, so the proof can be written in before.
            size_t end = off + kChunk < s.bytes.size() ? off + kChunk : s.bytes.size();
            while (next_auth < s.auths.size() && s.auths[next_auth] < off) next_auth++;
            if (next_auth < s.auths.size() && s.auths[next_auth] == off) {
                if ((flags & kFlagProve) && cfg.has_key && seen[i].challenged && s.hello != kNone) {
                    const uint8_t role = s.bytes[s.hello];
                    const uint8_t* np = &s.bytes[s.hello + 1];
                    uint8_t want[fr::kProofSize];
                    // The CHALLENGE answered this stream's HELLO: its proof must check out.
                    fr::auth_router_proof(cfg.key, role, np, seen[i].nr, want);
                    if (std::memcmp(want, seen[i].proof, sizeof want) != 0) abort();
                    fr::auth_peer_proof(cfg.key, role, np, seen[i].nr, &s.bytes[off]);
                }
                next_auth++;
            }
            if (next_auth < s.auths.size() && s.auths[next_auth] < end) end = s.auths[next_auth];
            c->in.feed(s.bytes.data() + off, end - off);
            r.input(peers[i], now);
            off = end;
            now += 500;
            r.tick(now);
            drain_output(r, peers[i], &seen[i]);
            drain_output(r, honest, &honest_seen);
        }
    }
    now += 60LL * 1000 * 1000;
    r.tick(now);
    for (uint64_t id : {peers[0], peers[1], honest}) r.closed(id);
    if (r.queued() != 0 || r.in_flight() != 0 || r.connections() != 0) abort();
    if (r.unauthenticated() != 0) abort();
    if (r.stats_json().find("\"jobs_live\":0,") == std::string::npos) abort();
    return 0;
}
