"""WITHDRAW / WITHDRAWN over real sockets: a master takes back jobs no worker has started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fastrouter_wire import (
    BUSY,
    ERROR,
    HIGH,
    JOB,
    MASTER,
    PROTOCOL_ERROR,
    READY,
    RESULT,
    SHUTDOWN,
    SUBMIT,
    TAKEN,
    WITHDRAW,
    WITHDRAWN,
    WORKER,
    Peer,
    stats,
)
from test_fastrouter import ready_worker, wait_for, wait_idle

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "withdraw_peers.py")
RACE_SECONDS = float(os.environ.get("FASTROUTER_WITHDRAW_RACE_SECONDS", "3"))
DOC = (Path(__file__).resolve().parents[2] / "fastrouter" / "PROTOCOL.md").read_text()


def doc_example(caption: str) -> bytes:
    match = re.search(re.escape(caption) + r"\s*\n\n((?:    [0-9a-f ]+\n)+)", DOC)
    assert match, f"no example {caption!r} in PROTOCOL.md"
    return bytes.fromhex(match.group(1).replace("\n", " "))


def withdraw(master: Peer, job_id: int) -> int:
    """Sends WITHDRAW and returns the WITHDRAWN flags."""
    master.send(WITHDRAW, job_id)
    frame = master.expect(WITHDRAWN, job_id)
    assert frame.payload == b"" and frame.timeout_ms == 0
    return frame.flags


def test_queued_jobs_are_taken_back_newest_first_and_never_reach_a_worker(router):
    master = Peer(router.address, MASTER)
    for job_id in (1, 2, 3):
        master.send(SUBMIT, job_id, f"job{job_id}".encode(), timeout_ms=5000)
    assert wait_for(lambda: stats(router.address)["queued"] == 3)
    assert withdraw(master, 3) == TAKEN
    assert withdraw(master, 2) == TAKEN
    s = stats(router.address)
    assert s["queued"] == 1 and s["withdrawn"] == 2 and s["withdraw_missed"] == 0
    worker = ready_worker(router.address)
    job = worker.expect(JOB)
    assert job.payload == b"job1"
    worker.send(RESULT, job.job_id, b"done")
    worker.send(READY)
    assert master.expect(RESULT, 1).payload == b"done"
    worker.expect_nothing(0.2)
    master.expect_nothing(0.1)
    # A withdrawn id is free again at once.
    master.send(SUBMIT, 3, b"again", timeout_ms=5000)
    job = worker.expect(JOB)
    assert job.payload == b"again"


def test_job_with_a_worker_is_not_taken_and_its_result_still_arrives(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, 5, b"x", timeout_ms=5000)
    job = worker.expect(JOB)
    assert withdraw(master, 5) == 0
    worker.send(RESULT, job.job_id, b"rendered")
    assert master.expect(RESULT, 5).payload == b"rendered"
    s = stats(router.address)
    assert s["withdraw_missed"] == 1 and s["withdrawn"] == 0 and s["completed"] == 1


def test_answered_or_unknown_job_is_not_taken_and_its_answer_came_first(start_router):
    router = start_router("--max-queue", "1")
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, 1, b"fills the queue", timeout_ms=5000)
    master.send(SUBMIT, 2, b"busy", timeout_ms=5000)
    master.send(WITHDRAW, 2)
    master.send(WITHDRAW, 99)
    assert master.expect(BUSY, 2)
    assert master.expect(WITHDRAWN, 2).flags == 0
    assert master.expect(WITHDRAWN, 99).flags == 0
    # Another master cannot take this master's job.
    other = Peer(router.address, MASTER)
    assert withdraw(other, 1) == 0
    assert stats(router.address)["queued"] == 1
    assert withdraw(master, 1) == TAKEN


def test_protocol_md_withdraw_examples_byte_for_byte(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, 7, b"hi", flags=HIGH, timeout_ms=5000)
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    master.send_raw(doc_example("WITHDRAW for job 7:"))
    master.send_raw(doc_example("WITHDRAW for job 7:"))
    master.sock.settimeout(2)
    expected = doc_example("WITHDRAWN for job 7, TAKEN:") + doc_example("WITHDRAWN for job 7, not taken:")
    got = b""
    while len(got) < len(expected):
        chunk = master.sock.recv(len(expected) - len(got))
        assert chunk, got
        got += chunk
    assert got == expected


@pytest.mark.parametrize(
    "role, frame, flags, reason",
    [
        (MASTER, (WITHDRAW, 1, b"x"), 0, b"WITHDRAW payload must be empty"),
        (MASTER, (WITHDRAW, 1, b""), TAKEN, b"unknown flag bits"),
        (WORKER, (WITHDRAW, 1, b""), 0, b"WITHDRAW is not allowed on a worker"),
        (MASTER, (WITHDRAWN, 1, b""), TAKEN, b"WITHDRAWN is not allowed on a master"),
    ],
)
def test_withdraw_that_breaks_the_rules_closes_only_the_offender(router, role, frame, flags, reason):
    offender = Peer(router.address, role)
    offender.send(frame[0], frame[1], frame[2], flags=flags)
    err = offender.expect(PROTOCOL_ERROR)
    assert reason in err.payload, err.payload
    assert offender.wait_closed()
    healthy = Peer(router.address, MASTER)
    healthy.send(SUBMIT, 1, b"q", timeout_ms=5000)
    assert withdraw(healthy, 1) == TAKEN


def test_withdraw_during_the_drain_is_not_taken_and_every_job_is_answered_once(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, 1, b"with the worker", timeout_ms=5000)
    job = worker.expect(JOB)
    master.send(SUBMIT, 2, b"queued", timeout_ms=5000)
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    router.proc.send_signal(signal.SIGTERM)
    assert master.expect(ERROR, 2).flags == SHUTDOWN
    assert withdraw(master, 2) == 0  # already answered SHUTDOWN
    assert withdraw(master, 1) == 0  # a worker has it
    worker.send(RESULT, job.job_id, b"finished during drain")
    assert master.expect(RESULT, 1).payload == b"finished during drain"
    assert router.proc.wait(5) == 0
    master.expect_nothing(0.1)
    assert master.wait_closed()


def test_withdraw_racing_idle_workers_gives_every_job_exactly_one_outcome(start_router, private_dir):
    """Masters submit and at once withdraw while idle workers READY/RESULT as fast as they can.

    Whichever frame the router reads first wins: every job is either seen by a worker and
    answered RESULT, or answered WITHDRAWN TAKEN and seen by no worker; never both, never
    neither, and every WITHDRAW gets exactly one WITHDRAWN.
    """
    router = start_router()
    logs = [os.path.join(private_dir, f"worker{i}.log") for i in range(3)]
    workers = [
        subprocess.Popen([sys.executable, PEERS, "worker", router.address, log], env=router.env()) for log in logs
    ]
    try:
        assert wait_for(lambda: stats(router.address)["workers_idle"] == len(workers), timeout=10)
        masters = [
            subprocess.Popen(
                [sys.executable, PEERS, "master", router.address, str(RACE_SECONDS), str(seed)],
                stdout=subprocess.PIPE,
                text=True,
                env=router.env(),
            )
            for seed in range(1, 6)
        ]
        reports = []
        for m in masters:
            out, _ = m.communicate(timeout=RACE_SECONDS + 60)
            assert m.returncode == 0, out
            reports.append(json.loads(out.strip().splitlines()[-1]))
        final = stats(router.address)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    seen: dict[str, int] = {}
    for log in logs:
        with open(log) as f:
            for line in f.read().splitlines():
                seen[line] = seen.get(line, 0) + 1

    taken = results = withdraws = contested = 0
    for report in reports:
        assert report["bad"] == [], report["bad"][:5]
        for job_id, got in report["answers"].items():
            payload = report["payloads"][job_id]
            assert len(got) == 1, f"job {payload}: answers {got}"
            assert got[0] in ("RESULT", "TAKEN"), f"job {payload}: answers {got}"
            sent = report["withdraws_sent"].get(job_id, 0)
            assert report["withdrawn_replies"].get(job_id, 0) == sent, f"job {payload}"
            withdraws += sent
            if got[0] == "TAKEN":
                taken += 1
                assert payload not in seen, f"job {payload} was withdrawn but a worker saw it"
            else:
                results += 1
                assert seen.get(payload) == 1, f"job {payload} got RESULT but workers saw it {seen.get(payload)} times"
                contested += sent
        assert set(report["withdrawn_replies"]) <= set(report["withdraws_sent"])
    assert sum(seen.values()) == results  # workers saw nothing that was not answered
    # Both outcomes happened, many times, or the race was not exercised.
    assert taken > 50 and contested > 50, (taken, contested, results)
    assert final["withdrawn"] == taken
    assert final["withdraw_missed"] == withdraws - taken
    assert final["completed"] == results
    assert final["queued"] == 0 and final["in_flight"] == 0
    assert final["protocol_errors"] == 0
    assert wait_for(lambda: stats(router.address)["jobs_live"] == 0)
