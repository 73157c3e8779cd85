"""The CPUs a node has: its cpuset and its cgroup's quota, not the host's count, and a counter
of the time it leaves unused that reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from parallel_render import cpus, layout, syscalls
from tests.conftest import a_thread_keeping_the_lock_busy


def fake_proc(tmp_path: Path, mountinfo: list[str], cgroup: list[str]) -> str:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (proc / "self" / "cgroup").write_text("\n".join(cgroup) + "\n")
    return str(proc)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cgroup_v2_quota_is_the_smallest_along_the_ancestors(tmp_path):
    """A Kubernetes pod's limit (1.5 CPUs) above a container with none, on 8 CPUs."""
    top = tmp_path / "sys" / "fs" / "cgroup"
    proc = fake_proc(tmp_path, [f"30 23 0:26 / {top} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate"],
                     ["0::/kubepods/pod1/c1"])
    write(top / "kubepods" / "cpu.max", "max 100000\n")
    write(top / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    write(top / "kubepods" / "pod1" / "c1" / "cpu.max", "max 100000\n")
    write(top / "kubepods" / "pod1" / "c1" / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\n")
    share = cpus.this_process(proc, affinity=tuple(range(8)), host_cpus=8)
    assert share.quota == 1.5 and share.quota_binds
    assert share.quota_source == str(top / "kubepods" / "pod1" / "cpu.max")
    assert (share.capacity, share.cores) == (1.5, 2)
    assert "8 of the machine's 8 CPUs, a cgroup quota of 1.5 CPUs" in share.describe()
    now = [10.0]
    counter = share.idle_counter(clock=lambda: now[0])
    assert isinstance(counter, cpus.CgroupIdle) and counter.cores == 1.5
    before = counter.read()  # 1.5 CPUs for 10 s, less the 2.5 s used
    assert before == pytest.approx(15.0 - 2.5)
    now[0] += 1.0  # a second in which the cgroup used 0.6 s of its 1.5
    write(top / "kubepods" / "pod1" / "c1" / "cpu.stat", "usage_usec 3100000\n")
    assert (counter.read() - before) / 1.5 == pytest.approx(0.6)  # idle share


def test_a_cgroup_v1_quota_under_a_containers_own_mount_root(tmp_path):
    """Docker on cgroup v1 without a cgroup namespace: the hierarchy is mounted from the
    container's own cgroup, and /proc/self/cgroup names the full path."""
    root = tmp_path / "sys" / "fs" / "cgroup"
    proc = fake_proc(tmp_path, [
        f"40 30 0:35 /docker/abc {root / 'cpu'} ro,nosuid - cgroup cgroup rw,cpu",
        f"41 30 0:36 /docker/abc {root / 'cpuacct'} ro,nosuid - cgroup cgroup rw,cpuacct",
    ], ["3:cpuacct:/docker/abc", "2:cpu:/docker/abc", "0::/"])
    write(root / "cpu" / "cpu.cfs_quota_us", "200000\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpuacct" / "cpuacct.usage", "1000000000\n")
    share = cpus.this_process(proc, affinity=tuple(range(4)), host_cpus=64)
    assert share.quota == 2.0 and share.cores == 2
    assert share.usage_path == str(root / "cpuacct" / "cpuacct.usage")
    counter = share.idle_counter(clock=lambda: 3.0)
    assert isinstance(counter, cpus.CgroupIdle) and counter.read() == pytest.approx(2 * 3.0 - 1.0)


def test_no_quota_a_quota_above_the_cpuset_and_unreadable_cgroups(tmp_path):
    top = tmp_path / "cg"
    proc = fake_proc(tmp_path, [f"30 23 0:26 / {top} rw - cgroup2 cgroup2 rw"], ["0::/a"])
    write(top / "a" / "cpu.max", "max 100000\n")
    share = cpus.this_process(proc, affinity=(0, 1, 2, 3), host_cpus=4)
    assert share.quota is None and share.cores == 4
    assert isinstance(share.idle_counter(), cpus.UptimeIdle)
    write(top / "a" / "cpu.max", "800000 100000\n")  # 8 CPUs' worth on a cpuset of 2 of 16
    share = cpus.this_process(proc, affinity=(2, 3), host_cpus=16)
    assert share.quota == 8.0 and not share.quota_binds and share.cores == 2
    counter = share.idle_counter()
    assert isinstance(counter, cpus.CpusIdle) and counter.cores == 2
    share = cpus.this_process(str(tmp_path / "no-proc"), affinity=(0, 1), host_cpus=2)
    assert share == cpus.CpuShare((0, 1), 2)


def test_a_quota_plans_an_unpinned_node_for_that_many_cpus(monkeypatch):
    share = cpus.CpuShare(tuple(range(32)), 32, quota=4.0, quota_source="cpu.max")
    monkeypatch.setattr(layout, "this_process", lambda: share)
    planned = layout.plan()
    assert not planned.pinned and planned.cpus == tuple(range(32))
    assert (planned.masters, planned.workers) == (layout.plan(4).masters, layout.plan(4).workers)
    assert "a cgroup quota of 4 CPUs (cpu.max): planned for 4 CPUs" in planned.describe()


# -- on this machine's kernel --------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from parallel_render import cpus, layout, syscalls, policy

    for path in sys.argv[1:]:  # join these cgroups before anything else
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    pin = os.environ.get("PIN")
    if pin:
        os.sched_setaffinity(0, {int(pin)})
    share = cpus.this_process()
    room, host = policy.CpuRoom(), policy.CpuRoom(cpus.UptimeIdle())
    for r in (room, host):
        r.QUIET = float("inf")  # the counter's share over the sleep below, not a fresh start after it

    def idle_over(seconds):
        for r in (room, host):
            r._read_at = None; r.idle = None; r.sample()
        time.sleep(seconds)
        return room.sample(), host.sample()

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # inherits both
    time.sleep(0.2)
    busy, host_busy = idle_over(0.5)
    spinner.kill(); spinner.wait()
    time.sleep(0.2)
    quiet, _ = idle_over(0.5)
    print(json.dumps({"quota": share.quota, "cpus": share.cpus, "cores": room.cores,
                      "counter": type(room.counter).__name__, "busy": busy, "host_busy": host_busy,
                      "quiet": quiet, "layout": layout.plan().describe()}))
""")


def probe(*cgroups: str, pin: int | None = None) -> dict:
    env = dict(os.environ, PIN="" if pin is None else str(pin))
    out = subprocess.run([sys.executable, "-c", PROBE, *cgroups], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out)


def test_a_pinned_node_reads_the_idle_time_of_its_own_cpus():
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        pytest.skip("needs 2 CPUs: one to keep busy, one to leave")
    seen = probe(pin=mine[-1])
    assert seen["cpus"] == [mine[-1]] and seen["cores"] == 1 and seen["counter"] == "CpusIdle"
    # A process spinning on its one CPU leaves it no idle time, while the machine's other
    # CPUs (which /proc/uptime counts) are idle.
    assert seen["busy"] < 0.15, seen
    assert seen["host_busy"] > seen["busy"] + 0.25, seen
    assert seen["quiet"] > 0.6, seen


@pytest.fixture
def quota_cgroup():
    """A cgroup of this machine allowed half a CPU, which the probe joins (root only)."""
    groups = cpus._cgroup_dirs("/proc")
    made: list[Path] = []
    name = f"parallel-render-test-{uuid.uuid4().hex[:8]}"
    try:
        if "cpu" in groups:  # v1: a group in the cpu hierarchy, and one in cpuacct to count it
            cpu = groups["cpu"][0] / name
            cpu.mkdir()
            made.append(cpu)
            (cpu / "cpu.cfs_period_us").write_text("100000")
            (cpu / "cpu.cfs_quota_us").write_text("50000")
            if "cpuacct" in groups and groups["cpuacct"][1] != groups["cpu"][1]:
                acct = groups["cpuacct"][0] / name
                acct.mkdir()
                made.append(acct)
        elif "" in groups:  # v2: a sibling of this process's group (a group with processes has no children with controllers)
            leaf, top = groups[""]
            group = (leaf.parent if leaf != top else top) / name
            group.mkdir()
            made.append(group)
            if not (group / "cpu.max").exists():
                raise OSError(f"the cpu controller is not enabled below {group.parent}")
            (group / "cpu.max").write_text("50000 100000")
        else:
            pytest.skip("no cgroup hierarchy with the cpu controller")
    except OSError as exc:
        for path in reversed(made):
            path.rmdir()
        pytest.skip(f"cannot make a cgroup here: {exc}")
    yield [str(path) for path in made]
    for path in reversed(made):
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:  # its last process is still leaving
                time.sleep(0.05)


def test_a_node_under_a_cpu_quota_reads_the_time_the_quota_leaves(quota_cgroup):
    seen = probe(*quota_cgroup)
    assert seen["quota"] == 0.5 and seen["cores"] == 1 and seen["counter"] == "CgroupIdle", seen
    # Half a CPU, all of it used by the spinner, while the machine's CPUs are mostly idle.
    assert seen["busy"] < 0.15, seen
    assert seen["host_busy"] > seen["busy"] + 0.25, seen
    assert seen["quiet"] > 0.6, seen
    assert "a cgroup quota of 0.5 CPUs" in seen["layout"] and "planned for 1 CPU" in seen["layout"]


def test_the_counter_is_read_whole_without_letting_go_of_the_interpreter_lock(tmp_path):
    """A master reads its CPU counter every 10 ms among threads that keep the interpreter lock
    busy: a read that let go of the lock would make its page wait for the lock to come back
    (up to the switch interval) each time."""
    assert syscalls.AVAILABLE  # Linux: libc's pread through ctypes.PyDLL
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 600)  # 153,600 bytes: three chunks
    fd = os.open(big, os.O_RDONLY)
    try:
        assert syscalls.read_whole(fd) == syscalls.read_whole(fd, locked=False) == big.read_bytes()
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        syscalls.read_whole(fd)  # closed
    stat = os.open("/proc/stat", os.O_RDONLY)
    try:
        with a_thread_keeping_the_lock_busy():
            started = time.monotonic()
            for _ in range(50):
                assert syscalls.read_whole(stat).startswith(b"cpu ")
            kept = time.monotonic() - started
            started = time.monotonic()
            for _ in range(20):
                assert syscalls.read_whole(stat, locked=False).startswith(b"cpu ")  # os.pread lets go of it
            let_go = time.monotonic() - started
    finally:
        os.close(stat)
    # A read that lets go waits a whole turn (0.2 s) whenever the spinning thread takes the
    # lock meanwhile, in most runs at least once (let_go, for the message); one that keeps it
    # never does, and at most one turn can fall in the loop's millisecond.
    assert kept < 0.3, (kept, let_go)
