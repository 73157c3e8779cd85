// The status page file and its seqlock writer; see status.h and PROTOCOL.md "Status page".
#include "status.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "log.h"

namespace fr {

namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "the status page needs lock-free 64-bit atomics: readers in other processes "
              "see only the bytes");
static_assert(sizeof(std::atomic<uint64_t>) == 8, "a field is 8 bytes");

uint64_t le64(uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap64(v);
#else
    return v;
#endif
}

uint64_t read_le64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof v);
    return le64(v);
}

// The pid of a live router still updating the page at `path`, or 0.
pid_t live_owner(const std::string& path, int64_t now_us) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return 0;
    uint8_t head[StatusPage::kEnd];
    ssize_t n = pread(fd, head, sizeof head, 0);
    ::close(fd);
    if (n != static_cast<ssize_t>(sizeof head)) return 0;
    if (std::memcmp(head, StatusPage::kMagic, sizeof StatusPage::kMagic) != 0) return 0;
    uint64_t pid = read_le64(head + StatusPage::kPid);
    int64_t updated = static_cast<int64_t>(read_le64(head + StatusPage::kUpdatedUs));
    if (pid == 0 || pid > INT32_MAX || static_cast<pid_t>(pid) == getpid()) return 0;
    if (now_us - updated > StatusPage::kLiveUs) return 0;
    if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return 0;
    return static_cast<pid_t>(pid);
}

}  // namespace

bool StatusPage::open(const std::string& path, int64_t now_us, std::string* err) {
    close();
    const int flags = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd = ::open(path.c_str(), flags, 0600);
    if (fd < 0 && errno == EEXIST) {
        struct stat st;
        if (lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
            *err = "refusing to replace " + path + ": it exists and is not a regular file";
            return false;
        }
        if (pid_t owner = live_owner(path, now_us)) {
            *err = "router process " + std::to_string(owner) + " is still publishing its status to " +
                   path + "; stop it, or give this router another --status-file";
            return false;
        }
        log_info("removing stale status file %s", path.c_str());
        unlink(path.c_str());
        fd = ::open(path.c_str(), flags, 0600);
    }
    if (fd < 0) {
        *err = "cannot create status file " + path + ": " + strerror(errno);
        return false;
    }
    struct stat st;
    // fchmod: a strict umask may have narrowed 0600, and masters of our uid must read it.
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, kSize) != 0 || fstat(fd, &st) != 0) {
        *err = "cannot set up status file " + path + ": " + strerror(errno);
        ::close(fd);
        unlink(path.c_str());
        return false;
    }
    void* p = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) {
        *err = "cannot map status file " + path + ": " + strerror(errno);
        unlink(path.c_str());
        return false;
    }
    base_ = static_cast<uint8_t*>(p);
    path_ = path;
    dev_ = st.st_dev;
    ino_ = st.st_ino;
    // The fresh page is all zeros; give each field an atomic to live in, then the constants.
    for (size_t off = kSeq; off < kEnd; off += 8) new (base_ + off) std::atomic<uint64_t>(0);
    std::memcpy(base_, kMagic, sizeof kMagic);
    seq_ = 0;
    field(kPid)->store(le64(static_cast<uint64_t>(getpid())), std::memory_order_relaxed);
    write(RouterLoad(), now_us);
    return true;
}

void StatusPage::publish(const RouterLoad& load, int64_t now_us) {
    if (!base_) return;
    if (load == last_ && now_us < written_at_ + kRefreshUs) return;
    write(load, now_us);
}

void StatusPage::write(const RouterLoad& load, int64_t now_us) {
    // Seqlock writer: odd while the fields change, even again once they are consistent.
    // Release stores keep the odd value ahead of every field and the fields ahead of the even
    // value (a fence would do the first, but TSan does not model fences); on x86 they are
    // plain stores.
    std::atomic<uint64_t>* seq = field(kSeq);
    seq->store(le64(seq_ + 1), std::memory_order_relaxed);
    const auto put = [this](size_t off, uint64_t v) {
        field(off)->store(le64(v), std::memory_order_release);
    };
    put(kWorkers, load.workers);
    put(kWorkersIdle, load.workers_idle);
    put(kQueued, load.queued);
    put(kInFlight, load.in_flight);
    put(kServiceEwmaUs, load.service_ewma_us);
    put(kQueueWaitEwmaUs, load.queue_wait_ewma_us);
    put(kUpdatedUs, static_cast<uint64_t>(now_us));
    put(kStopping, load.stopping ? 1 : 0);
    seq_ += 2;
    seq->store(le64(seq_), std::memory_order_release);
    last_ = load;
    written_at_ = now_us;
}

void StatusPage::close() {
    if (!base_) return;
    munmap(base_, kSize);
    base_ = nullptr;
    // Remove the file only if it is still the one we made (not a successor's).
    struct stat st;
    if (lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_)
        unlink(path_.c_str());
    path_.clear();
}

}  // namespace fr
