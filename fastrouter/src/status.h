// The status page of PROTOCOL.md "Status page": the router's load in a small shared file that
// masters map, so deciding whether a job would only queue costs them no syscall. This is the
// file side only; the numbers come from Router::load().
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "router.h"

namespace fr {

class StatusPage {
public:
    static constexpr size_t kSize = 4096;
    static constexpr char kMagic[8] = {'P', 'R', 'S', 'T', 'A', 'T', '1', '\0'};
    // Byte offsets of the little-endian u64 fields.
    static constexpr size_t kSeq = 8;
    static constexpr size_t kWorkers = 16;
    static constexpr size_t kWorkersIdle = 24;
    static constexpr size_t kQueued = 32;
    static constexpr size_t kInFlight = 40;
    static constexpr size_t kServiceEwmaUs = 48;
    static constexpr size_t kQueueWaitEwmaUs = 56;
    static constexpr size_t kUpdatedUs = 64;
    static constexpr size_t kPid = 72;
    static constexpr size_t kStopping = 80;
    static constexpr size_t kEnd = 88;
    // Rewritten at least this often, so readers can tell a live router from a dead one.
    static constexpr int64_t kRefreshUs = 100 * 1000;
    // A file at our path written this recently by a live process belongs to another router.
    static constexpr int64_t kLiveUs = 1000 * 1000;

    StatusPage() = default;
    ~StatusPage() { close(); }
    StatusPage(const StatusPage&) = delete;
    StatusPage& operator=(const StatusPage&) = delete;

    // Creates `path` (mode 0600, never through a symlink; a stale file is replaced) and maps
    // it. The caller has checked the directory. On failure returns false with *err set.
    bool open(const std::string& path, int64_t now_us, std::string* err);
    bool is_open() const { return base_ != nullptr; }
    const std::string& path() const { return path_; }

    // Writes `load` under the seqlock if it differs from the last one written or the page
    // is due for a refresh; otherwise does nothing. Never allocates.
    void publish(const RouterLoad& load, int64_t now_us);
    // When publish() will write even if nothing changed.
    int64_t next_refresh() const { return written_at_ + kRefreshUs; }

    // Unmaps the page and removes the file (if it is still ours).
    void close();

private:
    std::atomic<uint64_t>* field(size_t off) {
        return reinterpret_cast<std::atomic<uint64_t>*>(base_ + off);
    }
    void write(const RouterLoad& load, int64_t now_us);

    uint8_t* base_ = nullptr;
    std::string path_;
    dev_t dev_ = 0;
    ino_t ino_ = 0;
    uint64_t seq_ = 0;  // the last even value written
    RouterLoad last_;
    int64_t written_at_ = 0;
};

}  // namespace fr
