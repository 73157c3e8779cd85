// StatusPage: the file it creates, the byte layout of PROTOCOL.md "Status page", the seqlock,
// when it writes, and what it does with files already at its path.
#include "status.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "check.h"
#include "log.h"

using fr::RouterLoad;
using fr::StatusPage;

namespace {

struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/fr-status-XXXXXX";
        path = mkdtemp(tmpl);
        fr::log_set_quiet(true);
    }
    ~TempDir() {
        std::string cmd = "rm -rf '" + path + "'";
        if (system(cmd.c_str()) != 0) fprintf(stderr, "could not remove %s\n", path.c_str());
    }
};

// The page as a reader sees it: bytes read through a separate descriptor.
struct Snapshot {
    std::string bytes;
    uint64_t at(size_t off) const {
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--) v = (v << 8) | static_cast<uint8_t>(bytes[off + i]);
        return v;
    }
};

Snapshot read_page(const std::string& path) {
    Snapshot s;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return s;
    s.bytes.resize(StatusPage::kSize);
    ssize_t n = pread(fd, &s.bytes[0], s.bytes.size(), 0);
    close(fd);
    s.bytes.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return s;
}

bool exists(const std::string& path) {
    struct stat st;
    return lstat(path.c_str(), &st) == 0;
}

}  // namespace

TEST(creates_a_private_page_with_magic_pid_and_even_seq) {
    TempDir d;
    std::string path = d.path + "/router.sock.status";
    StatusPage page;
    std::string err;
    CHECK(page.open(path, 5000000, &err));
    CHECK_EQ(err, std::string());
    struct stat st;
    CHECK(stat(path.c_str(), &st) == 0);
    CHECK_EQ(st.st_mode & 07777, 0600u);
    CHECK_EQ(static_cast<size_t>(st.st_size), StatusPage::kSize);
    Snapshot s = read_page(path);
    CHECK_EQ(s.bytes.size(), StatusPage::kSize);
    if (s.bytes.size() != StatusPage::kSize) return;
    CHECK_EQ(s.bytes.substr(0, 8), std::string("PRSTAT1\0", 8));
    CHECK_EQ(s.at(8) % 2, 0u);
    CHECK_EQ(s.at(72), static_cast<uint64_t>(getpid()));
    CHECK_EQ(s.at(64), 5000000u);
    for (size_t off = 16; off < 64; off += 8) CHECK_EQ(s.at(off), 0u);
    CHECK_EQ(s.at(80), 0u);
    CHECK_EQ(s.bytes.find_first_not_of('\0', StatusPage::kEnd), std::string::npos);
}

TEST(publishes_each_field_at_its_documented_offset) {
    TempDir d;
    std::string path = d.path + "/s";
    StatusPage page;
    std::string err;
    CHECK(page.open(path, 1000, &err));
    uint64_t seq0 = read_page(path).at(8);
    RouterLoad l;
    l.workers = 3;
    l.workers_idle = 1;
    l.queued = 17;
    l.in_flight = 2;
    l.service_ewma_us = 4242;
    l.queue_wait_ewma_us = 99;
    l.stopping = true;
    page.publish(l, 2000);
    Snapshot s = read_page(path);
    CHECK_EQ(s.at(8), seq0 + 2);
    CHECK_EQ(s.at(16), 3u);
    CHECK_EQ(s.at(24), 1u);
    CHECK_EQ(s.at(32), 17u);
    CHECK_EQ(s.at(40), 2u);
    CHECK_EQ(s.at(48), 4242u);
    CHECK_EQ(s.at(56), 99u);
    CHECK_EQ(s.at(64), 2000u);
    CHECK_EQ(s.at(72), static_cast<uint64_t>(getpid()));
    CHECK_EQ(s.at(80), 1u);
}

TEST(writes_only_on_change_or_when_a_refresh_is_due) {
    TempDir d;
    std::string path = d.path + "/s";
    StatusPage page;
    std::string err;
    CHECK(page.open(path, 1000000, &err));
    RouterLoad l;
    l.queued = 1;
    page.publish(l, 1000010);
    uint64_t seq = read_page(path).at(8);
    page.publish(l, 1000020);  // same load, refresh not due: nothing written
    CHECK_EQ(read_page(path).at(8), seq);
    CHECK_EQ(read_page(path).at(64), 1000010u);
    CHECK_EQ(page.next_refresh(), 1000010 + StatusPage::kRefreshUs);
    page.publish(l, 1000010 + StatusPage::kRefreshUs);  // due: updated_us moves
    CHECK_EQ(read_page(path).at(8), seq + 2);
    CHECK_EQ(read_page(path).at(64), static_cast<uint64_t>(1000010 + StatusPage::kRefreshUs));
    l.workers_idle = 1;
    page.publish(l, 1000010 + StatusPage::kRefreshUs + 1);  // changed: written at once
    CHECK_EQ(read_page(path).at(8), seq + 4);
    CHECK_EQ(read_page(path).at(24), 1u);
}

TEST(close_removes_the_file_but_not_a_successors) {
    TempDir d;
    std::string path = d.path + "/s";
    std::string err;
    {
        StatusPage page;
        CHECK(page.open(path, 1, &err));
        CHECK(exists(path));
        page.close();
        CHECK(!exists(path));
        page.close();  // twice is harmless
    }
    StatusPage page;
    CHECK(page.open(path, 1, &err));
    unlink(path.c_str());
    int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    close(fd);
    page.close();
    CHECK(exists(path));  // someone else's file now: left alone
}

TEST(a_stale_page_is_replaced_a_live_one_refused) {
    TempDir d;
    std::string path = d.path + "/s";
    std::string err;
    // Garbage left at the path: replaced.
    int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    CHECK(write(fd, "junk", 4) == 4);
    close(fd);
    {
        StatusPage page;
        CHECK(page.open(path, 10 * 1000000, &err));
        struct stat st;
        CHECK(stat(path.c_str(), &st) == 0 && (st.st_mode & 07777) == 0600);
    }
    // A page another live process (our parent stands in) wrote 0.5 s ago: refused.
    std::string live(StatusPage::kSize, '\0');
    std::memcpy(&live[0], "PRSTAT1\0", 8);
    auto put = [&](size_t off, uint64_t v) {
        for (int i = 0; i < 8; i++) live[off + i] = static_cast<char>(v >> (8 * i));
    };
    put(StatusPage::kPid, static_cast<uint64_t>(getppid()));
    put(StatusPage::kUpdatedUs, 10 * 1000000);
    fd = open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    CHECK(write(fd, live.data(), live.size()) == static_cast<ssize_t>(live.size()));
    close(fd);
    StatusPage other;
    CHECK(!other.open(path, 10 * 1000000 + 500000, &err));
    CHECK(err.find("still publishing") != std::string::npos);
    CHECK(err.find(std::to_string(getppid())) != std::string::npos);
    // The same page once it has not been updated for over a second: stale, replaced.
    err.clear();
    CHECK(other.open(path, 10 * 1000000 + 1500000, &err));
    CHECK_EQ(read_page(path).at(StatusPage::kPid), static_cast<uint64_t>(getpid()));
}

TEST(never_writes_through_a_symlink) {
    TempDir d;
    std::string target = d.path + "/target";
    std::string path = d.path + "/s";
    int fd = open(target.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    close(fd);
    CHECK(symlink(target.c_str(), path.c_str()) == 0);
    StatusPage page;
    std::string err;
    CHECK(!page.open(path, 1, &err));
    CHECK(err.find("not a regular file") != std::string::npos);
    struct stat st;
    CHECK(stat(target.c_str(), &st) == 0 && st.st_size == 0);
}

TEST(a_missing_directory_is_an_error_naming_the_path) {
    StatusPage page;
    std::string err;
    CHECK(!page.open("/nonexistent-fr-dir/s", 1, &err));
    CHECK(err.find("/nonexistent-fr-dir/s") != std::string::npos);
    CHECK(!page.is_open());
}

TEST_MAIN()
