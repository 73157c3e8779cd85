"""Helpers for a site's own test suite: real workers, and "parallel page == serial page".

    from parallel_render.testing import assert_parallel_equals_serial, parallel_workers

    class PagesTest(TransactionTestCase):      # workers only see committed rows
        def test_question_page(self):
            with parallel_workers(2):
                assert_parallel_equals_serial(self.client, "/q/1/")

With pytest-django, wrap parallel_workers in a session fixture that depends on
django_db_setup, and use the transactional_db fixture in the tests.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from parallel_render import conf
from parallel_render.cluster import LocalCluster
from parallel_render.signals import BlockRecord, block_finished


@contextlib.contextmanager
def serially() -> Iterator[None]:
    """Render every request in this block serially, whatever the site's settings say.

    The serial baseline of a comparison must not depend on SERIAL_HEADER or
    SERIAL_QUERY_PARAM (a site may rename or turn off either): this turns the plugin off.
    """
    from django.conf import settings
    from django.test import override_settings

    with override_settings(PARALLEL_RENDER={**(getattr(settings, "PARALLEL_RENDER", None) or {}), "ENABLED": False}):
        yield


@contextlib.contextmanager
def test_host_allowed() -> Iterator[None]:
    """Let Django's test client ("testserver") through ALLOWED_HOSTS, as Django's test runner does.

    For commands that render a page in-process (parallel_check --url, parallel_bench page):
    a fresh project's ALLOWED_HOSTS would answer them 400.
    """
    from django.conf import settings
    from django.test import override_settings

    hosts = list(settings.ALLOWED_HOSTS)
    if "*" in hosts or "testserver" in hosts:
        yield
        return
    with override_settings(ALLOWED_HOSTS=[*hosts, "testserver"]):
        yield


def serial_request_headers() -> dict[str, str]:
    """The HTTP header that makes a running node render a request serially, from its settings.

    Benchmarks that compare modes over HTTP need it; a site that turned the header off
    (SERIAL_HEADER = None) cannot be benchmarked that way, and is told so.
    """
    from django.core.exceptions import ImproperlyConfigured

    header = conf.get_config()["SERIAL_HEADER"]
    if not header:
        raise ImproperlyConfigured(
            "PARALLEL_RENDER['SERIAL_HEADER'] is empty, so a running node cannot be asked for a serial "
            "page: set it (e.g. \"X-Parallel-Render\") to compare serial and parallel over HTTP"
        )
    return {header: "serial"}


@contextlib.contextmanager
def parallel_workers(
    workers: int = 2, env: dict[str, str] | None = None, address: str | None = None
) -> Iterator[LocalCluster]:
    """Start a router and workers on the test databases, and point this process's masters at it.

    address: where the router listens (e.g. "tcp://127.0.0.1:0"); by default a private Unix socket.

    The workers are real processes: they open the databases by the names the test run
    created, so those must be reachable from another process (a file for SQLite, not
    ":memory:").
    """
    from django.db import connections

    args = []
    for alias in connections:
        name = connections[alias].settings_dict["NAME"]
        if connections[alias].vendor == "sqlite" and (not name or ":memory:" in str(name) or "mode=memory" in str(name)):
            raise RuntimeError(
                f"database {alias!r} is an in-memory SQLite database, which worker processes cannot "
                "open; give it a file: DATABASES[alias]['TEST'] = {'NAME': '/tmp/test.sqlite3'}"
            )
        args += ["--db-name", f"{alias}={name}"]
    with LocalCluster(workers, address=address, env=env, worker_args=args) as cluster:
        cluster.wait_ready()
        with routed_to(cluster.address):
            yield cluster


@contextlib.contextmanager
def routed_to(address: str) -> Iterator[None]:
    """Point this process's masters at the router at `address` (the variable runserver and a
    node set), and back at what they used before on the way out."""
    previous = os.environ.get(conf.ENV_ROUTER)
    os.environ[conf.ENV_ROUTER] = address
    conf.get_config.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(conf.ENV_ROUTER, None)
        else:
            os.environ[conf.ENV_ROUTER] = previous
        conf.get_config.cache_clear()


@contextlib.contextmanager
def capture_blocks() -> Iterator[list[BlockRecord]]:
    """Collect the block_finished record of every block rendered in this process meanwhile.

        with capture_blocks() as blocks:
            response = client.get("/q/1/")
        assert all(b.outcome == "sent" for b in blocks if b.request is response.wsgi_request)
    """
    records: list[BlockRecord] = []

    def receive(sender: Any, record: BlockRecord, **kwargs: Any) -> None:
        records.append(record)

    uid = f"parallel_render.testing.capture_blocks.{id(records)}"
    block_finished.connect(receive, weak=False, dispatch_uid=uid)
    try:
        yield records
    finally:
        block_finished.disconnect(dispatch_uid=uid)


def worker_rendered(response: Any) -> list[int]:
    """Pids of the worker processes that rendered this response's blocks (from Server-Timing)."""
    return [int(pid) for pid in re.findall(r" pid (\d+)", response.headers.get("Server-Timing", ""))]


def body_of(response: Any) -> bytes:
    """A test client response's whole body, streamed (parallel_render.streaming) or not.

    Reading a streamed body consumes it: call this once per response.
    """
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return response.content


def assert_parallel_equals_serial(client: Any, path: str, require_parallel: bool = True, **extra: Any) -> Any:
    """GET path serially and in parallel; fail unless both pages are byte-for-byte equal.

    A streamed page is read whole (so its streaming_content is consumed when this returns).

    With require_parallel, also fail when no block was rendered by a worker (a page that
    silently renders everything inline proves nothing). Returns the parallel response.
    """

    with serially():
        serial = client.get(path, **extra)
        serial_body = body_of(serial)
    with capture_blocks() as blocks:
        parallel = client.get(path, **extra)
        parallel_body = body_of(parallel)  # a streamed page's blocks are gathered as it is read
    if serial.status_code != parallel.status_code:
        raise AssertionError(f"{path}: status {parallel.status_code} in parallel, {serial.status_code} serially")
    if parallel_body != serial_body:
        a, b = serial_body.decode(errors="replace"), parallel_body.decode(errors="replace")
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        raise AssertionError(
            f"{path}: the parallel page differs from the serial page at character {at}:\n"
            f"  serial:   {a[max(0, at - 60):at + 60]!r}\n  parallel: {b[max(0, at - 60):at + 60]!r}"
        )
    if require_parallel and not any(b.outcome == "sent" for b in blocks):
        raise AssertionError(
            f"{path}: no block was rendered by a worker; run `manage.py parallel_check --url {path}` to see why"
        )
    return parallel
