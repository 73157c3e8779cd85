"""Named regressions for the rendering semantics: what runs in parallel, and how it renders."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import pytest
from django.template import engines
from django.test import Client

from tests.conftest import block_pids, rescued

SERIAL = {"HTTP_X_PARALLEL_RENDER": "serial"}
GENERATED = Path(tempfile.gettempdir()) / "parallel_render_generated_templates"


def fresh_templates() -> None:
    """Forget parsed templates, so blocks log their reasons again."""
    for loader in engines["django"].engine.template_loaders:
        getattr(loader, "reset", lambda: None)()


def same(url: str):
    client = Client()
    serial = client.get(url, **SERIAL)
    response = client.get(url)
    assert response.status_code == serial.status_code == 200
    assert response.content.decode() == serial.content.decode()
    return response


def test_only_the_variables_a_block_reads_travel(parallel):
    # `thing` cannot be sent, but /p/leak/ blocks never read it.
    response = same("/p/leak/?unsendable=1&n=3")
    assert len(block_pids(response)) == 4 and not rescued(response)


def test_stateful_tags_and_cache_render_inline(parallel, caplog):
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    from django.core.cache import cache

    cache.clear()  # so the block inside {% cache %} renders rather than comes from the cache
    response = Client().get("/p/semantics_stateful/?n=3")
    assert not block_pids(response)
    cache.clear()
    assert response.content == Client().get("/p/semantics_stateful/?n=3", **SERIAL).content
    assert "{% ifchanged %} keeps state across the page" in caplog.text
    assert "inside {% cache %}, which may change its output" in caplog.text
    assert "{% resetcycle %} changes state kept across the page" in caplog.text


def test_custom_tags_are_inline_unless_declared(parallel, caplog, settings):
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    response = same("/p/semantics_custom/?n=2")
    text = caplog.text
    assert "inside {% shout %}" in text
    assert "custom tag {% reads_title %}" in text and "TRANSPARENT_TAGS" in text
    assert "{% url ... as u %} assigns a variable outside the block" in text
    # The loop-scoped assignment does not escape the block: that block is sent.
    assert len(block_pids(response)) == 1


def test_enclosing_transform_in_an_including_template_is_seen_at_render_time(parallel, caplog):
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    response = same("/p/semantics_cross/?n=2&marker=m")
    assert "M-0" in response.content.decode()
    assert not block_pids(response)
    assert "inside {% filter %}" in caplog.text


def test_a_block_in_a_loop_and_then_inside_a_transforming_tag_is_judged_at_each_place(parallel, caplog):
    """enclosure_reason remembers, per page, what it found above an enclosing node's frame:
    the same block, included in a loop, then inside {% filter %}, then in a loop again, is sent,
    kept, and sent."""
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    response = same("/p/enclosure_loop/?n=3&marker=m")
    first, inside, last = response.content.decode().split("|")
    assert first.count("<i>m-") == last.count("<i>m-") == 9 and inside.count("<I>M-") == 3
    assert len(block_pids(response)) == 24  # each include: 3 items and its title
    assert "inside {% filter %}" in caplog.text


def test_silent_failures_language_timezone_and_models(parallel):

    from tests.testapp.models import Article, Author

    author = Author.objects.create(name="Ann", email="")
    Article.objects.create(title="A", body="", author=author)
    response = same("/p/semantics_values/")
    body = response.content.decode()
    assert "[|A]" in body
    assert "fr " in body and "mai 2024" in body
    assert "Asia/Tokyo" in body and "4:08 p.m." in body
    assert len(block_pids(response)) == 4


def test_template_from_a_string_renders_inline(parallel):
    response = Client().get("/from_string/")
    assert response.content.decode() == "inline from string"
    assert not block_pids(response)


def test_version_skew_makes_the_master_render_the_block(parallel):
    GENERATED.mkdir(exist_ok=True)
    name = f"skew_{hashlib.sha256(str(time.time()).encode()).hexdigest()[:12]}.html"
    path = GENERATED / name
    path.write_text("{% load parallel %}{% parallel %}old {{ title }}{% endparallel %}")
    engines["django"].engine.get_template(name)  # the master parsed the old version
    path.write_text("{% load parallel %}{% parallel %}new {{ title }}{% endparallel %}")
    from tests.testapp import views

    views.GENERATED_CONTEXT = {"title": "T"}
    response = Client().get(f"/gen/{name}")
    assert response.content.decode() == "old T"
    assert rescued(response) and "differs between master and worker" in rescued(response)[0]


@pytest.mark.parametrize("debug", [False, True])
def test_errors_surface_as_in_serial_rendering(parallel, settings, debug):
    settings.DEBUG = debug
    client = Client(raise_request_exception=False)
    serial = client.get("/p/error/", **SERIAL)
    response = client.get("/p/error/")
    assert serial.status_code == response.status_code == 500
    if debug:
        # The technical 500 page shows the template frame, as for a serial render.
        assert b"t/error.html" in response.content and b"boom" in response.content


def test_included_template_that_extends_sends_what_its_parent_reads(parallel):
    # _card.html extends _card_base.html, which reads `title` and `marker`.
    response = same("/p/include_extends/?n=3&title=T&marker=M")
    assert len(block_pids(response)) == 3 and not rescued(response)
    assert response.content.decode().count("T|item") == 3 and "|M</div>" in response.content.decode()


def test_declared_context_processors_run_again_in_the_worker(parallel, settings, caplog):
    response = same("/p/processors/")
    assert "[site for /p/processors/ (" in response.content.decode()
    # site_info is made again by the worker; `messages` is not declared, so its block stays here.
    assert len(block_pids(response)) == 1
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "WORKER_CONTEXT_PROCESSORS": []}
    response = same("/p/processors/")
    assert not block_pids(response)
    assert "site_info is a tests.testapp.context_processors.SiteInfo" in caplog.text


def test_a_page_leaves_no_frames_behind_in_its_render_session(parallel):
    """The frames enclosure_reason keeps reach up to the one holding the session: dropped once
    the page's templates have rendered, so the request and response are freed without waiting
    for the cyclic garbage collector."""
    import gc
    import weakref

    from parallel_render import session

    seen = []
    original = session.RenderSession.forget_frames

    def forget_frames(self):
        seen.append((weakref.ref(self), len(self.enclosures)))
        original(self)

    gc.collect()
    gc.disable()
    try:
        session.RenderSession.forget_frames = forget_frames
        response = same("/p/enclosure_loop/?n=2&marker=m")
        del response
        assert seen and seen[-1][1] > 0  # the page's walks kept frames, and the page dropped them
        assert all(ref() is None or not ref().enclosures for ref, _count in seen)
        if sys.version_info >= (3, 11):
            # Freed by reference counting alone. (On 3.10 an asgiref miss's caught exception
            # keeps a frame of the page's render, and with it the session, until the collector
            # runs, with or without these frames.)
            assert all(ref() is None for ref, _count in seen)
    finally:
        session.RenderSession.forget_frames = original
        gc.enable()
