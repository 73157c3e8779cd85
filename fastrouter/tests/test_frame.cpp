// Unit tests of the frame codec and incremental parser, including PROTOCOL.md's examples.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "frame.h"

using namespace fr;
using Bytes = std::vector<uint8_t>;

namespace {

// The hex examples, copied byte for byte from PROTOCOL.md "Examples (hex)".
const Bytes kHelloMaster = {0x50, 0x52, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
                            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01};
const Bytes kSubmit7 = {0x50, 0x52, 0x01, 0x02, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00,
                        0x00, 0x00, 0x00, 0x00, 0x00, 0xfa, 0x00, 0x00, 0x00, 0x02, 0x00,
                        0x00, 0x00, 0x68, 0x69};
const Bytes kReadyEx = {0x50, 0x52, 0x01, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
const Bytes kBusy7 = {0x50, 0x52, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
                      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
const Bytes kWorkerLost7 = {0x50, 0x52, 0x01, 0x06, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00,
                            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x00,
                            0x00, 0x00, 0x77, 0x6f, 0x72, 0x6b, 0x65, 0x72, 0x20, 0x6c, 0x6f,
                            0x73, 0x74};
const Bytes kWithdraw7 = {0x50, 0x52, 0x01, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
                          0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
const Bytes kWithdrawnTaken7 = {0x50, 0x52, 0x01, 0x0d, 0x01, 0x00, 0x00, 0x00,
                                0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
const Bytes kWithdrawnNotTaken7 = {0x50, 0x52, 0x01, 0x0d, 0x00, 0x00, 0x00, 0x00,
                                   0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                   0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};

Bytes encode(uint8_t type, uint16_t flags, uint64_t job, uint32_t timeout, const std::string& p) {
    const FrameHeader h{type, flags, job, timeout, static_cast<uint32_t>(p.size())};
    Bytes out(kHeaderSize);
    frame_encode_header(h, out.data());
    out.insert(out.end(), p.begin(), p.end());
    return out;
}

std::vector<Frame> parse_all(FrameParser& p, std::vector<std::string>* payloads) {
    std::vector<Frame> frames;
    Frame f;
    while (p.next(&f) == FrameParser::Status::kFrame) {
        frames.push_back(f);
        payloads->emplace_back(reinterpret_cast<const char*>(f.payload), f.header.length);
    }
    return frames;
}

DecodeError parse_error(const Bytes& b, uint32_t max = kDefaultMaxFrame) {
    FrameParser p(max);
    p.feed(b.data(), b.size());
    Frame f;
    FrameParser::Status st = p.next(&f);
    return st == FrameParser::Status::kError ? p.error() : DecodeError::kNone;
}

}  // namespace

TEST(encode_matches_protocol_examples) {
    CHECK(encode(kHello, 0, 0, 0, "\x01") == kHelloMaster);
    CHECK(encode(kSubmit, kFlagHighPriority, 7, 250, "hi") == kSubmit7);
    CHECK(encode(kReady, 0, 0, 0, "") == kReadyEx);
    CHECK(encode(kBusy, 0, 7, 0, "") == kBusy7);
    CHECK(encode(kError, kErrWorkerLost, 7, 0, "worker lost") == kWorkerLost7);
    CHECK(encode(kWithdraw, 0, 7, 0, "") == kWithdraw7);
    CHECK(encode(kWithdrawn, kFlagTaken, 7, 0, "") == kWithdrawnTaken7);
    CHECK(encode(kWithdrawn, 0, 7, 0, "") == kWithdrawnNotTaken7);
}

TEST(decode_protocol_examples) {
    FrameHeader h;
    CHECK(frame_decode_header(kSubmit7.data(), kDefaultMaxFrame, &h) == DecodeError::kNone);
    CHECK_EQ(h.type, kSubmit);
    CHECK_EQ(h.flags, kFlagHighPriority);
    CHECK_EQ(h.job_id, 7u);
    CHECK_EQ(h.timeout_ms, 250u);
    CHECK_EQ(h.length, 2u);
    CHECK(frame_decode_header(kWorkerLost7.data(), kDefaultMaxFrame, &h) == DecodeError::kNone);
    CHECK_EQ(h.type, kError);
    CHECK_EQ(h.flags, kErrWorkerLost);
    CHECK_EQ(h.length, 11u);
    CHECK(frame_decode_header(kWithdrawnTaken7.data(), kDefaultMaxFrame, &h) == DecodeError::kNone);
    CHECK_EQ(h.type, kWithdrawn);
    CHECK_EQ(h.flags, kFlagTaken);
    CHECK_EQ(h.job_id, 7u);
    CHECK_EQ(h.length, 0u);
}

TEST(large_fields_round_trip) {
    Bytes b = encode(kJob, 0xffff, 0xfedcba9876543210ULL, 0xdeadbeef, "");
    b[20] = 0;  // keep the length small
    FrameHeader h;
    CHECK(frame_decode_header(b.data(), kDefaultMaxFrame, &h) == DecodeError::kNone);
    CHECK_EQ(h.flags, 0xffff);
    CHECK_EQ(h.job_id, 0xfedcba9876543210ULL);
    CHECK_EQ(h.timeout_ms, 0xdeadbeefu);
}

TEST(parser_multiple_frames_in_one_buffer) {
    Bytes all;
    for (const Bytes* b : {&kHelloMaster, &kSubmit7, &kReadyEx, &kWorkerLost7})
        all.insert(all.end(), b->begin(), b->end());
    FrameParser p;
    p.feed(all.data(), all.size());
    std::vector<std::string> payloads;
    std::vector<Frame> frames = parse_all(p, &payloads);
    CHECK_EQ(frames.size(), 4u);
    if (frames.size() == 4) {
        CHECK_EQ(frames[0].header.type, kHello);
        CHECK_EQ(payloads[0], std::string("\x01"));
        CHECK_EQ(frames[1].header.job_id, 7u);
        CHECK_EQ(payloads[1], std::string("hi"));
        CHECK_EQ(frames[2].header.type, kReady);
        CHECK_EQ(payloads[3], std::string("worker lost"));
    }
    CHECK_EQ(p.buffered(), 0u);
}

TEST(parser_split_at_every_offset) {
    Bytes all;
    for (const Bytes* b : {&kSubmit7, &kReadyEx, &kWorkerLost7, &kHelloMaster})
        all.insert(all.end(), b->begin(), b->end());
    for (size_t cut = 0; cut <= all.size(); cut++) {
        FrameParser p;
        std::vector<std::string> payloads;
        p.feed(all.data(), cut);
        std::vector<Frame> first = parse_all(p, &payloads);
        p.feed(all.data() + cut, all.size() - cut);
        std::vector<Frame> second = parse_all(p, &payloads);
        CHECK_EQ(first.size() + second.size(), 4u);
        CHECK_EQ(payloads.size(), 4u);
        if (payloads.size() == 4) {
            CHECK_EQ(payloads[0], std::string("hi"));
            CHECK_EQ(payloads[2], std::string("worker lost"));
        }
    }
}

TEST(parser_byte_at_a_time) {
    Bytes all = kWorkerLost7;
    all.insert(all.end(), kSubmit7.begin(), kSubmit7.end());
    FrameParser p;
    std::vector<std::string> payloads;
    size_t frames = 0;
    for (uint8_t byte : all) {
        p.feed(&byte, 1);
        frames += parse_all(p, &payloads).size();
    }
    CHECK_EQ(frames, 2u);
    CHECK_EQ(payloads[1], std::string("hi"));
}

TEST(parser_large_frame_through_reserve) {
    std::string body(1 << 20, 'x');
    Bytes b = encode(kResult, 0, 3, 0, body);
    FrameParser p;
    size_t off = 0;
    std::vector<std::string> payloads;
    while (off < b.size()) {
        size_t avail = 0;
        uint8_t* dst = p.reserve(4096, &avail);
        size_t n = std::min(avail, b.size() - off);
        std::memcpy(dst, b.data() + off, n);
        p.commit(n);
        off += n;
        parse_all(p, &payloads);
    }
    CHECK_EQ(payloads.size(), 1u);
    CHECK(payloads.size() == 1 && payloads[0] == body);
    p.release_if_empty();
    CHECK_EQ(p.capacity(), 0u);
}

TEST(buffer_grows_with_bytes_received_not_with_the_announced_length) {
    // A header announcing 16 MiB followed by one byte: the buffer holds what came, plus a read.
    Bytes head = encode(kSubmit, 0, 1, 0, "");
    const uint32_t announced = 16u << 20;
    for (int i = 0; i < 4; i++) head[20 + i] = static_cast<uint8_t>(announced >> (8 * i));
    head.push_back('x');
    const size_t kRead = 4096;
    FrameParser p(announced);
    size_t avail = 0;
    uint8_t* dst = p.reserve(kRead, &avail);
    std::memcpy(dst, head.data(), head.size());
    p.commit(head.size());
    Frame f;
    CHECK(p.next(&f) == FrameParser::Status::kNeedMore);
    dst = p.reserve(kRead, &avail);
    CHECK(avail >= kRead);
    CHECK(p.capacity() <= 2 * (p.buffered() + kRead));
    // Streaming the frame in reads of every size keeps the bound, then yields the frame.
    std::string body(announced, 'b');
    body[0] = 'x';
    size_t sent = 1;
    size_t step = 1;
    while (sent < body.size()) {
        dst = p.reserve(kRead, &avail);
        size_t n = std::min({avail, body.size() - sent, step});
        std::memcpy(dst, body.data() + sent, n);
        p.commit(n);
        sent += n;
        step = step * 3 + 1;
        CHECK(p.capacity() <= 2 * (p.buffered() + kRead));
        if (p.capacity() > 2 * (p.buffered() + kRead)) break;
    }
    CHECK(p.next(&f) == FrameParser::Status::kFrame);
    CHECK_EQ(f.header.length, announced);
    CHECK(std::memcmp(f.payload, body.data(), body.size()) == 0);
    // Small reads of small frames never grow a small buffer.
    FrameParser q;
    for (int i = 0; i < 1000; i++) {
        Bytes b = encode(kReady, 0, 0, 0, "");
        dst = q.reserve(128, &avail);
        std::memcpy(dst, b.data(), b.size());
        q.commit(b.size());
        CHECK(q.next(&f) == FrameParser::Status::kFrame);
    }
    CHECK(q.capacity() <= 256);
}

TEST(bad_magic) {
    Bytes b = kReadyEx;
    b[0] = 'G';
    CHECK(parse_error(b) == DecodeError::kBadMagic);
    b = kReadyEx;
    b[1] = 0;
    CHECK(parse_error(b) == DecodeError::kBadMagic);
    // Garbage is refused from its first byte, before a whole header arrives.
    FrameParser p;
    p.feed("GET", 3);
    Frame f;
    CHECK(p.next(&f) == FrameParser::Status::kError);
    CHECK(p.error() == DecodeError::kBadMagic);
    CHECK(p.next(&f) == FrameParser::Status::kError);  // sticky
}

TEST(bad_version_type_reserved) {
    Bytes b = kReadyEx;
    b[2] = 2;
    CHECK(parse_error(b) == DecodeError::kBadVersion);
    b = kReadyEx;
    b[3] = 0;
    CHECK(parse_error(b) == DecodeError::kBadType);
    b[3] = 16;  // one past AUTH
    CHECK(parse_error(b) == DecodeError::kBadType);
    b[3] = 0xff;
    CHECK(parse_error(b) == DecodeError::kBadType);
    b = kReadyEx;
    b[6] = 1;
    CHECK(parse_error(b) == DecodeError::kBadReserved);
    b = kReadyEx;
    b[7] = 0x80;
    CHECK(parse_error(b) == DecodeError::kBadReserved);
    for (uint8_t t = kHello; t <= kAuth; t++) {
        b = kReadyEx;
        b[3] = t;
        CHECK(parse_error(b) == DecodeError::kNone);
    }
}

TEST(oversize_length_refused_from_header) {
    Bytes b = encode(kSubmit, 0, 1, 0, "");
    b[20] = 0x01;
    b[21] = 0x00;
    b[22] = 0x00;
    b[23] = 0x01;  // 16 MiB + 1
    CHECK(parse_error(b) == DecodeError::kTooLong);
    CHECK(parse_error(encode(kSubmit, 0, 1, 0, std::string(100, 'a')), 99) == DecodeError::kTooLong);
    CHECK(parse_error(encode(kSubmit, 0, 1, 0, std::string(99, 'a')), 99) == DecodeError::kNone);
    b = encode(kSubmit, 0, 1, 0, "");
    b[23] = 0xff;
    CHECK(parse_error(b) == DecodeError::kTooLong);
}

TEST_MAIN()
