"""Peers for the WITHDRAW race test, run as separate processes so they really race.

    python withdraw_peers.py worker ADDRESS LOG_PATH
    python withdraw_peers.py master ADDRESS SECONDS SEED

A worker answers every JOB at once (RESULT echoing the payload, then READY, in one write) and
appends each payload it was given to LOG_PATH, one line per job, before answering.

A master, in rounds until SECONDS have passed, submits a few jobs and takes them back newest
first: sometimes each SUBMIT immediately followed by its WITHDRAW in the same write, sometimes
all WITHDRAWs in one write, sometimes one WITHDRAW at a time waiting for its WITHDRAWN, and
sometimes it leaves a job to the workers. It waits for every answer of a round before the next,
then prints one JSON line: every job's payload and answers, and the WITHDRAWN count per job.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastrouter_wire import (
    BUSY,
    ERROR,
    JOB,
    MASTER,
    READY,
    RESULT,
    SUBMIT,
    TAKEN,
    TIMEOUT,
    WITHDRAW,
    WITHDRAWN,
    WORKER,
    Peer,
    encode,
    register_key,
)

TERMINAL = (RESULT, ERROR, TIMEOUT, BUSY)


def worker(address: str, log_path: str) -> None:
    peer = Peer(address, WORKER)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    peer.send(READY)
    while True:
        try:
            frame = peer.recv(timeout=3600)
        except AssertionError:
            return  # the router closed the connection
        if frame.type == JOB:
            os.write(log, frame.payload + b"\n")
            peer.send_raw(encode(RESULT, frame.job_id, b"re:" + frame.payload) + encode(READY))


def master(address: str, seconds: str, seed: str) -> None:
    rng = random.Random(int(seed))
    peer = Peer(address, MASTER)
    payloads: dict[int, str] = {}
    answers: dict[int, list[str]] = {}  # "RESULT", "TAKEN", ... in arrival order
    withdrawn_replies: dict[int, int] = {}
    withdraws_sent: dict[int, int] = {}
    bad: list[str] = []
    next_id = 0

    def take(frame) -> None:
        if frame.type == WITHDRAWN:
            withdrawn_replies[frame.job_id] = withdrawn_replies.get(frame.job_id, 0) + 1
            if frame.flags & TAKEN:
                answers[frame.job_id].append("TAKEN")
            if frame.flags & ~TAKEN or frame.payload:
                bad.append(repr(frame))
        elif frame.type in TERMINAL:
            answers[frame.job_id].append({RESULT: "RESULT", ERROR: "ERROR", TIMEOUT: "TIMEOUT", BUSY: "BUSY"}[frame.type])
            if frame.type == RESULT and frame.payload != b"re:" + payloads[frame.job_id].encode():
                bad.append(f"job {frame.job_id}: result {frame.payload!r} is not its own")
        else:
            bad.append(repr(frame))

    def settled(ids: list[int]) -> bool:
        return all(answers[i] for i in ids) and all(
            withdrawn_replies.get(i, 0) >= withdraws_sent.get(i, 0) for i in ids
        )

    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        ids = []
        for _ in range(rng.randint(1, 6)):
            next_id += 1
            ids.append(next_id)
            payloads[next_id] = f"{seed}:{next_id}"
            answers[next_id] = []
        style = rng.choice(["paired", "burst", "one_by_one", "one_by_one"])
        keep = {i for i in ids if rng.random() < 0.15}  # left to the workers
        targets = [i for i in reversed(ids) if i not in keep]  # newest first
        for i in targets:
            withdraws_sent[i] = withdraws_sent.get(i, 0) + 1
        if style == "paired":
            data = b""
            for i in ids:
                data += encode(SUBMIT, i, payloads[i].encode(), timeout_ms=10000)
                if i not in keep:
                    data += encode(WITHDRAW, i)
            peer.send_raw(data)
        else:
            peer.send_raw(b"".join(encode(SUBMIT, i, payloads[i].encode(), timeout_ms=10000) for i in ids))
            if style == "burst":
                peer.send_raw(b"".join(encode(WITHDRAW, i) for i in targets))
            else:
                for i in targets:
                    peer.send(WITHDRAW, i)
                    while withdrawn_replies.get(i, 0) < 1:
                        take(peer.recv(timeout=10))
        while not settled(ids):
            take(peer.recv(timeout=10))
    # A second answer to anything would arrive now.
    try:
        while True:
            take(peer.recv(timeout=0.2))
    except AssertionError:
        pass
    print(
        json.dumps(
            {
                "payloads": payloads,
                "answers": answers,
                "withdraws_sent": withdraws_sent,
                "withdrawn_replies": withdrawn_replies,
                "bad": bad,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    # The router's key, from the test (RouterProcess.env()); empty for a --no-auth router.
    register_key(sys.argv[2], bytes.fromhex(os.environ.get("FASTROUTER_TEST_KEY", "")) or None)
    {"worker": worker, "master": master}[sys.argv[1]](*sys.argv[2:])
