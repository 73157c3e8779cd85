"""Fixtures that start real parts: a fastrouter and worker processes on the test database."""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connections

from parallel_render.signals import BlockRecord
from parallel_render.testing import capture_blocks, parallel_workers


@pytest.fixture(scope="session", autouse=True)
def no_tally_files_left() -> Iterator[None]:
    """The {% tally %} tag of the test site counts renders in files under the temp directory
    (workers are other processes); the ones this run wrote go when it ends."""
    started = time.time()
    yield
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "pr-tally-*")):
        try:
            if os.path.getmtime(path) >= started:
                os.remove(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def cluster(django_db_setup, django_db_blocker):
    """A router and two workers on the test database, as a site's own suite would start them."""
    with parallel_workers(2, env={"PR_ROLE": "worker"}) as running:
        yield running


@pytest.fixture
def parallel(cluster, transactional_db):
    """The cluster, with every worker idle again before the test starts.

    Transactional: workers are other processes and only see committed rows.
    """
    cluster.wait_ready()
    return cluster


# Every block_finished record this process sent during the current test (see blocks()).
_records: list[BlockRecord] = []


@pytest.fixture(autouse=True)
def blocks() -> Iterator[list[BlockRecord]]:
    """What became of every block rendered in this process during the test (block_finished)."""
    global _records
    with capture_blocks() as records:
        _records = records
        try:
            yield records
        finally:
            _records = []


def blocks_of(response) -> list[BlockRecord]:
    """The block_finished records of the blocks of this test-client response's page, in page order
    (blocks sent to workers by their place in the render session, the others where they were reported)."""
    request = getattr(response, "wsgi_request", None) or getattr(response, "asgi_request", None)
    assert request is not None, "blocks_of() needs a response of Django's test client"
    records = [r for r in _records if r.request is request]
    return sorted(records, key=lambda r: -1 if r.index is None else r.index)


def block_pids(response) -> list[int]:
    """The pid of the worker that rendered each block of the page that a worker rendered."""
    return [r.pid for r in blocks_of(response) if r.outcome == "sent"]


def rescued(response) -> list[str]:
    """Why the master rendered each block it had sent (itself, or its fallback)."""
    return [r.reason for r in blocks_of(response) if r.outcome in ("rescued", "fallback")]


def thread(target, *args) -> threading.Thread:
    """A thread that makes requests through Django's test client, and closes the database
    connections it opened when it ends: the test client keeps Django from closing them after
    each request, and one left to the garbage collector is a ResourceWarning."""

    def run() -> None:
        try:
            target(*args)
        finally:
            connections.close_all()

    return threading.Thread(target=run)


def run_concurrently(fetch, clients: int = 20, rounds: int = 3, n: int = 6) -> list[str]:
    """Fetch /p/leak/ from many threads at once; return the pages that are not exactly their own.

    fetch(path) returns (body, server_timing). Each request carries a unique marker; its page
    must show that marker n + 1 times and no other request's.
    """
    bad: list[str] = []
    pids: set[int] = set()

    def one(client: int) -> None:
        for round_ in range(rounds):
            marker = f"c{client}r{round_}x"
            body, timing = fetch(f"/p/leak/?marker={marker}&n={n}&title={marker}")
            pids.update(int(pid) for pid in re.findall(r" pid (\d+)", timing))
            expected = "".join(f"<i>{marker}-{i}</i>" for i in range(n))
            if expected not in body or f"title {marker}" not in body or len(re.findall(r"c\d+r\d+x", body)) != n + 1:
                bad.append(body)

    threads = [thread(one, c) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run_concurrently.pids = pids  # type: ignore[attr-defined]
    return bad


@contextmanager
def a_thread_keeping_the_lock_busy() -> Iterator[None]:
    """Another thread running Python all along, with a 0.2 s switch interval: a call that lets
    go of the interpreter lock waits up to that long to get it back."""
    spinning = threading.Event()
    stop = False

    def spin() -> None:
        spinning.set()
        while not stop:
            pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    thread = threading.Thread(target=spin)
    try:
        thread.start()
        spinning.wait()
        yield
    finally:
        stop = True
        thread.join()
        sys.setswitchinterval(interval)
