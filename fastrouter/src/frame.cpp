// Frame header codec and incremental parser; see PROTOCOL.md "Frame".
#include "frame.h"

#include <cstring>

namespace fr {

namespace {

constexpr size_t kMinBuffer = 64;
constexpr size_t kKeepBuffer = 1 << 20;

void put16(uint8_t* p, uint16_t v) {
    p[0] = static_cast<uint8_t>(v);
    p[1] = static_cast<uint8_t>(v >> 8);
}
void put32(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void put64(uint8_t* p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t get32(const uint8_t* p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
uint64_t get64(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

}  // namespace

const char* frame_type_name(uint8_t type) {
    switch (type) {
        case kHello: return "HELLO";
        case kSubmit: return "SUBMIT";
        case kReady: return "READY";
        case kJob: return "JOB";
        case kResult: return "RESULT";
        case kError: return "ERROR";
        case kTimeout: return "TIMEOUT";
        case kBusy: return "BUSY";
        case kStats: return "STATS";
        case kProtocolError: return "PROTOCOL_ERROR";
        case kCancel: return "CANCEL";
        case kWithdraw: return "WITHDRAW";
        case kWithdrawn: return "WITHDRAWN";
        case kChallenge: return "CHALLENGE";
        case kAuth: return "AUTH";
        default: return "UNKNOWN";
    }
}

const char* decode_error_message(DecodeError err) {
    switch (err) {
        case DecodeError::kNone: return "no error";
        case DecodeError::kBadMagic: return "bad magic (expected 50 52)";
        case DecodeError::kBadVersion: return "unsupported protocol version (expected 1)";
        case DecodeError::kBadType: return "unknown frame type";
        case DecodeError::kBadReserved: return "reserved header field is not 0";
        case DecodeError::kTooLong: return "frame length exceeds the maximum frame size";
    }
    return "unknown error";
}

void frame_encode_header(const FrameHeader& h, uint8_t out[kHeaderSize]) {
    out[0] = kMagic0;
    out[1] = kMagic1;
    out[2] = kVersion;
    out[3] = h.type;
    put16(out + 4, h.flags);
    put16(out + 6, 0);
    put64(out + 8, h.job_id);
    put32(out + 16, h.timeout_ms);
    put32(out + 20, h.length);
}

DecodeError frame_check_prefix(const uint8_t* in, size_t n, uint32_t max_payload) {
    if (n > 0 && in[0] != kMagic0) return DecodeError::kBadMagic;
    if (n > 1 && in[1] != kMagic1) return DecodeError::kBadMagic;
    if (n > 2 && in[2] != kVersion) return DecodeError::kBadVersion;
    if (n > 3 && (in[3] == 0 || in[3] > kMaxType)) return DecodeError::kBadType;
    if (n > 6 && in[6] != 0) return DecodeError::kBadReserved;
    if (n > 7 && in[7] != 0) return DecodeError::kBadReserved;
    if (n >= kHeaderSize && get32(in + 20) > max_payload) return DecodeError::kTooLong;
    return DecodeError::kNone;
}

DecodeError frame_decode_header(const uint8_t in[kHeaderSize], uint32_t max_payload,
                                FrameHeader* out) {
    DecodeError err = frame_check_prefix(in, kHeaderSize, max_payload);
    if (err != DecodeError::kNone) return err;
    out->type = in[3];
    out->flags = get16(in + 4);
    out->job_id = get64(in + 8);
    out->timeout_ms = get32(in + 16);
    out->length = get32(in + 20);
    return DecodeError::kNone;
}

uint8_t* FrameParser::reserve(size_t min, size_t* avail) {
    if (start_ == end_) {
        start_ = end_ = 0;
    } else if (start_ > 0 && buf_.size() - end_ < min) {
        // Only a partial frame is left; moving it is cheaper than growing.
        std::memmove(buf_.data(), buf_.data() + start_, end_ - start_);
        end_ -= start_;
        start_ = 0;
    }
    // Room for what has arrived and is still unparsed plus one read of `min`; never the length
    // a header announces, which a peer can state without sending the bytes. The buffer grows
    // only when it is full of received bytes, and then doubles, so a large frame costs a few
    // copies and the capacity stays below twice the bytes received plus one read.
    size_t want = end_ + min;
    if (buf_.size() < want || buf_.empty()) {
        size_t cap = buf_.size() * 2;
        if (cap < want) cap = want;
        if (cap < kMinBuffer) cap = kMinBuffer;
        buf_.resize(cap);
    }
    *avail = buf_.size() - end_;
    return buf_.data() + end_;
}

void FrameParser::feed(const void* data, size_t n) {
    size_t avail = 0;
    uint8_t* p = reserve(n, &avail);
    std::memcpy(p, data, n);
    commit(n);
}

void FrameParser::release_if_empty() {
    if (start_ == end_ && buf_.size() > kKeepBuffer) {
        std::vector<uint8_t>().swap(buf_);
        start_ = end_ = 0;
    }
}

FrameParser::Status FrameParser::next(Frame* out) {
    if (error_ != DecodeError::kNone) return Status::kError;
    size_t have = end_ - start_;
    const uint8_t* p = buf_.data() + start_;
    if (have < kHeaderSize) {
        error_ = frame_check_prefix(p, have, max_payload_);
        return error_ == DecodeError::kNone ? Status::kNeedMore : Status::kError;
    }
    FrameHeader h;
    error_ = frame_decode_header(p, max_payload_, &h);
    if (error_ != DecodeError::kNone) return Status::kError;
    if (have < kHeaderSize + h.length) return Status::kNeedMore;
    out->header = h;
    out->payload = p + kHeaderSize;
    start_ += kHeaderSize + h.length;
    return Status::kFrame;
}

}  // namespace fr
