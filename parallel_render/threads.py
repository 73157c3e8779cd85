"""Blocks a master keeps, rendered in threads of its own while the page goes on.

When the dispatch policy keeps a block in the master (no idle worker, or every CPU busy), a
block that mostly waits (on a database, memcached, HTTP) would hold the page's thread for
the whole wait, one block after the other. Such a block is rendered instead by one of a few
threads of the same process (MASTER_THREADS), from its job, exactly as a worker renders it:
the waits of a page's blocks overlap, and the block costs the node no more CPU than
rendering it in place (no router, no other process's cold caches), only the encoding and
decoding of its values. docs/dispatch.md has the reasoning and the measurements.

A block goes to a thread only while the CPUs have time to spare (policy.THREAD_IDLE_SHARE),
its page does not hold its share of the threads already (policy.holds_its_threads), and one
is free (submit() returns None otherwise and the block renders in place), so nothing
queues here for long; a block not yet started when its
page wants it back is taken back (Future.cancel(), which succeeds exactly when no thread has
started it) and rendered by the page's thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import orjson

from parallel_render import policy

logger = logging.getLogger("parallel_render")

# A thread that has had no block for this long, or whose run of blocks began this long ago,
# closes what Django would close at the end of a request (its database connections): the
# blocks of one page share a connection, as a worker's blocks of one page do.
IDLE_CLOSE = 0.05
RUN_MAX = 1.0


class BlockThreads:
    """At most `size` threads, started as they are first needed, in this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: queue.SimpleQueue[tuple[Future, bytes]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0  # blocks submitted and not finished
        self._pid = os.getpid()

    def submit(self, body: bytes) -> Future | None:
        """Render the job `body` (orjson) in a free thread; its future's result is the dict a
        worker answers with (ok, html or error, ms, cpu). None: no thread is free."""
        with self._lock:
            if self._pid != os.getpid():  # a forked copy: its threads stayed in the parent
                self._pid, self._threads, self._busy = os.getpid(), 0, 0
                self._queue = queue.SimpleQueue()
            if self._busy >= self.size:
                return None
            self._busy += 1
            start = self._threads < self._busy
            if start:
                self._threads += 1
        future: Future = Future()
        self._queue.put((future, body))
        if start:
            try:
                threading.Thread(target=self._run, name="parallel-render-block", daemon=True).start()
            except RuntimeError:  # no thread to be had: the block renders in place
                logger.warning("a block thread could not be started; blocks render in place meanwhile")
                with self._lock:
                    self._threads -= 1
                # Still queued: a thread, if one comes, skips it (and counts it done then).
                if future.cancel():
                    return None
        return future

    def busy(self) -> int:
        return self._busy

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1

    def _run(self) -> None:
        run_began: float | None = None
        while True:
            try:
                future, body = self._queue.get(timeout=IDLE_CLOSE if run_began is not None else None)
            except queue.Empty:
                _close_connections()
                run_began = None
                continue
            if run_began is None:
                run_began = time.monotonic()
            ok = False
            try:
                if not future.set_running_or_notify_cancel():
                    continue  # taken back before it started
                result = render(body)
                ok = bool(result.get("ok"))
                future.set_result(result)
            except BaseException as exc:  # never lose a page's block: its master renders it
                if not future.done():
                    future.set_exception(exc)
            finally:
                self._done()
            if not ok or time.monotonic() - run_began >= RUN_MAX:
                # A block that failed may have left its connection unusable.
                _close_connections()
                run_began = None


def _close_connections() -> None:
    """What Django closes at the end of a request: this thread's obsolete or broken database
    connections (all of them, unless CONN_MAX_AGE keeps them)."""
    from django.db import close_old_connections

    try:
        close_old_connections()
    except Exception:  # a connection that fails to close is dropped: the thread must live on
        logger.exception("a block thread could not close its database connections")


def render(body: bytes) -> dict[str, Any]:
    """The block job `body` rendered here, as a worker renders it: its result dict."""
    from parallel_render.worker import failure, render_job

    at, started = time.monotonic(), policy.start_measuring()
    try:
        html, _ = render_job(orjson.loads(body))
        result: dict[str, Any] = {"ok": True, "html": html}
    except Exception as exc:
        result = failure(exc)
    result["ms"], result["cpu"] = policy.measured(started)
    result["at"] = at
    return result


_threads: BlockThreads | None = None


def block_threads(size: int) -> BlockThreads | None:
    """This process's block threads (None when size is 0)."""
    global _threads
    if size <= 0:
        return None
    if _threads is None or _threads.size != size:
        _threads = BlockThreads(size)
    return _threads

