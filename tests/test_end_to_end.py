"""The page through real router and worker processes is the page plain Django renders."""

from __future__ import annotations

import datetime
import decimal
import os
import time

import pytest
from django.test import Client

from tests.conftest import block_pids, blocks_of, rescued, run_concurrently
from tests.testapp.models import Article, Author, Tag

SERIAL = {"HTTP_X_PARALLEL_RENDER": "serial"}


@pytest.fixture
def articles(transactional_db):
    ann = Author.objects.create(name="Ann <A>", email="ann@example.com")
    bob = Author.objects.create(name="Bob", email="bob@example.com")
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue & green")
    for i in range(6):
        a = Article.objects.create(
            title=f"Article {i} <i>",
            body="text " * i,
            price=decimal.Decimal(f"{i}.{i}0"),
            published=datetime.datetime(2024, 1, 1 + i, 12, tzinfo=datetime.timezone.utc),
            day=datetime.date(2024, 3, 1 + i),
            author=ann if i % 2 else bob,
        )
        a.tags.set([red] if i % 2 else [red, blue])


def compare(client: Client, url: str) -> tuple:
    serial = client.get(url, **SERIAL)
    parallel = client.get(url)
    assert serial.status_code == parallel.status_code == 200
    assert parallel.content.decode() == serial.content.decode()
    return serial, parallel


def test_exact_page_with_models_loops_includes_inheritance(parallel, articles):
    serial, response = compare(Client(), "/p/exact/?n=7")
    pids = block_pids(response)
    # 1 + 7 items + nested dict + autoescape + with + only + outer(inner inline) + articles + qs + author + request + missing
    assert len(pids) == 19, response.headers.get("Server-Timing")
    assert os.getpid() not in pids
    assert set(pids) <= set(parallel.worker_pids)
    assert not rescued(response)
    assert "Article 5 &lt;i&gt;" in response.content.decode()
    assert "Server-Timing" not in serial.headers


def test_template_response_is_stitched_too(parallel):
    compare(Client(), "/tr/exact/")


def test_four_slow_blocks_run_at_once_in_workers(parallel):
    client = Client()
    # Warms the workers' template caches, and gives the block a measured cost of 50 ms: a block
    # measured under 1 ms (as after a page with sleep=0) travels in a bundle with the others, to
    # one worker.
    client.get("/p/slow/?sleep=0.05")
    # Two workers: four 0.3 s blocks take two rounds; serially they take 1.2 s. How long the
    # page took depends on how busy the machine is, so the test reads when each block's render
    # ran in its worker (on the clock the machine's processes share) and checks that the two
    # workers' renders overlapped: the renders' union on the time line is about half their sum.
    response = client.get("/p/slow/?sleep=0.3")
    pids = block_pids(response)
    assert len(pids) == 4 and os.getpid() not in pids and len(set(pids)) == 2
    spans = sorted((r.render_start_ms, r.render_start_ms + r.render_ms) for r in blocks_of(response))
    union, reach = 0.0, float("-inf")
    for start, end in spans:
        union += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    rendering = sum(end - start for start, end in spans)
    assert rendering >= 4 * 300 and union < 0.75 * rendering, (spans, union, rendering)
    body = response.content.decode()
    assert body.count("pid=") == 4 and f"pid={os.getpid()}" not in body


def test_timeout_shows_the_fallback(parallel):
    started = time.monotonic()
    response = Client().get("/p/timeout/?sleep=2&title=T")
    assert time.monotonic() - started < 1.5
    assert response.content.decode().strip() == "<p>FALLBACK T</p>"
    assert [(r.outcome, r.reason) for r in blocks_of(response)] == [("fallback", "timed out")]


def test_killed_worker_still_yields_the_complete_page(parallel):
    client = Client()
    serial = client.get("/p/crash/", **SERIAL).content.decode()
    before = set(parallel.worker_pids)
    response = client.get("/p/crash/")
    assert response.content.decode() == serial
    assert "rendered-in-master" in serial
    assert any("worker" in why for why in rescued(response)), response.headers["Server-Timing"]
    # The supervisor replaces the dead worker.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(parallel.worker_pids) == before:
        time.sleep(0.05)
    assert set(parallel.worker_pids) != before
    parallel.wait_ready()


def test_no_router_renders_everything_inline(settings, transactional_db):
    settings.PARALLEL_RENDER = {"ROUTER": "unix:///nonexistent/router.sock"}
    client = Client()
    serial = client.get("/p/leak/?marker=m", **SERIAL)
    started = time.monotonic()
    response = client.get("/p/leak/?marker=m")
    assert time.monotonic() - started < 1.0
    assert response.content == serial.content
    assert "Server-Timing" not in response.headers


def test_concurrent_requests_never_see_each_others_fragments(parallel):
    def fetch(path):
        response = Client().get(path)
        return response.content.decode(), response.headers.get("Server-Timing", "")

    assert not run_concurrently(fetch)[:2]
    assert run_concurrently.pids <= set(parallel.worker_pids)


def test_blocks_that_cannot_be_sent_render_inline_and_say_why(parallel, caplog):
    from django.template import engines

    caplog.set_level("INFO", logger="parallel_render")
    # Each block logs a reason once per process; fresh template objects log again.
    for loader in engines["django"].engine.template_loaders:
        getattr(loader, "reset", lambda: None)()
    _serial, response = compare(Client(), "/p/unsafe/?unsendable=1&n=4")
    log = caplog.text
    assert "{% cycle %} keeps state" in log
    assert "inside {% filter %}" in log
    assert "inside {% spaceless %}" in log
    assert "assigns a variable" in log
    assert "thing is a builtins.object" in log
    assert "Server-Timing" not in response.headers


def test_render_to_string_whose_html_a_view_puts_in_json_is_stitched_before_it_returns(parallel):
    response = Client().get("/json/?title=J")
    assert response.json() == {"html": "inner J\n"}
    assert block_pids(response), "the block was rendered by a worker"


def test_a_view_that_reuses_renders_output_gets_the_whole_page(parallel):
    """JsonResponse({"html": render(...).content.decode()}): no placeholder reaches the view."""
    from parallel_render.testing import serially

    path = "/json_of_render/?marker=j&n=4"
    with serially():
        serial = Client().get(path)
    response = Client().get(path)
    assert response.json() == serial.json()
    assert "<!--pr:" not in response.json()["html"]
    assert len(block_pids(response)) == 5  # four items and the title


def test_a_render_inside_a_tag_is_whole_before_the_tag_transforms_it(parallel):
    """A custom tag that escapes what render_to_string gives it sees the finished HTML."""
    from parallel_render.testing import assert_parallel_equals_serial

    response = assert_parallel_equals_serial(Client(), "/p/escaped_include/?title=E")
    assert "&lt;!--pr:" not in response.content.decode()
    assert len(block_pids(response)) == 2


def test_content_length_is_fixed_after_stitching(parallel):
    response = Client().get("/p/leak/?marker=a-much-longer-marker-than-the-placeholder&n=3&content_length=1")
    assert block_pids(response)
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert b"<!--pr:" not in response.content


def test_user_content_that_looks_like_a_placeholder_stays_text(parallel):
    fake = "<!--pr:" + "0" * 32 + ":0-->"
    from urllib.parse import quote

    _serial, response = compare(Client(), f"/p/lookalike/?title=T&marker={quote(fake)}")
    body = response.content.decode()
    assert f"[{fake}]" in body and "<b>T</b>" in body and "&lt;!--pr:" in body
    assert len(block_pids(response)) == 1


def test_a_block_rescued_after_its_loop_renders_with_its_own_iteration(parallel):
    """forloop is one dict the loop updates in place: what a block captured must not move on."""
    from parallel_render.testing import serially

    with serially():
        serial = Client().get("/p/loop_rescue/?sleep=1")
    assert serial.content.decode().strip() == "[1.1:00F]<1>[1.2:01L]<1>[2.1:10F]<2>[2.2:11L]<2>[3.1:20FP]<3>[3.2:21LP]<3>"
    response = Client().get("/p/loop_rescue/?sleep=1")
    assert response.content == serial.content
    assert rescued(response) == ["timed out"] * 12


def test_a_block_that_writes_the_session_or_adds_a_message_has_the_same_effects_as_serially(parallel):
    """The page, the session and the messages the next request sees are the serial ones."""
    from parallel_render.testing import serially

    def visit_twice(client: Client) -> list[str]:
        first = client.get("/effects/?marker=one").content.decode()
        second = client.get("/effects/?marker=two").content.decode()
        return [first, second]

    with serially():
        serial = visit_twice(Client())
    assert "<p>visits one</p><m>remembered k=one</m>" in serial[1]
    client = Client()
    first = client.get("/effects/?marker=one")
    # The first time, a worker finds the block changing the request and hands it back.
    assert len(block_pids(first)) == 1
    (why,) = rescued(first)  # Server-Timing keeps the first 100 characters of the reason
    assert why.startswith("worker error: SideEffect: the block changes request.session; it renders in the master")
    second = client.get("/effects/?marker=two")
    assert [first.content.decode(), second.content.decode()] == serial
    # From then on the master keeps it: one block goes to a worker, the other never leaves.
    assert len(block_pids(second)) == 1 and not rescued(second)
