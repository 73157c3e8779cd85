// libFuzzer target: arbitrary bytes, cut into arbitrary reads, through the frame parser and
// then the routing core, as one peer of each role would send them. Any crash, sanitizer report
// or broken invariant (a job entry left behind once every peer is gone) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "frame.h"
#include "log.h"
#include "router.h"

namespace {

void drain_output(fr::Router& r, uint64_t id) {
    fr::Conn* c = r.get(id);
    if (!c) return;
    struct iovec iov[fr::OutBuf::kMaxIov];
    while (!c->out.empty()) {
        int n = c->out.fill_iov(iov, fr::OutBuf::kMaxIov);
        size_t got = 0;
        for (int i = 0; i < n; i++) got += iov[i].iov_len;
        c->out.consume(got);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fr::log_set_quiet(true);
    if (size < 2) return 0;

    // 1. The parser alone, fed in chunks whose sizes come from the first byte.
    {
        fr::FrameParser p(1 << 16);
        size_t chunk = 1 + data[0] % 64;
        fr::Frame f;
        for (size_t off = 1; off < size; off += chunk) {
            size_t n = size - off < chunk ? size - off : chunk;
            p.feed(data + off, n);
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
    cfg.auth_token = "0123456789abcdef";
    fr::Router r(cfg);
    int64_t now = 1000000;
    uint64_t peers[2] = {r.open(-1), r.open(-1)};
    uint64_t honest = r.open(-1, data[0] & 1);
    // HELLO worker, then READY; with the auth bit set the HELLO lacks the token and is refused.
    const uint8_t hello_worker[] = {0x50, 0x52, 1, fr::kHello, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0,    0,    0, 0,         0, 0, 0, 1, 0, 0, 0, 2,
                                    0x50, 0x52, 1, fr::kReady, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0,    0,    0, 0,         0, 0, 0, 0, 0, 0, 0};
    r.get(honest)->in.feed(hello_worker, sizeof hello_worker);
    r.input(honest, now);
    size_t half = size / 2;
    const uint8_t* parts[2] = {data + 1, data + 1 + half};
    size_t lens[2] = {half > 0 ? half - 1 : 0, size - 1 - half};
    for (int i = 0; i < 2; i++) {
        for (size_t off = 0; off < lens[i]; off += 37) {
            fr::Conn* c = r.get(peers[i]);
            if (!c || c->state != fr::ConnState::kOpen) break;
            size_t n = lens[i] - off < 37 ? lens[i] - off : 37;
            c->in.feed(parts[i] + off, n);
            r.input(peers[i], now);
            now += 500;
            r.tick(now);
            drain_output(r, peers[i]);
            drain_output(r, honest);
        }
    }
    now += 60LL * 1000 * 1000;
    r.tick(now);
    for (uint64_t id : {peers[0], peers[1], honest}) r.closed(id);
    if (r.queued() != 0 || r.in_flight() != 0 || r.connections() != 0) abort();
    if (r.stats_json().find("\"jobs_live\":0,") == std::string::npos) abort();
    return 0;
}
