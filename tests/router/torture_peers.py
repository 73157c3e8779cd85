"""Peers for the torture test, run as separate processes so they can be killed with SIGKILL.

    python torture_peers.py worker ADDRESS SEED
    python torture_peers.py master ADDRESS JOBS SEED

A master keeps a window of jobs outstanding until it has submitted JOBS, waits for every
answer, then prints one JSON line: how many it submitted, and which ids got no answer or
more than one.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastrouter_wire import BUSY, ERROR, JOB, MASTER, READY, RESULT, SUBMIT, TIMEOUT, WORKER, Peer, register_key


def worker(address: str, seed: str) -> None:
    rng = random.Random(int(seed))
    peer = Peer(address, WORKER)
    peer.send(READY)
    while True:
        frame = peer.recv(timeout=3600)
        if frame.type == JOB:
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.005)
            peer.send_raw(_result(frame.job_id, frame.payload))


def _result(job_id: int, payload: bytes) -> bytes:
    from fastrouter_wire import encode

    return encode(RESULT, job_id, payload) + encode(READY)


def master(address: str, jobs: str, seed: str) -> None:
    rng = random.Random(int(seed))
    peer = Peer(address, MASTER)
    total = int(jobs)
    answers: dict[int, list[int]] = {}
    sent = 0
    outstanding = 0
    while sent < total or outstanding:
        while sent < total and outstanding < 8:
            sent += 1
            peer.send(SUBMIT, job_id=sent, payload=os.urandom(rng.choice([0, 10, 1000])), timeout_ms=rng.choice([200, 2000]))
            answers[sent] = []
            outstanding += 1
        frame = peer.recv(timeout=10)
        assert frame.type in (RESULT, ERROR, TIMEOUT, BUSY), frame
        if not answers[frame.job_id]:
            outstanding -= 1
        answers[frame.job_id].append(frame.type)
    time.sleep(0.2)  # a duplicate answer would arrive now
    try:
        while True:
            frame = peer.recv(timeout=0.05)
            answers.setdefault(frame.job_id, []).append(frame.type)
    except AssertionError:
        pass
    kinds: dict[str, int] = {}
    for got in answers.values():
        for t in got[:1]:
            kinds[str(t)] = kinds.get(str(t), 0) + 1
    print(json.dumps({
        "submitted": sent,
        "unanswered": [i for i, got in answers.items() if not got],
        "duplicates": [i for i, got in answers.items() if len(got) > 1],
        "kinds": kinds,
    }), flush=True)


if __name__ == "__main__":
    # The router's key, from the test (RouterProcess.env()); empty for a --no-auth router.
    register_key(sys.argv[2], bytes.fromhex(os.environ.get("FASTROUTER_TEST_KEY", "")) or None)
    {"worker": worker, "master": master}[sys.argv[1]](*sys.argv[2:])
