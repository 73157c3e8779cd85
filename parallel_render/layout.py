"""The CPU layout of a node, planned from its cores the way Quora's Ultralisk machines were.

On 32 cores Quora ran 6 masters two to a core (3 cores), 27 worker cores, the fastrouter on
its own core, and left one core to the kernel for interrupts. `plan()` keeps those proportions
on other sizes, with four workers to each worker core (blocks mostly wait on I/O);
`apply_affinity()` is the one place that pins a process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from parallel_render.cpus import this_process

logger = logging.getLogger("parallel_render")

# Below this many CPUs a core of its own for the kernel, the router, the masters and at
# least one worker cannot be had, so processes are left to the scheduler.
MIN_PINNED_CPUS = 4
MASTERS_PER_CORE = 2
# Blocks mostly wait (on the database, memcached, HTTP), so one worker per core leaves cores
# idle while pages queue: four share each worker core. A worker costs about 35-45 MB of
# memory of its own (docs/dispatch.md); CPU-bound blocks lose nothing, since the masters take
# back what the workers have not started.
WORKERS_PER_CORE = 4


@dataclass(frozen=True)
class Layout:
    cpus: tuple[int, ...]
    masters: int
    workers: int
    kernel_cpus: tuple[int, ...] = ()
    router_cpus: tuple[int, ...] = ()
    master_cpus: tuple[tuple[int, ...], ...] = ()  # one entry per master
    worker_cpus: tuple[tuple[int, ...], ...] = ()  # one entry per worker
    pinned: bool = False
    reason: str = ""  # why pinned is False
    notes: list[str] = field(default_factory=list, compare=False)

    def for_master(self, slot: int) -> tuple[int, ...]:
        return self.master_cpus[slot % len(self.master_cpus)] if self.pinned else ()

    def for_worker(self, slot: int) -> tuple[int, ...]:
        return self.worker_cpus[slot % len(self.worker_cpus)] if self.pinned else ()

    def describe(self) -> str:
        lines = [f"{_n(len(self.cpus), 'CPU')} ({_ranges(self.cpus)}): {_n(self.masters, 'master')}, "
                 f"{_n(self.workers, 'worker')}, 1 router"]
        if not self.pinned:
            lines.append(f"no pinning: {self.reason}")
        else:
            master_cores = sorted({c for cpus in self.master_cpus for c in cpus})
            worker_cores = sorted({c for cpus in self.worker_cpus for c in cpus})
            lines += [
                f"  kernel   CPU {_ranges(self.kernel_cpus)} (left to interrupts and the OS)",
                f"  router   CPU {_ranges(self.router_cpus)}",
                f"  masters  CPU {_ranges(master_cores)} ({_per_core(self.masters, len(master_cores))})",
                f"  workers  CPU {_ranges(worker_cores)} ({_per_core(self.workers, len(worker_cores))})",
            ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan(cpus: Sequence[int] | int | None = None, masters: int | None = None, workers: int | None = None) -> Layout:
    """Plan a node on `cpus` (ids, a count, or None for the CPUs this process may use).

    `masters` and `workers` override the counts; the cores keep the planned split and
    extra processes share their group's cores round-robin.
    """
    if cpus is None:
        share = this_process()
        if share.quota_binds:
            # The cgroup allows less time than its CPUs have: plan for that many, unpinned
            # (pinning would only choose which of them throttle).
            counted = plan(share.cores, masters, workers)
            return Layout(share.cpus, counted.masters, counted.workers, notes=counted.notes,
                          reason=f"{share.describe()}: planned for {_n(share.cores, 'CPU')}, "
                          "processes are left to the scheduler")
        cpus = share.cpus
    elif isinstance(cpus, int):
        cpus = range(cpus)
    ids = tuple(sorted(cpus))
    n = len(ids)
    if n < 1:
        raise ValueError("a layout needs at least one CPU")
    for name, value in (("masters", masters), ("workers", workers)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if n < MIN_PINNED_CPUS:
        # Unpinned processes share the cores.
        m = masters or 2
        w = workers or WORKERS_PER_CORE * n
        return Layout(ids, m, w, reason=f"{_n(n, 'CPU')}: pinning needs at least "
                      f"{MIN_PINNED_CPUS} (one each for the kernel, the router, two masters and a worker); "
                      "processes are left to the scheduler")
    kernel_n = max(1, n // 32)
    master_cores_n = max(1, round(n * 3 / 32))
    worker_cores_n = n - kernel_n - 1 - master_cores_n
    kernel = ids[:kernel_n]
    router = ids[kernel_n:kernel_n + 1]
    master_cores = ids[kernel_n + 1:kernel_n + 1 + master_cores_n]
    worker_cores = ids[kernel_n + 1 + master_cores_n:]
    assert len(worker_cores) == worker_cores_n >= 1
    m = masters or MASTERS_PER_CORE * master_cores_n
    w = workers or WORKERS_PER_CORE * worker_cores_n
    notes = []
    if m > MASTERS_PER_CORE * master_cores_n:
        notes.append(f"{m} masters on {master_cores_n} core(s): more than {MASTERS_PER_CORE} share a core")
    if w > WORKERS_PER_CORE * worker_cores_n:
        notes.append(f"{w} workers on {worker_cores_n} core(s): more than {WORKERS_PER_CORE} share a core")
    return Layout(
        ids, m, w, kernel, router,
        master_cpus=tuple((master_cores[(i // MASTERS_PER_CORE) % master_cores_n],) for i in range(m)),
        worker_cpus=tuple((worker_cores[i % worker_cores_n],) for i in range(w)),
        pinned=True, notes=notes,
    )


def unpinned(layout: Layout, reason: str) -> Layout:
    return Layout(layout.cpus, layout.masters, layout.workers, reason=reason, notes=layout.notes)


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (a container's cpuset, not the host's count)."""
    return this_process().cpus


_pinning_failed = False


def apply_affinity(pid: int, cpus: Sequence[int]) -> bool:
    """Pin process `pid` to `cpus`. Where the platform cannot, warn once and pin nothing more."""
    if not cpus or _pinning_failed:
        return False
    try:
        import psutil
    except ImportError as exc:
        return _cannot_pin(exc)
    try:
        psutil.Process(pid).cpu_affinity(list(cpus))
        return True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False  # it exited meanwhile; its replacement is pinned when it starts
    except (AttributeError, OSError, ValueError, psutil.Error) as exc:
        return _cannot_pin(exc)


def _cannot_pin(exc: BaseException) -> bool:
    global _pinning_failed
    _pinning_failed = True
    logger.warning("CPU pinning is not possible here (%s: %s); processes are left to the scheduler",
                   type(exc).__name__, exc)
    return False


def _ranges(cpus: Sequence[int]) -> str:
    out: list[str] = []
    ids = sorted(cpus)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out) or "-"


def _per_core(count: int, cores: int) -> str:
    if count == cores:
        return "one to a core"
    if count == MASTERS_PER_CORE * cores:
        return "two to a core"
    if count == WORKERS_PER_CORE * cores:
        return "four to a core"
    return f"{count} on {cores} core{'s' if cores > 1 else ''}"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
