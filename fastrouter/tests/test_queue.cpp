// Unit tests of JobQueue and DeadlineHeap.
#include <vector>

#include "check.h"
#include "queue.h"

using namespace fr;

namespace {
QueueEntry entry(uint64_t job, uint64_t owner = 1, int64_t deadline = kNoDeadline,
                 uint32_t bytes = 0) {
    QueueEntry e;
    e.job = job;
    e.owner = owner;
    e.deadline = deadline;
    e.bytes = bytes;
    return e;
}
std::vector<uint64_t> drain(JobQueue& q) {
    std::vector<uint64_t> out;
    QueueEntry e;
    while (q.pop(&e)) out.push_back(e.job);
    return out;
}
}  // namespace

TEST(fifo_within_priority) {
    JobQueue q(100, 1000);
    for (uint64_t i = 1; i <= 5; i++) CHECK(q.push(JobQueue::kNormal, entry(i)) != 0);
    CHECK((drain(q) == std::vector<uint64_t>{1, 2, 3, 4, 5}));
    CHECK(q.empty());
}

TEST(high_priority_first) {
    JobQueue q(100, 1000);
    q.push(JobQueue::kNormal, entry(1));
    q.push(JobQueue::kHigh, entry(2));
    q.push(JobQueue::kNormal, entry(3));
    q.push(JobQueue::kHigh, entry(4));
    CHECK((drain(q) == std::vector<uint64_t>{2, 4, 1, 3}));
}

TEST(count_bound) {
    JobQueue q(2, 1000);
    CHECK(q.push(JobQueue::kNormal, entry(1)) != 0);
    CHECK(q.push(JobQueue::kHigh, entry(2)) != 0);
    CHECK(q.push(JobQueue::kHigh, entry(3)) == 0);
    CHECK_EQ(q.count(), 2u);
    QueueEntry e;
    q.pop(&e);
    CHECK(q.push(JobQueue::kNormal, entry(3)) != 0);
}

TEST(byte_bound) {
    JobQueue q(100, 10);
    CHECK(q.push(JobQueue::kNormal, entry(1, 1, kNoDeadline, 6)) != 0);
    CHECK(q.push(JobQueue::kNormal, entry(2, 1, kNoDeadline, 5)) == 0);
    CHECK(q.push(JobQueue::kNormal, entry(3, 1, kNoDeadline, 4)) != 0);
    CHECK_EQ(q.bytes(), 10u);
    CHECK(q.push(JobQueue::kNormal, entry(4, 1, kNoDeadline, 0)) != 0);  // empty jobs still fit
    CHECK(q.push(JobQueue::kNormal, entry(5, 1, kNoDeadline, 11)) == 0);
    drain(q);
    CHECK_EQ(q.bytes(), 0u);
}

TEST(expiry_in_deadline_order_and_only_due) {
    JobQueue q(100, 1000);
    q.push(JobQueue::kNormal, entry(1, 1, 300));
    q.push(JobQueue::kHigh, entry(2, 1, 100));
    q.push(JobQueue::kNormal, entry(3, 1, 200));
    q.push(JobQueue::kNormal, entry(4, 1));
    CHECK_EQ(q.next_deadline(), 100);
    std::vector<uint64_t> expired;
    q.expire(99, [&](const QueueEntry& e) { expired.push_back(e.job); });
    CHECK(expired.empty());
    q.expire(200, [&](const QueueEntry& e) { expired.push_back(e.job); });
    CHECK((expired == std::vector<uint64_t>{2, 3}));
    CHECK_EQ(q.next_deadline(), 300);
    CHECK((drain(q) == std::vector<uint64_t>{1, 4}));
    CHECK_EQ(q.next_deadline(), kNoDeadline);
}

TEST(removed_entries_do_not_expire) {
    JobQueue q(100, 1000);
    JobQueue::Handle h = q.push(JobQueue::kNormal, entry(1, 1, 100));
    q.push(JobQueue::kNormal, entry(2, 1, 150));
    CHECK(q.remove(h));
    CHECK(!q.remove(h));  // stale handle
    CHECK_EQ(q.next_deadline(), 150);
    std::vector<uint64_t> expired;
    q.expire(1000, [&](const QueueEntry& e) { expired.push_back(e.job); });
    CHECK((expired == std::vector<uint64_t>{2}));
    // A reused slot gets a new handle; the old one stays dead.
    JobQueue::Handle h2 = q.push(JobQueue::kNormal, entry(3));
    CHECK(h2 != h);
    CHECK(!q.remove(h));
    CHECK(q.remove(h2));
}

TEST(remove_by_owner) {
    JobQueue q(100, 1000);
    q.push(JobQueue::kNormal, entry(1, 10, kNoDeadline, 1));
    q.push(JobQueue::kHigh, entry(2, 20, kNoDeadline, 2));
    q.push(JobQueue::kNormal, entry(3, 10, 50, 3));
    q.push(JobQueue::kHigh, entry(4, 10, kNoDeadline, 4));
    std::vector<uint64_t> removed;
    CHECK_EQ(q.remove_owner(10, [&](const QueueEntry& e) { removed.push_back(e.job); }), 3u);
    CHECK((removed == std::vector<uint64_t>{4, 1, 3}));
    CHECK_EQ(q.count(), 1u);
    CHECK_EQ(q.bytes(), 2u);
    size_t expired = q.expire(100, [](const QueueEntry&) {});
    CHECK_EQ(expired, 0u);
    CHECK((drain(q) == std::vector<uint64_t>{2}));
}

TEST(heap_stays_bounded_under_churn) {
    JobQueue q(10, 1000);
    for (int i = 0; i < 100000; i++) {
        q.push(JobQueue::kNormal, entry(static_cast<uint64_t>(i + 1), 1, 1000000 + i));
        QueueEntry e;
        q.pop(&e);
    }
    CHECK(q.empty());
    CHECK_EQ(q.next_deadline(), kNoDeadline);
}

TEST(deadline_heap_orders) {
    DeadlineHeap h;
    h.push(30, 3);
    h.push(10, 1);
    h.push(20, 2);
    uint64_t k;
    CHECK(!h.pop_due(5, &k));
    CHECK(h.pop_due(25, &k) && k == 1);
    CHECK(h.pop_due(25, &k) && k == 2);
    CHECK(!h.pop_due(25, &k));
    CHECK_EQ(h.top_deadline(), 30);
}

TEST_MAIN()
