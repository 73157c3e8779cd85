"""Streamed pages (parallel_render.streaming): the skeleton first, then each block in document
order as it arrives; the same bytes as the buffered page, through the test client, real
gunicorn (sync and gthread), ASGI and a real browser."""

from __future__ import annotations

import asyncio
import decimal
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import hypothesis
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client, override_settings
from hypothesis import strategies as st

from parallel_render import streaming
from parallel_render.testing import serially
from tests.conftest import block_pids, rescued, run_concurrently
from tests.processes import gunicorn_site, uvicorn_site, wait_for
from tests.test_property import CONTEXTS, GENERATED
from tests.test_property import node as generated_node

ROOT = Path(__file__).resolve().parent.parent

STREAMED = ("/st/", "/st-decorated/", "/st-cbv/")


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def serial_page(path: str) -> bytes:
    with serially():
        response = Client().get(path)
    assert response.status_code == 200 and not response.streaming
    return response.content


@pytest.mark.parametrize("prefix", STREAMED)
def test_streamed_page_is_the_serial_page_byte_for_byte(parallel, prefix):
    path = f"{prefix}stream/?marker=m&n=4&title=T%3Cx%3E"
    response = Client().get(path)
    assert response.streaming and response.status_code == 200
    assert "Content-Length" not in response.headers
    assert body(response) == serial_page(path)
    assert len(block_pids(response)) == 9 and set(block_pids(response)) <= set(parallel.worker_pids)


def test_first_chunk_is_the_skeleton_before_the_slow_block_and_the_rest_follows(parallel, tmp_path):
    gate = tmp_path / "open"
    path = f"/st/stream/?marker=m&n=3&gate={gate}"
    response = Client().get(path)
    try:
        chunks = iter(response.streaming_content)
        first = next(chunks)  # the page up to the first block not in yet
        assert b'<h1 id="skeleton">skeleton m</h1>\n' in first
        # The slow block's worker waits for the gate: everything before it comes anyway.
        sent = first
        while b"<i>m-2</i>" not in sent:
            sent += next(chunks)
        assert sent.endswith(b"<i>m-2</i>\n") and b'id="slow"' not in sent
    finally:
        gate.touch()
    rest = b"".join(chunks)
    assert rest.startswith(b'<div id="slow">') and rest.endswith(b"</html>\n")
    assert sent + rest == serial_page(path)


def test_closing_a_stream_mid_page_cancels_the_blocks_it_did_not_send(parallel, tmp_path, caplog):
    from parallel_render import conf
    from parallel_render.client import get_client

    caplog.set_level(logging.INFO, logger="parallel_render")
    gate = tmp_path / "open"
    path = f"/st/stream/?marker=m&n=3&gate={gate}"
    client = get_client(conf.get_config()["ROUTER"], conf.get_config()["MAX_PAYLOAD"])
    try:
        response = Client().get(path)
        assert client.outstanding().total > 0  # its blocks are out
        assert b"skeleton" in next(iter(response.streaming_content))
        response.close()  # what the server does when the client has gone away
        assert client.outstanding().total == 0, "nothing is left for nobody to collect"
        assert re.search(
            r"streamed page: \d+ blocks not gathered \(the stream ended before them\); "
            r"cancelling their jobs",
            caplog.text,
        )
    finally:
        gate.touch()
    assert body(Client().get(path)) == serial_page(path)
    assert client.outstanding().total == 0


def test_a_block_that_fails_after_the_headers_gets_its_fallback_or_is_rendered_here(parallel):
    path = "/st/stream_fail/?marker=m&sleep=0.8"
    streamed = Client().get(path)
    assert streamed.streaming
    page = body(streamed)
    assert rescued(streamed) == [
        "worker error: ValueError: boom",
        "timed out",
        "worker error: ValueError: fails in a worker",
    ]
    buffered = Client().get(path.replace("/st/", "/tr/"))
    assert not buffered.streaming and page == buffered.content
    for part in (
        b"<p>first m</p>",
        b"<p>sorry ",
        b"<p>timed out m</p>",
        b"<p>rendered-in-master by the master</p>",
        b"<footer>end m</footer>",
    ):
        assert part in page


@pytest.mark.parametrize(
    "wrapper", ["django.middleware.gzip.GZipMiddleware", "django.middleware.http.ConditionalGetMiddleware"]
)
def test_streaming_is_declined_under_middleware_that_needs_the_whole_body(parallel, settings, caplog, wrapper):
    caplog.set_level(logging.INFO, logger="parallel_render")
    streaming._logged.clear()
    with override_settings(MIDDLEWARE=[wrapper, *settings.MIDDLEWARE]):
        responses = [Client().get("/st/stream/?marker=m&n=2") for _ in range(2)]
    assert not any(r.streaming for r in responses)
    assert responses[0].content == serial_page("/st/stream/?marker=m&n=2")
    assert len(block_pids(responses[0])) == 5, "still rendered in parallel, only not streamed"
    said = [r.getMessage() for r in caplog.records if "streaming declined" in r.getMessage()]
    assert said == [
        f"streaming declined, pages are served buffered: {wrapper} wraps "
        "parallel_render.middleware.ParallelRenderMiddleware in MIDDLEWARE and needs the whole body"
    ]


def test_a_decorated_view_that_returns_a_rendered_page_is_served_buffered(parallel, caplog):
    caplog.set_level(logging.INFO, logger="parallel_render")
    response = Client().get("/st-rendered/stream/?marker=m&n=2")
    assert not response.streaming and response.content == serial_page("/st-rendered/stream/?marker=m&n=2")
    assert "returned a HttpResponse, not an unrendered TemplateResponse: its page is not streamed" in caplog.text


def test_streamed_under_asgi(parallel, tmp_path):
    gate = tmp_path / "open"
    path = f"/st-async/stream/?marker=a&n=3&gate={gate}"

    async def go():
        try:
            response = await AsyncClient().get(path)
            assert response.streaming and response.is_async
            chunks = aiter(response.streaming_content)
            first = await anext(chunks)
            assert b"skeleton a" in first and b'id="slow"' not in first
            gate.touch()
            return first + b"".join([chunk async for chunk in chunks])
        finally:
            await sync_to_async(connections.close_all)()

    assert asyncio.run(go()) == serial_page(path)


@pytest.fixture(params=["sync", "gthread"])
def gunicorn(request, parallel):
    """One gunicorn master of the test site (sync, or gthread with 4 threads) on the test cluster."""
    env = {}
    if request.param == "sync" and os.environ.get("PYTHONDEVMODE"):
        # gunicorn's sync worker exits without closing its copy of the listening socket: under
        # the strict leg's development mode that is a ResourceWarning of gunicorn's own, on
        # every run (a bare WSGI app shows it too), which would hide any of ours.
        env["PYTHONWARNINGS"] = "ignore::ResourceWarning"
    with gunicorn_site(parallel.address, "/outstanding/", kind=request.param, env=env) as base:
        yield base


class RawResponse:
    """An HTTP/1.1 response read off a socket as it arrives: the head, then the body's chunks."""

    def __init__(self, base: str, path: str, headers: dict[str, str] | None = None) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *fields = head.decode().split("\r\n")
        self.status = int(status.split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        self.body = b""
        self.done = False

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def read_chunk(self) -> bytes:
        """The next chunk of the body (b"" at its end)."""
        while b"\r\n" not in self.buffer:
            self._recv()
        size, rest = self.buffer.split(b"\r\n", 1)
        size = int(size, 16)
        while len(rest) < size + 2:
            self._recv()
            rest = self.buffer.split(b"\r\n", 1)[1]
        chunk, self.buffer = rest[:size], rest[size + 2 :]
        self.body += chunk
        self.done = size == 0
        return chunk

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.body:
            if not self.read_chunk() and self.done:
                raise AssertionError(f"{marker!r} not in {self.body!r}")
        return self.body

    def read_all(self) -> bytes:
        while not self.done:
            self.read_chunk()
        return self.body

    def close(self) -> None:
        self.sock.close()


def fetch_serial(base: str, path: str) -> bytes:
    request = urllib.request.Request(base + path, headers={"X-Parallel-Render": "serial"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


def outstanding(base: str) -> int:
    with urllib.request.urlopen(base + "/outstanding/", timeout=10) as r:
        counts = json.load(r)
    return counts["awaiting"] + counts["uncollected"]


def skeleton_first_then_serial(response: RawResponse, base: str, path: str, gate: Path, marker: str) -> None:
    """The streamed page of /st/stream/: the skeleton and the blocks before the slow one come
    first, nothing more while the slow block's worker waits for the gate, then (gate opened)
    the rest, the whole equal to the serial page."""
    sent = response.read_until(f"<i>{marker}-2</i>\n".encode())
    # Nothing more comes while the slow block's worker waits for the gate.
    response.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        response.read_chunk()
    response.sock.settimeout(10)
    assert f'<h1 id="skeleton">skeleton {marker}</h1>'.encode() in sent and b'id="slow"' not in sent
    gate.touch()
    assert response.read_all() == fetch_serial(base, path)


def test_gunicorn_streams_the_skeleton_first_and_the_page_equals_the_serial_one(gunicorn, tmp_path):
    gate = tmp_path / "open"
    path = f"/st/stream/?marker=g&n=3&gate={gate}"
    response = RawResponse(gunicorn, path)
    try:
        assert response.status == 200 and "content-length" not in response.headers
        assert "pr-stream;dur=" in response.headers["server-timing"]
        assert response.headers["x-accel-buffering"] == "no"  # nginx passes each part on
        skeleton_first_then_serial(response, gunicorn, path, gate, "g")
    finally:
        gate.touch()
        response.close()


@pytest.mark.parametrize("view", ["st", "st-async"])
def test_uvicorn_streams_the_skeleton_first_and_the_page_equals_the_serial_one(parallel, tmp_path, view):
    # A real ASGI server: the middleware runs async, and a sync view's page streams as an
    # async view's does.
    gate = tmp_path / "open"
    path = f"/{view}/stream/?marker=u&n=3&gate={gate}"
    with uvicorn_site(parallel.address, "/outstanding/") as base:
        response = RawResponse(base, path)
        try:
            assert response.status == 200 and "content-length" not in response.headers
            skeleton_first_then_serial(response, base, path, gate, "u")
        finally:
            gate.touch()
            response.close()
        assert wait_for(lambda: outstanding(base) == 0, 10)


def test_gunicorn_streams_only_each_request_its_own_blocks(gunicorn):
    streamed = []

    def fetch(path):
        with urllib.request.urlopen(gunicorn + path.replace("/p/", "/st/"), timeout=30) as r:
            streamed.append(r.headers["Transfer-Encoding"] == "chunked")
            return r.read().decode(), r.headers["Server-Timing"] or ""

    assert not run_concurrently(fetch, clients=8, rounds=2, n=6)[:2]
    # A page whose blocks all rendered in the master has nothing to stream: it goes buffered.
    assert sum(streamed) >= len(streamed) // 2, streamed
    assert outstanding(gunicorn) == 0


def test_a_client_that_goes_away_mid_stream_leaves_no_job_behind(gunicorn, tmp_path):
    gate, later = tmp_path / "open", tmp_path / "later"
    path = f"/st/stream_two/?marker=d&gate={gate}&title={later}"
    response = RawResponse(gunicorn, path)
    try:
        assert b"skeleton d" in response.read_chunk()
        response.close()  # gone, while both blocks are out
        gate.touch()
        # The master finds out when it writes the next part (or gives up on the second block
        # after its 1 s timeout and then finds out): its jobs are then cancelled or collected.
        end = time.monotonic() + 5
        while outstanding(gunicorn) and time.monotonic() < end:
            time.sleep(0.05)
        assert outstanding(gunicorn) == 0
    finally:
        gate.touch()
        later.touch()
    # The master serves the next page whole.
    again = RawResponse(gunicorn, path)
    try:
        assert b"slower d" in again.read_all()
    finally:
        again.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./scripts/test.sh installs it)")
@pytest.mark.parametrize("gunicorn", ["gthread"], indirect=True)
def test_browser_paints_the_skeleton_before_the_slow_block_arrives(gunicorn, tmp_path):
    from tests.chromium import Chromium

    gate = tmp_path / "open"
    try:
        with Chromium(800, 600) as browser:
            # Navigate without waiting for the load event: the page is still arriving.
            browser.call("Page.navigate", session=True, url=f"{gunicorn}/st/stream/?marker=b&n=3&gate={gate}")
            painted = browser.wait_for("""(() => {
                const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                return fcp && document.getElementById('skeleton') && {
                    fcp: fcp.startTime, state: document.readyState,
                    slow: !!document.getElementById('slow'), text: document.body.innerText};
            })()""")
            png = browser.screenshot()
            gate.touch()
            done = browser.wait_for("""document.readyState === 'complete' && document.getElementById('slow')
                && document.body.innerText""")
    finally:
        gate.touch()
    # First contentful paint happened while the slow block's worker was still held back.
    assert painted["state"] == "loading" and not painted["slow"], painted
    assert "skeleton b" in painted["text"] and "b-2" in painted["text"] and "end b" not in painted["text"]
    assert png.startswith(b"\x89PNG")
    assert "slow b" in done and "after item 2" in done and "end b" in done


def test_assert_parallel_equals_serial_reads_a_streamed_page(parallel):
    from parallel_render.testing import assert_parallel_equals_serial

    response = assert_parallel_equals_serial(Client(), "/st/stream/?marker=h&n=2")
    assert response.streaming
    with pytest.raises(AssertionError, match="no block was rendered by a worker"):
        assert_parallel_equals_serial(Client(), "/st/stream/?marker=h&n=2", HTTP_X_PARALLEL_RENDER="serial")


@pytest.mark.parametrize("gunicorn", ["gthread"], indirect=True)
def test_parallel_bench_stream_measures_both_modes_and_checks_the_pages(gunicorn):
    from parallel_render.bench import BenchError
    from parallel_render.bench.stream import format_results, run

    result = run(gunicorn, "/tr/stream/?marker=x&n=3", "/st/stream/?marker=x&n=3", requests=4, warmup=1)
    for mode in ("buffered", "streamed"):
        assert result[mode]["ttfb"]["n"] == 4 and 0 < result[mode]["ttfb"]["p50"] <= result[mode]["total"]["p50"]
    table = format_results([{"latency": 0, "result": result}], "header")
    assert "| 0          | streamed / buffered |" in table and "TTFB p50" in table
    with pytest.raises(BenchError, match=r"was not streamed \(no chunked body\)"):
        run(gunicorn, "/tr/stream/?marker=x&n=3", "/tr/stream/?marker=x&n=3", requests=1, warmup=0)
    with pytest.raises(BenchError, match="the streamed and buffered pages differ at byte"):
        run(gunicorn, "/tr/stream/?marker=x&n=3", "/st/stream/?marker=y&n=3", requests=1, warmup=0)


def test_system_check_names_the_streaming_views_a_body_middleware_keeps_buffered(settings):
    from parallel_render.checks import check_streaming

    assert check_streaming() == []
    with override_settings(MIDDLEWARE=["django.middleware.gzip.GZipMiddleware", *settings.MIDDLEWARE]):
        (warning,) = check_streaming()
    assert warning.id == "parallel_render.W008"
    assert (
        "django.middleware.gzip.GZipMiddleware wraps parallel_render.middleware.ParallelRenderMiddleware" in warning.msg
    )
    # Decorated and class-based views are known; a view that returns the response is not.
    assert "st-decorated/<str:name>/, st-cbv/<str:name>/, st-rendered/<str:name>/, st-async/<str:name>/" in warning.msg
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "django.middleware.gzip.GZipMiddleware"]):
        assert check_streaming() == []  # inside ours: W001's business


def test_blocks_the_dispatch_policy_keeps_in_the_master_render_after_the_first_byte(parallel, settings, monkeypatch):
    from parallel_render import policy
    from tests.conftest import blocks_of

    # No worker would start a block soon: each renders in the master (ADAPTIVE dispatch).
    monkeypatch.setattr(policy, "should_send", lambda *args: False)
    path = "/st/stream/?marker=p&n=2"
    # (Without block threads, which would take the buffered page's blocks that sleep.)
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "ADAPTIVE": True, "MASTER_THREADS": 0}):
        streamed = Client().get(path)
        chunks = iter(streamed.streaming_content)
        first = next(chunks)
        page = first + b"".join(chunks)
        buffered = Client().get(path.replace("/st/", "/tr/"))
    # Buffered, they render in place before the first byte; streamed, after it.
    assert {r.outcome for r in blocks_of(buffered)} == {"inline"}
    assert first.endswith(b'<h1 id="skeleton">skeleton p</h1>\n')
    # The policy's reason: no idle worker, or every CPU busy on a loaded machine.
    assert [r.outcome for r in blocks_of(streamed)] == ["rescued"] * 5
    assert {r.reason for r in blocks_of(streamed)} <= {"no idle worker", "every CPU busy"}
    assert page == buffered.content == serial_page(path)


@pytest.fixture
def generated_article(parallel):
    """tests/test_property.py's article: what its generated templates read as obj and qs."""
    from tests.testapp.models import Article, Author

    author = Author.objects.create(name="Zoë <z>")
    for i in range(3):
        Article.objects.create(title=f"T & t{i}", body="", price=decimal.Decimal("3.10") * i, author=author)
    return Article.objects.select_related("author").first()


@hypothesis.settings(
    max_examples=int(os.environ.get("HYP_STREAM_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
@hypothesis.given(template=st.lists(generated_node(0), min_size=1, max_size=6).map("".join), context=CONTEXTS)
def test_generated_templates_stream_the_serial_page(generated_article, template, context):
    """The property of tests/test_property.py, streamed: for generated templates and contexts,
    the streamed page's bytes are the serial page's."""
    from tests.testapp import views
    from tests.testapp.models import Article

    source = "{% load parallel %}" + template
    name = "gen_" + hashlib.sha256(source.encode()).hexdigest()[:20] + ".html"
    GENERATED.mkdir(exist_ok=True)
    (GENERATED / name).write_text(source)
    views.GENERATED_CONTEXT = dict(context, obj=generated_article, qs=Article.objects.filter(price__gt=0))
    serial = serial_page(f"/st-gen/{name}")
    response = Client().get(f"/st-gen/{name}")
    assert response.status_code == 200
    assert body(response).decode() == serial.decode(), source
    GENERATED_RUN["pages"] += 1
    GENERATED_RUN["streamed"] += response.streaming


GENERATED_RUN = {"pages": 0, "streamed": 0}


def test_the_generated_run_really_streamed_pages():
    """Guards the property above against passing only because every page was served buffered."""
    assert GENERATED_RUN["pages"] >= 20
    assert GENERATED_RUN["streamed"] >= GENERATED_RUN["pages"] // 4, GENERATED_RUN


def test_while_it_waits_for_a_worker_the_stream_renders_the_deferred_blocks_below(
    parallel, settings, monkeypatch, tmp_path
):
    import itertools
    import tempfile
    import threading

    from parallel_render import policy

    # Only the slow block goes to a worker; the policy keeps the other two in the master.
    sends = itertools.count()
    monkeypatch.setattr(policy, "should_send", lambda *args: next(sends) == 1)
    gate, name = tmp_path / "open", f"stream-defer-{os.getpid()}-{time.monotonic_ns()}"
    tally = Path(tempfile.gettempdir()) / f"pr-tally-{name}"

    def open_the_gate_once_the_block_below_rendered() -> None:
        end = time.monotonic() + 4  # the slow block's 3 s timeout shows its fallback before that
        while not tally.exists() and time.monotonic() < end:
            time.sleep(0.01)
        gate.touch()

    path = f"/st/stream_defer/?marker=w&gate={gate}&title={name}"
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "ADAPTIVE": True}):
        opener = threading.Thread(target=open_the_gate_once_the_block_below_rendered)
        opener.start()
        try:
            page = body(Client().get(path))
        finally:
            opener.join()
            gate.touch()
    assert b'<div id="slow">slow w</div>' in page, "the block below was rendered while the slow one was out"
    assert page == serial_page(path)
    tally.unlink(missing_ok=True)
