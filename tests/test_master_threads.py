"""A master's block threads (parallel_render.threads): bounded, each block rendered or taken
back exactly once, failures reported as a worker reports them, connections closed."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from parallel_render import threads


@pytest.fixture
def rendered(monkeypatch):
    """Every job body the threads rendered, in order; a body b"wait" waits for `gate`."""
    class Bodies(list):
        gate = threading.Event()

    bodies = Bodies()
    gate = bodies.gate

    def render(body: bytes) -> dict:
        if body == b"wait":
            gate.wait(10)
        bodies.append(body)
        return {"ok": True, "html": body.decode(), "ms": 0.0, "cpu": 0.0, "at": time.monotonic()}

    monkeypatch.setattr(threads, "render", render)
    return bodies


def test_a_block_goes_to_a_thread_only_when_one_is_free(rendered):
    pool = threads.BlockThreads(2)
    first, second = pool.submit(b"wait"), pool.submit(b"wait")
    assert first is not None and second is not None
    assert pool.submit(b"third") is None  # both busy: the caller renders it in place
    rendered.gate.set()
    assert first.result(5)["ok"] and second.result(5)["ok"]
    deadline = time.monotonic() + 5
    while pool.busy() and time.monotonic() < deadline:
        time.sleep(0.001)
    again = pool.submit(b"again")
    assert again is not None and again.result(5)["html"] == "again"


def test_every_block_is_rendered_by_a_thread_or_taken_back_never_both(rendered):
    pool = threads.BlockThreads(4)
    futures = []
    for i in range(2000):
        body = f"job {i}".encode()
        future = pool.submit(body)
        while future is None:  # all four busy: wait for one
            time.sleep(0.0001)
            future = pool.submit(body)
        # The page takes it back at once: some are started by then, some are not.
        futures.append((body, future, future.cancel()))
    taken = {body for body, _, cancelled in futures if cancelled}
    results = {body: future.result(5)["html"] for body, future, cancelled in futures if not cancelled}
    deadline = time.monotonic() + 5
    while pool.busy() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert taken and results  # both sides of the race happened
    assert sorted(rendered) == sorted(body for body, _, cancelled in futures if not cancelled)
    assert not taken & set(rendered)
    assert all(results[body] == body.decode() for body in results)


def test_a_failing_block_is_reported_as_a_worker_reports_it(transactional_db):
    wrong_version = threads.render(orjson.dumps({"v": 2}))
    assert wrong_version["ok"] is False and wrong_version["error"] == "ValueError: unsupported job version 2"
    assert {"ms", "cpu", "at"} <= set(wrong_version)
    unknown = threads.render(orjson.dumps({"v": 1, "e": "django", "t": "t/no_such.html", "o": 0, "h": "x",
                                           "n": "n", "c": {}, "env": {}}))
    assert unknown["ok"] is False and unknown["master_only"] is True  # the master renders it itself


def test_a_thread_closes_its_connections_after_a_run_of_blocks_and_after_a_failure(monkeypatch):
    closes: list[tuple[int, float]] = []
    monkeypatch.setattr("django.db.close_old_connections",
                        lambda **kwargs: closes.append((threading.get_ident(), time.monotonic())))
    outcomes = iter([{"ok": True, "html": ""}, {"ok": False, "error": "boom"}])
    renderers: set[int] = set()

    def render(body: bytes) -> dict:
        renderers.add(threading.get_ident())
        return next(outcomes)

    monkeypatch.setattr(threads, "render", render)

    def closed() -> list[float]:  # by this pool's thread (other tests' idle threads close too)
        return [at for ident, at in closes if ident in renderers]

    pool = threads.BlockThreads(1)
    pool.submit(b"one").result(5)
    time.sleep(threads.IDLE_CLOSE * 4)
    assert len(closed()) == 1  # once the thread had no block for IDLE_CLOSE
    done = time.monotonic()
    assert pool.submit(b"two").result(5)["ok"] is False
    deadline = time.monotonic() + 5
    while len(closed()) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(renderers) == 1 and len(closed()) == 2
    assert closed()[1] >= done  # a failed block's connection is closed at once, not after a pause


def test_a_thread_that_cannot_be_started_leaves_the_block_to_the_page(rendered, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    pool = threads.BlockThreads(2)
    assert pool.submit(b"one") is None  # the caller renders it in place
    assert not rendered
