"""What a {% parallel %} block costs in CPU, per process role, when it does no work at all.

One run starts a private router and workers, sends every block (MIN_BLOCK_MS=0, and
ADAPTIVE=False so none is kept back because the workers are busy), and
renders a page of N trivial blocks in this process through the middleware (Django's test
client), serially and in parallel, alternating which mode goes first each round. The CPU
time (user + system) of this process (the master), of the router and of every worker is
read before and after each batch of pages; a block's overhead is (parallel - serial) / blocks
for each role, and the table shows the median over the rounds.

Blocks this cheap travel to the workers in bundles, several to a job (docs/dispatch.md);
--alone sends each in a job of its own, which is what a block worth sending alone costs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from parallel_render.bench import need_psutil
from parallel_render.bench.stats import summary, table

HELP = "CPU each block costs the master, the router and the workers (parallel minus serial)"

ROLES = ("master", "router", "workers", "total")


def process_cpu(pid: int) -> float:
    """Seconds of CPU a process has used, to the nanosecond: the scheduler's run time of each
    of its threads (/proc/PID/task/*/schedstat). /proc/PID/stat counts 10 ms ticks, too coarse
    for a batch of pages; it is the fallback where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def kernel_cpu(pid: int) -> float:
    """Seconds of CPU a process has spent in the kernel (10 ms ticks: summed over a whole run)."""
    import psutil

    return psutil.Process(pid).cpu_times().system


def sample(pids: Sequence[int], of: Callable[[int], float] = process_cpu) -> dict[str, float]:
    """CPU seconds so far of this process, the router (pids[0]) and the workers (the rest)."""
    return {"master": of(os.getpid()), "router": of(pids[0]), "workers": sum(of(p) for p in pids[1:])}


def batch(
    fetch: Callable[[bool], Any], serial: bool, pages: int, pids: Sequence[int]
) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """CPU seconds, and of those kernel seconds, each role spent on `pages` pages, and each
    page's wall time in ms."""
    walls = []
    before, kernel_before = sample(pids), sample(pids, kernel_cpu)
    for _ in range(pages):
        started = time.perf_counter()
        fetch(serial)
        walls.append((time.perf_counter() - started) * 1000)
    after, kernel_after = sample(pids), sample(pids, kernel_cpu)
    return (
        {role: after[role] - before[role] for role in before},
        {role: kernel_after[role] - kernel_before[role] for role in before},
        walls,
    )


def run(fetch: Callable[[bool], Any], pids_of: Callable[[], list[int]], blocks: int, pages: int, rounds: int,
        warmup: int = 5) -> dict[str, Any]:
    """Rounds of `pages` serial and `pages` parallel pages, interleaved; per-block µs per role."""
    for _ in range(warmup):
        fetch(False)
        fetch(True)
    per_round: dict[str, list[float]] = {role: [] for role in ROLES}
    cpu_ms: dict[str, dict[str, list[float]]] = {"serial": {}, "parallel": {}}
    kernel = {role: 0.0 for role in ROLES}  # parallel - serial kernel seconds, whole run
    walls: dict[str, list[float]] = {"serial": [], "parallel": []}
    for i in range(rounds):
        pids = pids_of()
        spent, in_kernel = {}, {}
        for mode in (("serial", "parallel") if i % 2 else ("parallel", "serial")):
            spent[mode], in_kernel[mode], page_walls = batch(fetch, mode == "serial", pages, pids)
            walls[mode] += page_walls
            for role, seconds in spent[mode].items():
                cpu_ms[mode].setdefault(role, []).append(seconds * 1000 / pages)
        if pids != pids_of():  # a worker was restarted mid-round: its CPU is not comparable
            continue
        for role in ROLES[:-1]:
            per_round[role].append((spent["parallel"][role] - spent["serial"][role]) * 1e6 / (pages * blocks))
            kernel[role] += in_kernel["parallel"][role] - in_kernel["serial"][role]
        per_round["total"].append(sum(per_round[role][-1] for role in ROLES[:-1]))
    if not per_round["total"]:
        raise RuntimeError("every round saw a worker restart; nothing to report")
    kernel["total"] = sum(kernel[role] for role in ROLES[:-1])
    measured_blocks = len(per_round["total"]) * pages * blocks
    return {
        "kernel_us_per_block": {role: seconds * 1e6 / measured_blocks for role, seconds in kernel.items()},
        "blocks": blocks,
        "pages": pages,
        "rounds": len(per_round["total"]),
        "us_per_block": {role: statistics.median(v) for role, v in per_round.items()},
        "us_per_block_min": {role: min(v) for role, v in per_round.items()},
        "us_per_block_max": {role: max(v) for role, v in per_round.items()},
        "us_per_block_rounds": per_round,
        "cpu_ms_per_page": {mode: {role: statistics.median(v) for role, v in roles.items()} for mode, roles in cpu_ms.items()},
        "wall_ms": {mode: summary(v) for mode, v in walls.items()},
    }


def format_result(result: dict[str, Any], command: str) -> str:
    us, lo, hi = result["us_per_block"], result["us_per_block_min"], result["us_per_block_max"]
    cpu, kernel = result["cpu_ms_per_page"], result["kernel_us_per_block"]
    rows = [
        [role, us[role], lo[role], hi[role], kernel[role], cpu["serial"].get(role, sum(cpu["serial"].values())),
         cpu["parallel"].get(role, sum(cpu["parallel"].values()))]
        for role in ROLES
    ]
    w = result["wall_ms"]
    walls = [[mode, w[mode]["p50"], w[mode]["p90"], w[mode]["p99"]] for mode in ("serial", "parallel")]
    return (
        f"{result['blocks']} trivial blocks per page ({result.get('jobs', 'bundles')}), "
        f"{result['pages']} pages per mode per round, "
        f"{result['rounds']} rounds interleaved; µs of CPU per block = (parallel - serial) / blocks, "
        "median (min, max) over rounds; the kernel's part over the whole run\n"
        + table(["role", "µs/block", "min", "max", "of which kernel", "serial CPU ms/page", "parallel CPU ms/page"], rows)
        + "\n\nwall time per page\n"
        + table(["mode", "p50 ms", "p90 ms", "p99 ms"], walls)
        + f"\n\nreproduce: {command}\n"
    )


def add_arguments(parser: Any) -> None:
    parser.add_argument("--blocks", type=int, default=100, help="trivial blocks per page")
    parser.add_argument("--path", default="/trivial/?n={blocks}", help="the page ({blocks} is replaced)")
    parser.add_argument("--pages", type=int, default=20, help="pages per mode in each round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (the table shows medians)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--alone", action="store_true",
                        help="one job per block, as for blocks costing more than a bundle's worth (1 ms)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def check_page(client: Any, path: str, blocks: int) -> None:
    """The parallel page equals the serial one and every block went to a worker."""
    from django.conf import settings
    from django.test import override_settings

    from parallel_render.testing import serially, worker_rendered

    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SERVER_TIMING": True}):
        with serially():
            serial = client.get(path)
        parallel = client.get(path)
    if serial.status_code != 200 or parallel.content != serial.content:
        raise RuntimeError(f"{path}: the parallel page is not the serial page (status {parallel.status_code})")
    sent = len(worker_rendered(parallel))
    if sent != blocks:
        raise RuntimeError(f"{path}: {sent} of {blocks} blocks were rendered by workers; the rest stayed in the master")


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson
    from django.conf import settings
    from django.core.management.base import CommandError
    from django.test import Client, override_settings

    from parallel_render import conf, policy
    from parallel_render.cluster import LocalCluster

    for name in ("blocks", "pages", "rounds", "workers"):
        if options[name] < 1:
            raise CommandError(f"--{name} must be at least 1")
    need_psutil("overhead")
    blocks = options["blocks"]
    path = options["path"].format(blocks=blocks)
    command = (
        f"python manage.py parallel_bench overhead --blocks {blocks} --pages {options['pages']} "
        f"--rounds {options['rounds']} --workers {options['workers']}"
        + (" --alone" if options["alone"] else "")
        + (f" --path '{options['path']}'" if options["path"] != "/trivial/?n={blocks}" else "")
    )
    client = Client()

    def fetch(serial: bool) -> None:
        response = client.get(path, **({"HTTP_X_PARALLEL_RENDER": "serial"} if serial else {}))
        if response.status_code != 200:
            raise CommandError(f"{path} answered {response.status_code}")

    with LocalCluster(options["workers"]) as cluster:
        cluster.wait_ready()
        config = {**(getattr(settings, "PARALLEL_RENDER", None) or {}), "MIN_BLOCK_MS": 0, "ROUTER": cluster.address,
                  "SERIAL_HEADER": "X-Parallel-Render"}
        if "ADAPTIVE" in conf.DEFAULTS:
            # Every block goes to a worker: this measures what sending one costs.
            config["ADAPTIVE"] = False
        bundle_ms = policy.BATCH_MS
        if options["alone"]:
            policy.BATCH_MS = 0.0
        try:
            with override_settings(PARALLEL_RENDER=config):
                check_page(client, path, blocks)

                def pids() -> list[int]:
                    assert cluster.router is not None
                    return [cluster.router.pid, *cluster.worker_pids]

                result = run(fetch, pids, blocks, options["pages"], options["rounds"])
        finally:
            policy.BATCH_MS = bundle_ms
    result.update(path=path, workers=options["workers"], debug=settings.DEBUG, command=command,
                  jobs="one per block" if options["alone"] else "bundles")
    stdout.write(orjson.dumps(result).decode() if options["json"] else format_result(result, command))
