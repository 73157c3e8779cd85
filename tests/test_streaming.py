"""Streamed pages (parallel_render.streaming): the skeleton first, then each block in document
order as it arrives; the same bytes as the buffered page, through the test client, real
gunicorn (sync and gthread), ASGI and a real browser."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client, override_settings

from parallel_render import streaming
from parallel_render.testing import serially
from tests.conftest import block_pids, rescued

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
