"""Torture: kill -9 workers and masters in a loop under load, then account for every job.

Surviving masters must have exactly one answer per job; once every peer is gone, STATS must
show no job entry left (`jobs_live`, `queued`, `in_flight` all 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from fastrouter_wire import stats
from test_fastrouter import wait_for

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torture_peers.py")
SECONDS = float(os.environ.get("FASTROUTER_TORTURE_SECONDS", "6"))


def spawn(router, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PEERS, *args], stdout=subprocess.PIPE, text=True, env=router.env())


def test_kill_9_workers_and_masters_under_load(start_router):
    router = start_router("--max-queue", "64")
    rng = random.Random(2024)
    workers = [spawn(router, "worker", router.address, str(i)) for i in range(4)]
    doomed = [spawn(router, "master", router.address, "1000000", str(100 + i)) for i in range(2)]
    survivors = [spawn(router, "master", router.address, "3000", str(200 + i)) for i in range(3)]
    kills = {"worker": 0, "master": 0}
    end = time.monotonic() + SECONDS
    n = 0
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.02, 0.15))
        n += 1
        if rng.random() < 0.6:
            victim = workers.pop(rng.randrange(len(workers)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills["worker"] += 1
            workers.append(spawn(router, "worker", router.address, str(1000 + n)))
        else:
            victim = doomed.pop(rng.randrange(len(doomed)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills["master"] += 1
            doomed.append(spawn(router, "master", router.address, "1000000", str(2000 + n)))
    for victim in doomed:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    reports = []
    for master in survivors:
        out, _ = master.communicate(timeout=60)
        assert master.returncode == 0, out
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert router.proc.poll() is None, router.stderr()
    for report in reports:
        assert report["submitted"] == 3000
        assert report["unanswered"] == [] and report["duplicates"] == [], report
    assert sum(r["kinds"].get("5", 0) for r in reports) > 0, reports  # some jobs did complete
    assert kills["worker"] > 3 and kills["master"] > 3, kills

    def clean() -> dict | None:
        s = stats(router.address)
        return s if s["jobs_live"] == 0 and s["masters"] == 0 and s["workers"] == 0 else None

    final = wait_for(clean, timeout=5)
    assert final, stats(router.address)
    assert final["queued"] == 0 and final["in_flight"] == 0 and final["queued_bytes"] == 0, final
    assert final["protocol_errors"] == 0, final
