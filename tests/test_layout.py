"""The CPU layout planner: Quora's proportions on 32 cores, the same shape on other sizes."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from parallel_render.layout import WORKERS_PER_CORE, Layout, plan


def cores(cpu_sets) -> list[int]:
    return sorted({c for cpus in cpu_sets for c in cpus})


def check_shape(layout: Layout) -> None:
    """Every CPU has one job; the router has a core; masters go two to a core, workers four."""
    groups = [set(layout.kernel_cpus), set(layout.router_cpus), set(cores(layout.master_cpus)), set(cores(layout.worker_cpus))]
    assert sorted(c for g in groups for c in g) == list(layout.cpus)
    assert len(layout.master_cpus) == layout.masters and len(layout.worker_cpus) == layout.workers
    for core in cores(layout.master_cpus):
        assert sum(1 for cpus in layout.master_cpus if cpus == (core,)) == 2
    for core in cores(layout.worker_cpus):
        assert sum(1 for cpus in layout.worker_cpus if cpus == (core,)) == WORKERS_PER_CORE


def test_32_cores_is_quoras_ultralisk_machine():
    layout = plan(32)
    assert layout.pinned
    assert (layout.masters, layout.workers) == (6, 4 * 27)
    assert layout.kernel_cpus == (0,)
    assert layout.router_cpus == (1,)
    assert cores(layout.master_cpus) == [2, 3, 4]
    assert cores(layout.worker_cpus) == list(range(5, 32))
    check_shape(layout)


@pytest.mark.parametrize(
    ("n", "masters", "workers", "kernel", "master_cores"),
    [(8, 2, 20, 1, 1), (16, 4, 48, 1, 2), (32, 6, 108, 1, 3), (64, 12, 220, 2, 6)],
)
def test_other_sizes_keep_the_proportions(n, masters, workers, kernel, master_cores):
    layout = plan(n)
    assert (layout.masters, layout.workers) == (masters, workers)
    assert len(layout.kernel_cpus) == kernel and len(layout.router_cpus) == 1
    assert len(cores(layout.master_cpus)) == master_cores
    check_shape(layout)


def test_2_cores_pins_nothing_and_says_why():
    layout = plan(2)
    assert not layout.pinned
    assert (layout.masters, layout.workers) == (2, 8)
    assert layout.for_worker(0) == () and layout.for_master(0) == ()
    assert "pinning needs at least 4" in layout.reason
    assert "no pinning" in layout.describe()


def test_the_plan_uses_the_cpus_this_process_may_run_on():
    layout = plan([4, 5, 6, 7, 12, 13, 14, 15])  # a cpuset, not 0..7
    assert layout.kernel_cpus == (4,) and layout.router_cpus == (5,)
    assert cores(layout.worker_cpus) == [7, 12, 13, 14, 15]


def test_overrides_share_the_group_cores_and_say_so():
    layout = plan(8, masters=5, workers=12)
    assert (layout.masters, layout.workers) == (5, 12)
    assert cores(layout.master_cpus) == [2] and cores(layout.worker_cpus) == [3, 4, 5, 6, 7]
    assert layout.worker_cpus[0] == layout.worker_cpus[5] == (3,)
    assert any("share" in note for note in layout.notes)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        plan(8, workers=0)


def test_runparallel_layout_prints_the_plan():
    out = io.StringIO()
    call_command("runparallel", "--layout", "--masters", "3", "--workers", "5", stdout=out)
    text = out.getvalue()
    assert "3 masters, 5 workers, 1 router" in text
    out = io.StringIO()
    call_command("runparallel", "--layout", "--no-affinity", stdout=out)
    assert "no pinning" in out.getvalue()
