"""Where a block renders: sent to a worker only when that can make the page sooner.

Two things must have room for it: a worker (the router's status page), and a CPU (the
kernel's run queue, CpuRoom).

A block sent to a router with no idle worker only waits in its queue while the master, which
could render it, goes on and then waits for it: under load that makes pages slower than
plain Django. So a master asks the router's status page (shared memory, no syscall) before
each block, and when it reaches the point of waiting it takes back, newest first, every one
of its blocks that no worker has started (middleware.gather). The reasoning and the
measurements behind the numbers are in docs/dispatch.md.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

from parallel_render.client import RouterLoad

# Blocks cheaper than this (by their measured cost) travel together, several to a job (a
# bundle), rather than a job each; a bundle goes out once it holds this much work.
BATCH_MS = 1.0


class CpuRoom:
    """Whether this machine's CPUs have room for more work, from the kernel's run queue.

    Sending a block costs CPU that rendering it here does not (encoding, sealing, the hops
    through the router, the worker's set-up): when every core is already busy, that cost
    comes out of the pages being served, and the node serves fewer of them than plain
    Django would. /proc/loadavg's fourth field counts the tasks running or waiting to run
    right now, this thread included; an average over the last MEMORY seconds of samples taken
    at most every SAMPLE_EVERY seconds (one read shared by the process's threads) smooths a
    count that jumps from one instant to the next. Room means that average is at most the
    number of cores: the block's worker can have a core, the master's own once it waits.
    """

    SAMPLE_EVERY = 0.002
    # The average forgets with time, not with samples: a master that sent nothing for a while
    # (an idle site) starts again from what the CPUs do now.
    MEMORY = 0.05  # seconds

    def __init__(self, cores: int | None = None, path: str = "/proc/loadavg",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.path = path
        self.clock = clock
        self.runnable: float | None = None  # the moving average; None: cannot be read here
        self._read_at = self._sampled_at = -1.0
        self._lock = threading.Lock()
        self._broken = False

    def sample(self) -> float | None:
        """The moving average of runnable tasks, read again when the last read is old."""
        now = self.clock()
        if self._broken or now - self._read_at < self.SAMPLE_EVERY or not self._lock.acquire(blocking=False):
            return self.runnable
        try:
            self._read_at = now
            fd = os.open(self.path, os.O_RDONLY)
            try:
                text = os.read(fd, 128)
            finally:
                os.close(fd)
            running = float(text.split()[3].split(b"/")[0])
        except (OSError, IndexError, ValueError):
            self._broken = True  # not Linux, or no /proc: the CPU is not a reason to keep a block
            self.runnable = None
            return None
        finally:
            self._lock.release()
        previous, elapsed = self.runnable, now - self._sampled_at
        self._sampled_at = now
        weight = 1.0 if previous is None else 1.0 - math.exp(-elapsed / self.MEMORY)
        self.runnable = running if previous is None else previous + weight * (running - previous)
        return self.runnable

    def has_room(self) -> bool:
        runnable = self.sample()
        return runnable is None or runnable <= self.cores


cpu_room = CpuRoom()


class ThreadClock:
    """This thread's CPU time and the time it waited for a CPU while runnable, in seconds.

    /proc/thread-self/schedstat holds both (nanoseconds), read with one pread on a descriptor
    each thread keeps open. A render's wall time is its CPU time, its wait for a CPU (a busy
    machine) and its wait on everything else (a database, a cache, a service): only that last
    part is time a worker spares the master's thread (should_send). Where the file cannot be
    read, the CPU time is time.thread_time() and the wait for a CPU is not known (0).
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self._local = threading.local()
        self._broken = False

    def read(self) -> tuple[float, float]:
        if not self._broken:
            fd = getattr(self._local, "fd", None)
            try:
                if fd is None:
                    fd = self._local.fd = os.open(self.PATH, os.O_RDONLY | os.O_CLOEXEC)
                fields = os.pread(fd, 96, 0).split()
                return int(fields[0]) / 1e9, int(fields[1]) / 1e9
            except (OSError, IndexError, ValueError):
                self._broken = True
        return time.thread_time(), 0.0


thread_clock = ThreadClock()


def measured(started: tuple[float, float, float]) -> tuple[float, float, float]:
    """Since `started` (time.perf_counter() and thread_clock.read() then): the wall time, the CPU
    time and the wait for a CPU, in ms."""
    wall, cpu, runnable = started
    now_cpu, now_runnable = thread_clock.read()
    return ((time.perf_counter() - wall) * 1000, (now_cpu - cpu) * 1000, (now_runnable - runnable) * 1000)


def start_measuring() -> tuple[float, float, float]:
    return (time.perf_counter(), *thread_clock.read())


# With every core busy, a block is still sent when it waits (on a database, a cache, a
# service: not for a CPU) at least this many times as long as it runs on one: it would hold a
# master thread for that wait, and its worker needs little CPU.
WAITING_RATIO = 1.0


def should_send(
    load: RouterLoad | None, cost_ms: float | None, nested: bool = False, cpu_ms: float | None = None,
    wait_ms: float | None = None,
) -> bool:
    """Whether a block of this expected cost should go to the router now, given its load and
    the CPUs' (cpu_ms: the part of cost_ms its render spends on a CPU, wait_ms: the part it
    waits on something other than a CPU, when measured).

    Without a status page (a TCP router) every block is sent: the take-back at the end of
    the page keeps a queued block from costing more than the master rendering it itself.
    """
    if load is None:
        return True
    if load.stopping or load.workers == 0:
        return False
    if not cpu_room.has_room() and (cpu_ms is None or wait_ms is None or wait_ms < WAITING_RATIO * cpu_ms):
        # Every core is busy: a worker would render it no sooner, and sending costs CPU. On a
        # busy machine a block's time grows by its wait for a CPU, which is not a wait a worker
        # spares: only a block that mostly waits on something else is still sent.
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
