// Wire frames of PROTOCOL.md: the 24-byte header codec and an incremental parser with no I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fr {

constexpr size_t kHeaderSize = 24;
constexpr uint8_t kMagic0 = 0x50;  // 'P'
constexpr uint8_t kMagic1 = 0x52;  // 'R'
constexpr uint8_t kVersion = 1;
constexpr uint32_t kDefaultMaxFrame = 16u << 20;

enum FrameType : uint8_t {
    kHello = 1,
    kSubmit = 2,
    kReady = 3,
    kJob = 4,
    kResult = 5,
    kError = 6,
    kTimeout = 7,
    kBusy = 8,
    kStats = 9,
    kProtocolError = 10,
    kCancel = 11,
    kWithdraw = 12,
    kWithdrawn = 13,
    kChallenge = 14,
    kAuth = 15,
};
constexpr uint8_t kMaxType = kAuth;

constexpr uint16_t kFlagHighPriority = 0x0001;
// SUBMIT: deliver to a worker idle right now, or answer BUSY; never queue. Nested blocks use
// it so a worker never waits on a queue that only its own completion could drain.
constexpr uint16_t kFlagNoQueue = 0x0002;
// WITHDRAWN: the job was still queued and is now the master's; this is its terminal answer.
constexpr uint16_t kFlagTaken = 0x0001;

enum ErrorCode : uint16_t {
    kErrWorkerLost = 1,
    kErrShutdown = 2,
    kErrRejected = 3,
};

enum Role : uint8_t {
    kRoleNone = 0,
    kRoleMaster = 1,
    kRoleWorker = 2,
};

struct FrameHeader {
    uint8_t type = 0;
    uint16_t flags = 0;
    uint64_t job_id = 0;
    uint32_t timeout_ms = 0;
    uint32_t length = 0;
};

enum class DecodeError : uint8_t {
    kNone,
    kBadMagic,
    kBadVersion,
    kBadType,
    kBadReserved,
    kTooLong,
};

const char* frame_type_name(uint8_t type);
const char* decode_error_message(DecodeError err);

void frame_encode_header(const FrameHeader& h, uint8_t out[kHeaderSize]);

// Checks the first `n` (< kHeaderSize allowed) header bytes, so garbage is refused as soon as
// it is seen rather than after 24 bytes arrive.
DecodeError frame_check_prefix(const uint8_t* in, size_t n, uint32_t max_payload);

// Decodes a full header; `out` is filled only when the result is kNone.
DecodeError frame_decode_header(const uint8_t in[kHeaderSize], uint32_t max_payload,
                                FrameHeader* out);

struct Frame {
    FrameHeader header;
    const uint8_t* payload = nullptr;  // valid until the parser is next written to
};

// Accumulates bytes from a stream and hands out whole frames. Callers may read(2) straight
// into reserve() to avoid a copy. Once an error is reported the parser stays in error.
// The buffer grows with the bytes that arrive, never with the length a header announces.
class FrameParser {
public:
    enum class Status : uint8_t { kNeedMore, kFrame, kError };

    explicit FrameParser(uint32_t max_payload = kDefaultMaxFrame) : max_payload_(max_payload) {}

    // A writable region of at least `min` bytes; its real size is stored in *avail. Capacity
    // grows geometrically, only when the buffer is full of unparsed bytes, so it stays below
    // 2 * (buffered() + min) however long the frame being received says it is.
    uint8_t* reserve(size_t min, size_t* avail);
    void commit(size_t n) { end_ += n; }
    void feed(const void* data, size_t n);

    Status next(Frame* out);

    DecodeError error() const { return error_; }
    size_t buffered() const { return end_ - start_; }
    size_t capacity() const { return buf_.size(); }
    void set_max_payload(uint32_t m) { max_payload_ = m; }
    // Drops the buffer of a connection that has gone quiet, keeping idle memory small.
    void release_if_empty();

private:
    std::vector<uint8_t> buf_;
    size_t start_ = 0;
    size_t end_ = 0;
    uint32_t max_payload_;
    DecodeError error_ = DecodeError::kNone;
};

}  // namespace fr
