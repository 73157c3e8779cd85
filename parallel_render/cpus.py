"""The CPUs this process has, and a counter of the CPU time it leaves unused.

A node in a container or beside other services does not have the machine: its cpuset (the
CPUs it may run on, os.sched_getaffinity) can be a few of the host's, and its cgroup can
allow less CPU time than those CPUs have (`docker run --cpus=2`, a Kubernetes CPU limit:
cgroup v2 cpu.max, v1 cpu.cfs_quota_us). os.cpu_count() and /proc/uptime speak of the host.
`this_process()` reads what applies here, and `CpuShare.idle_counter()` picks the counter of
unused time to match:

- a quota below the cpuset: the quota's time less what the cgroup used (v2 cpu.stat
  usage_usec, v1 cpuacct.usage);
- a cpuset smaller than the host: the idle time of those CPUs (/proc/stat's cpuN lines);
- the whole host: /proc/uptime's idle time, the cheapest read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from parallel_render.syscalls import read_whole


def whole_cpus(capacity: float) -> int:
    """A capacity in whole CPUs (a quota of 1.5 CPUs is 2: both can be running at once)."""
    return max(1, math.ceil(round(capacity, 6)))


@dataclass(frozen=True)
class CpuShare:
    cpus: tuple[int, ...]  # the CPUs this process may run on
    host_cpus: int  # the CPUs the machine has
    quota: float | None = None  # the CPUs' worth of time its cgroup allows; None: no limit
    quota_source: str = ""  # the file that set it
    usage_path: str | None = None  # the cgroup's CPU time used (v2 cpu.stat, v1 cpuacct.usage)

    @property
    def quota_binds(self) -> bool:
        return self.quota is not None and self.quota < len(self.cpus)

    @property
    def capacity(self) -> float:
        """The CPUs' worth of time this process's group may use."""
        return min(len(self.cpus), self.quota) if self.quota is not None else float(len(self.cpus))

    @property
    def cores(self) -> int:
        return whole_cpus(self.capacity)

    def describe(self) -> str:
        text = f"{len(self.cpus)} of the machine's {self.host_cpus} CPUs"
        if self.quota is not None:
            text += f", a cgroup quota of {self.quota:g} CPUs ({self.quota_source})"
        return text

    def idle_counter(self, clock: Callable[[], float] = time.monotonic) -> IdleCounter:
        if self.quota_binds and self.usage_path is not None and self.quota is not None:
            return CgroupIdle(self.usage_path, self.quota, clock)
        if len(self.cpus) < self.host_cpus:
            return CpusIdle(self.cpus)
        return UptimeIdle(cores=len(self.cpus))


class IdleCounter:
    """Seconds of CPU time left unused, summed over `cores` worth of CPUs, since some origin.

    read() keeps one descriptor open and preads it; it raises OSError or ValueError where the
    counter cannot be read.
    """

    path: str
    cores: float

    def __init__(self, path: str, cores: float) -> None:
        self.path = path
        self.cores = cores
        self._fd: int | None = None

    def _text(self) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return read_whole(self._fd)

    def read(self) -> float:
        raise NotImplementedError


class UptimeIdle(IdleCounter):
    """/proc/uptime's second field: the idle time of every CPU of the machine (10 ms steps)."""

    def __init__(self, path: str = "/proc/uptime", cores: float | None = None) -> None:
        super().__init__(path, cores or os.cpu_count() or 1)

    def read(self) -> float:
        return float(self._text().split()[1])


class CpusIdle(IdleCounter):
    """The idle time of some CPUs: the fourth value of their cpuN lines in /proc/stat, in
    clock ticks."""

    def __init__(self, cpus: tuple[int, ...], path: str = "/proc/stat") -> None:
        super().__init__(path, len(cpus))
        self.names = {f"cpu{cpu}".encode() for cpu in cpus}
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK")

    def read(self) -> float:
        ticks, seen = 0, 0
        for line in self._text().splitlines():
            if not line.startswith(b"cpu"):
                break  # the cpuN lines come first
            fields = line.split()
            if fields[0] in self.names:
                ticks += int(fields[4])
                seen += 1
        if seen != len(self.names):
            raise ValueError(f"{self.path} lists {seen} of {len(self.names)} CPUs")
        return ticks * self.tick


class CgroupIdle(IdleCounter):
    """What a cgroup's quota leaves unused: the quota's CPU time since an origin less the
    time its processes used."""

    def __init__(self, path: str, quota: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(path, quota)
        self.clock = clock

    def read(self) -> float:
        text = self._text()
        if self.path.endswith("cpu.stat"):  # v2: "usage_usec N" among other lines
            used = next(int(line.split()[1]) for line in text.splitlines() if line.startswith(b"usage_usec ")) / 1e6
        else:  # v1 cpuacct.usage: nanoseconds
            used = int(text) / 1e9
        return self.cores * self.clock() - used


def this_process(proc: str = "/proc", affinity: tuple[int, ...] | None = None,
                 host_cpus: int | None = None) -> CpuShare:
    """The CPUs this process may use: its cpuset, and its cgroup's quota where one is set
    (the smallest along its cgroup's ancestors)."""
    if affinity is None:
        try:
            affinity = tuple(sorted(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            affinity = tuple(range(os.cpu_count() or 1))
    host = host_cpus or os.cpu_count() or len(affinity)
    try:
        groups = _cgroup_dirs(proc)
    except (OSError, ValueError):
        return CpuShare(affinity, host)
    if "cpu" in groups:  # cgroup v1 (the cpu controller's hierarchy; usage in cpuacct's)
        quota, source = _smallest_quota(*groups["cpu"], _v1_quota, "cpu.cfs_quota_us")
        usage = groups["cpuacct"][0] / "cpuacct.usage" if "cpuacct" in groups else None
    elif "" in groups:  # cgroup v2
        quota, source = _smallest_quota(*groups[""], _v2_quota, "cpu.max")
        usage = groups[""][0] / "cpu.stat"
    else:
        return CpuShare(affinity, host)
    return CpuShare(affinity, host, quota, source, str(usage) if usage is not None and usage.exists() else None)


def _smallest_quota(leaf: Path, top: Path, read: Callable[[Path], float | None],
                    name: str) -> tuple[float | None, str]:
    """The smallest quota from `leaf` up to `top`, and the file that set it."""
    quota, source = None, ""
    for directory in _up(leaf, top):
        limit = read(directory)
        if limit is not None and (quota is None or limit < quota):
            quota, source = limit, str(directory / name)
    return quota, source


def _cgroup_dirs(proc: str) -> dict[str, tuple[Path, Path]]:
    """Controller name ('' for cgroup v2) -> (this process's cgroup directory, its mount's
    top), for the cpu and cpuacct controllers and v2."""
    mounts: dict[str, tuple[str, str]] = {}  # controller -> (the mount's root in the hierarchy, mount point)
    for fields in _mountinfo(proc):
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        root, point = fields[3], fields[4]
        if fstype == "cgroup2":
            mounts.setdefault("", (root, point))
        elif fstype == "cgroup":
            for controller in ("cpu", "cpuacct"):
                if controller in options:
                    mounts.setdefault(controller, (root, point))
    found: dict[str, tuple[Path, Path]] = {}
    for line in Path(proc, "self", "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            if controller in mounts and controller not in found:
                root, point = mounts[controller]
                inside = path[len(root):] if root != "/" and path.startswith(root) else path
                found[controller] = (Path(point, inside.lstrip("/")), Path(point))
    return found


def _mountinfo(proc: str) -> Iterator[list[str]]:
    for line in Path(proc, "self", "mountinfo").read_text().splitlines():
        yield line.split()


def _up(leaf: Path, top: Path) -> Iterator[Path]:
    directory = leaf
    while True:
        yield directory
        if directory == top or top not in directory.parents:
            return
        directory = directory.parent


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
