// Unit tests of OutBuf: ordering, coalescing, owned payloads and partial writes.
#include <string>
#include <vector>

#include "check.h"
#include "outbuf.h"

using namespace fr;

namespace {
std::string contents(const OutBuf& b) {
    struct iovec iov[OutBuf::kMaxIov];
    int n = b.fill_iov(iov, OutBuf::kMaxIov);
    std::string s;
    for (int i = 0; i < n; i++) s.append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
    return s;
}
const uint8_t* u(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }
}  // namespace

TEST(small_frames_coalesce_in_order) {
    OutBuf b;
    b.append(u("H1"), 2, u("aa"), 2);
    b.append(u("H2"), 2, nullptr, 0);
    b.append(u("H3"), 2, u("ccc"), 3);
    CHECK_EQ(contents(b), std::string("H1aaH2H3ccc"));
    struct iovec iov[4];
    CHECK_EQ(b.fill_iov(iov, 4), 1);
    CHECK_EQ(b.size(), 11u);
}

TEST(large_owned_payload_is_moved_not_copied) {
    OutBuf b;
    std::vector<uint8_t> big(200000, 'x');
    const uint8_t* data = big.data();
    b.append(u("H1"), 2, u("a"), 1);
    b.append_owned(u("H2"), 2, big);
    b.append(u("H3"), 2, nullptr, 0);
    CHECK(big.empty());
    struct iovec iov[8];
    int n = b.fill_iov(iov, 8);
    CHECK_EQ(n, 3);
    CHECK(iov[1].iov_base == data);
    CHECK_EQ(b.size(), 3u + 2u + 200000u + 2u);
    std::string s = contents(b);
    CHECK_EQ(s.substr(0, 5), std::string("H1aH2"));
    CHECK_EQ(s.substr(s.size() - 3), std::string("xH3"));
}

TEST(partial_consume_keeps_the_rest) {
    OutBuf b;
    std::string big(100000, 'y');
    b.append(u("HH"), 2, u(big), big.size());
    b.append(u("T"), 1, u("z"), 1);
    std::string all = contents(b);
    size_t total = b.size();
    size_t done = 0;
    std::string written;
    for (size_t step : {1u, 7u, 50000u, 3u, 100000u}) {
        std::string now = contents(b);
        size_t n = std::min<size_t>(step, now.size());
        written += now.substr(0, n);
        b.consume(n);
        done += n;
    }
    CHECK_EQ(done, total);
    CHECK(b.empty());
    CHECK(written == all);
    b.append(u("again"), 5, nullptr, 0);
    CHECK_EQ(contents(b), std::string("again"));
}

TEST(many_pieces_grow_the_ring) {
    OutBuf b;
    std::string chunk(70000, 'q');
    for (int i = 0; i < 20; i++) b.append(u("H"), 1, u(chunk), chunk.size());
    CHECK_EQ(b.size(), 20u * 70001u);
    std::string s = contents(b);
    CHECK_EQ(s.size(), 20u * 70001u);
    b.consume(b.size());
    CHECK(b.empty());
}

TEST_MAIN()
