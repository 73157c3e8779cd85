"""Where a block renders: sent to a worker only when that can make the page sooner.

Two things must have room for it: a worker (the router's status page), and a CPU (the
share of CPU time left idle, CpuRoom).

A block sent to a router with no idle worker only waits in its queue while the master, which
could render it, goes on and then waits for it: under load that makes pages slower than
plain Django. So a master asks the router's status page (shared memory, no syscall) before
each block, and when it reaches the point of waiting it takes back, newest first, every one
of its blocks that no worker has started (middleware.gather). A block it keeps that mostly
waits may go to one of its block threads (parallel_render.threads, THREAD_IDLE_SHARE). The
reasoning and the measurements behind the numbers are in docs/dispatch.md.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from collections.abc import Callable

from parallel_render import cpus
from parallel_render.client import RouterLoad

# Blocks cheaper than this (by their measured cost) travel together, several to a job (a
# bundle), rather than a job each; a bundle goes out once it holds this much work.
BATCH_MS = 1.0


class CpuRoom:
    """Whether this machine's CPUs have room for more work: the share of their time left idle.

    Sending a block costs CPU that rendering it here does not (capturing and encoding its
    values, sealing, two hops through the router, the worker's set-up), and a worker renders
    it colder than the master would (its own caches, another process's memory): on the demo
    site the node spent about 1.2 ms more CPU on a block it sent than the 3.3 ms of rendering
    it in place. When the CPUs are busy, that CPU comes out of the pages being served, and
    the node serves fewer of them than plain Django would.

    The counter of unused CPU time is the one that fits where this process runs
    (parallel_render.cpus: /proc/uptime's idle time on the whole machine, the idle time of a
    cpuset's CPUs, or what a cgroup's quota left unused). Its share of the CPUs' time between
    reads at least SAMPLE_EVERY apart, averaged over the last MEMORY seconds (one read shared
    by the process's threads, a pread that keeps the interpreter lock: syscalls.read_whole), is
    what the machine left unused: has_room(share) says whether that is at least share. After a
    quiet spell the average starts afresh (QUIET). The kernel counts idle time
    whoever reads it and whenever: a count of runnable tasks (/proc/loadavg), which this
    replaced, is read by a master thread while it runs, sees the machine only at such
    moments, and reported no room at a load that left a fifth of the CPU time idle.
    """

    SAMPLE_EVERY = 0.01
    MEMORY = 0.1  # seconds
    # No read for this long: no page asked, and the node was quiet. The next read starts the
    # average afresh (sample()).
    QUIET = 0.1

    def __init__(self, counter: cpus.IdleCounter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = counter
        self._cores: int | None = None
        self.clock = clock
        self.idle: float | None = None  # the moving average; None: not known (yet, or here)
        self._idle_seconds = 0.0  # at _read_at
        self._read_at: float | None = None
        self._lock = threading.Lock()
        self._broken = False

    @property
    def counter(self) -> cpus.IdleCounter:
        if self._counter is None:
            self._counter = cpus.this_process().idle_counter(self.clock)
        return self._counter

    @property
    def cores(self) -> int:
        """The CPUs' worth of time this process's node may use, in whole CPUs."""
        if self._cores is None:
            self._cores = cpus.whole_cpus(self.counter.cores)
        return self._cores

    def sample(self) -> float | None:
        """The moving average of the share of CPU time left idle, read again when the last
        read is old."""
        now = self.clock()
        if self._broken or not self._lock.acquire(blocking=False):
            return self.idle
        try:
            if self._read_at is not None and now - self._read_at < self.SAMPLE_EVERY:
                return self.idle
            counter = self.counter
            idle_seconds = counter.read()
            previous_at, previous = self._read_at, self._idle_seconds
            self._read_at, self._idle_seconds = now, idle_seconds
            if previous_at is None or now - previous_at >= self.QUIET:
                # The quiet spell's idle time says nothing of the pages arriving now: blended in,
                # a burst on an idle node read as room for about 0.2 s, and its pages sent their
                # blocks to workers on CPUs they already filled. Not known until the next read.
                self.idle = None
                return None
            elapsed = now - previous_at
            unused = min(1.0, max(0.0, (idle_seconds - previous) / (elapsed * counter.cores)))
            weight = 1.0 - math.exp(-elapsed / self.MEMORY)
            self.idle = unused if self.idle is None else self.idle + weight * (unused - self.idle)
            return self.idle
        except (OSError, IndexError, ValueError, StopIteration):
            self._broken = True  # not Linux, or no /proc: the CPU is not a reason to keep a block
            self.idle = None
            return None
        finally:
            self._lock.release()

    def has_room(self, share: float) -> bool:
        idle = self.sample()
        return idle is None or idle >= share


cpu_room = CpuRoom()


def measured(started: tuple[float, float]) -> tuple[float, float]:
    """Since `started` (start_measuring()): the wall time and this thread's CPU time, in ms."""
    wall, cpu = started
    return (time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000


def start_measuring() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class RunQueueClock:
    """How long the thread that first reads it has waited for a CPU (runnable, not running),
    in ms: the second field of /proc/thread-self/schedstat, read with a pread on a descriptor
    kept open. None where it cannot be read.

    A worker renders one block at a time on one thread, so a render's time less its CPU time
    and this wait is the time it slept: on a database, memcached, HTTP (a master's thread
    also waits for the interpreter lock its other threads hold, which no counter shows).
    """

    def __init__(self, path: str = "/proc/thread-self/schedstat") -> None:
        self.path = path
        self._fd: int | None = None
        self._broken = False

    def read(self) -> float | None:
        if self._broken:
            return None
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e6
        except (OSError, IndexError, ValueError):
            self._broken = True
            return None


# A block is sent only while at least IDLE_SHARE of the CPUs' time is idle, and more the more
# CPU its worker's render costs over the master's: IDLE_PER_EXTRA for each time over, up to
# IDLE_MOST. A block measured only in workers is taken to cost DEFAULT_EXTRA more, until the
# master renders it too (it does, once the CPUs are busier than that allows).
IDLE_SHARE = 0.1
IDLE_PER_EXTRA = 0.4
IDLE_MOST = 0.5
DEFAULT_EXTRA = 0.5


def idle_needed(here_cpu_ms: float | None, sent_cpu_ms: float | None) -> float:
    """The share of CPU time that must be idle for a block with these CPU costs (median ms
    of CPU of a render in the master, and in a worker) to be sent."""
    if not here_cpu_ms or sent_cpu_ms is None:
        extra = DEFAULT_EXTRA
    else:
        extra = max(0.0, sent_cpu_ms / here_cpu_ms - 1.0)
    return min(IDLE_MOST, IDLE_SHARE + IDLE_PER_EXTRA * extra)


# A block the master keeps goes to one of its block threads (parallel_render.threads) only
# while at least this share of the CPUs' time is idle: overlapping a page's waits helps only
# where a CPU is free to run what the overlap frees. On busy CPUs it only gives the pages
# whose blocks found a thread a larger share of their master than the others, whose tail
# then grows (docs/dispatch.md).
THREAD_IDLE_SHARE = 0.05


# While less than this share of the CPUs' time is idle, a page may keep out to workers only its
# share of them (the workers over the pages in flight on the node, share_of_workers()); the
# rest of its blocks stay with its master, as when no worker is idle. Without it, the first
# pages to arrive take every worker, and the pages beside them render every block in their
# masters, on CPUs the workers keep busy: at 4 connections on the demo page, the slowest
# parallel pages were those, their page thread waiting for a CPU three times as long as a
# serial page's (docs/dispatch.md). With idle CPU, a page takes what is free: the others lose
# nothing by it.
FAIR_IDLE_SHARE = 0.3


class MasterSlots:
    """One 8-byte count per master of a node, in memory the node's gunicorn arbiter maps before
    it forks its masters (anonymous and shared: no file, and no process outside the arbiter's
    tree sees it). A master writes only its own slot (its CPU slot, node.pre_fork, claimed in
    node.post_fork); the arbiter resets a slot to EMPTY when its master exits (node.child_exit).
    """

    EMPTY = 0  # what a slot without a master holds

    def __init__(self, slots: int = 64) -> None:
        self._memory = mmap.mmap(-1, 8 * slots)  # MAP_SHARED | MAP_ANONYMOUS, zeroed
        self.counts = memoryview(self._memory).cast("q")
        if self.EMPTY:
            for i in range(slots):
                self.counts[i] = self.EMPTY
        self.slot: int | None = None  # this master's, once claimed

    def claim(self, slot: int) -> None:
        """In a master just forked: publish this process's count in that slot from now on."""
        if 0 <= slot < len(self.counts):
            self.slot = slot
            self.counts[slot] = 0
        else:  # more masters than slots: this one publishes nothing
            self.slot = None

    def clear(self, slot: int) -> None:
        """In the arbiter, a master has exited (killed mid-request, too): its counts are gone."""
        if 0 <= slot < len(self.counts):
            self.counts[slot] = self.EMPTY

    def publish(self, count: int) -> None:
        if self.slot is not None:
            self.counts[self.slot] = count


class NodePages(MasterSlots):
    """How many pages each master of a node is rendering now; any master reads the sum.

    The connections do not come to the masters evenly: at 4 connections on two masters, one
    often has three pages and the other one. A master that took the node's pages to be its
    own times the masters gave the crowded master's pages the smallest share of the workers,
    when theirs are the pages that wait longest for their master (docs/dispatch.md).
    """

    def total(self, here: int) -> int:
        """The node's pages in flight, `here` being this process's."""
        return sum(self.counts) + (0 if self.slot is not None else here)


class PagesInFlight:
    """How many pages this process is rendering with a render session now (middleware), and,
    in a node's master, the node's (NodePages)."""

    def __init__(self) -> None:
        self.count = 0
        self.node: NodePages | None = None  # set in a node's masters (node.on_starting, post_fork)
        self._lock = threading.Lock()

    def __enter__(self) -> PagesInFlight:
        with self._lock:
            self.count += 1
            if self.node is not None:
                self.node.publish(self.count)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.count -= 1
            if self.node is not None:
                self.node.publish(self.count)

    def on_node(self) -> int:
        """The pages in flight on the node: this process's alone where it is the only master
        (runserver) or knows of no others (a gunicorn without the node's configuration)."""
        node = self.node
        return self.count if node is None else node.total(self.count)


pages_in_flight = PagesInFlight()


def share_of_workers(workers: int, pages: float) -> int:
    """The blocks one of `pages` pages may keep out to `workers` workers at once: at least one."""
    return max(1, math.ceil(workers / max(pages, 1.0)))


def holds_its_share(load: RouterLoad | None, out: Callable[[], int]) -> bool:
    """Whether a page with out() blocks with workers (or queued for them) already holds its
    share of the workers, while the CPUs are busy enough for that to matter (FAIR_IDLE_SHARE).
    out is called only then."""
    if load is None or load.workers == 0:
        return False
    pages = pages_in_flight.on_node()
    if pages <= 1 or cpu_room.has_room(FAIR_IDLE_SHARE):
        return False
    return out() >= share_of_workers(load.workers, pages)


def holds_its_threads(threads: int, in_threads: Callable[[], int]) -> bool:
    """Whether a page with in_threads() blocks in its master's `threads` block threads already
    holds its share of them (the threads over this master's pages in flight), while the CPUs
    are busy enough for that to matter (FAIR_IDLE_SHARE). in_threads is called only then.

    As with the workers: without it, the first page to keep its blocks takes every thread,
    the pages beside it wait in their blocks one after another, and theirs set the tail
    (docs/dispatch.md)."""
    pages = pages_in_flight.count
    if pages <= 1 or cpu_room.has_room(FAIR_IDLE_SHARE):
        return False
    return in_threads() >= share_of_workers(threads, pages)


def every_cpu_has_a_page() -> bool:
    """Whether the node has at least as many pages in flight as CPUs while the CPUs are busy
    (less than FAIR_IDLE_SHARE of their time idle). A block that computes more than it waits
    is then done no sooner in a worker: each page already has a CPU, and its blocks sent
    would take their CPU from the pages beside it, whose tail grows, while the idle time
    they leave as they finish unevenly lets the next pages send theirs (docs/dispatch.md)."""
    if cpu_room.has_room(FAIR_IDLE_SHARE):
        return False
    return pages_in_flight.on_node() >= cpu_room.cores


def should_send(
    load: RouterLoad | None, cost_ms: float | None, nested: bool = False, here_cpu_ms: float | None = None,
    sent_cpu_ms: float | None = None,
) -> bool:
    """Whether a block of this expected cost should go to the router now, given its load and
    the CPUs' (here_cpu_ms, sent_cpu_ms: the CPU time of its renders in the master and in a
    worker, when measured; idle_needed()).

    Without a status page (a TCP router) every block is sent: the take-back at the end of
    the page keeps a queued block from costing more than the master rendering it itself.
    """
    if load is None:
        return True
    if load.stopping or load.workers == 0:
        return False
    if not cpu_room.has_room(idle_needed(here_cpu_ms, sent_cpu_ms)):
        # The CPUs are busy: a worker would render it no sooner, and sending costs CPU.
        return False
    ahead = load.queued - load.idle  # jobs that no idle worker will take before this one
    if ahead < 0:
        return True  # a worker is idle now
    if nested or cost_ms is None:
        # A nested block may not queue at all; an unmeasured one renders here, which measures it.
        return False
    # Workers free up one every service_us / workers on average; this block starts after the
    # ones ahead of it. If that wait is longer than rendering it, the master renders it.
    wait_ms = (ahead + 1) * load.service_us / load.workers / 1000.0
    return wait_ms < cost_ms
