"""Errors in blocks behave as in serial rendering; bad settings and orders are reported."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

from parallel_render import conf
from tests.conftest import rescued


def test_block_error_reaches_the_master_as_in_serial_rendering(parallel):
    client = Client(raise_request_exception=True)
    with pytest.raises(ValueError, match="boom"):
        client.get("/p/error/", HTTP_X_PARALLEL_RENDER="serial")
    with pytest.raises(ValueError, match="boom"):
        client.get("/p/error/")


def test_block_error_with_fallback_shows_the_fallback_in_production(parallel, caplog):
    response = Client().get("/p/error_fallback/?title=T")
    assert response.content.decode().strip() == "<p>sorry T</p>"
    assert rescued(response) == ["worker error: ValueError: boom"]
    assert "rendering its {% fallback %}" in caplog.text


@override_settings(DEBUG=True)
def test_block_error_with_fallback_raises_in_debug(parallel):
    with pytest.raises(ValueError, match="boom"):
        Client(raise_request_exception=True).get("/p/error_fallback/")


def test_serial_query_param_and_disabled_setting(parallel, settings):
    client = Client()
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SERIAL_QUERY_PARAM": "serial"}):
        assert "Server-Timing" in client.get("/p/leak/").headers
        assert "Server-Timing" not in client.get("/p/leak/?serial=1").headers
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "ENABLED": False}):
        assert "Server-Timing" not in client.get("/p/leak/").headers


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"TIMEOUT": 0}, "TIMEOUT'] must be a positive number"),
        ({"WORKERS": -1}, "WORKERS'] must be a whole number"),
        ({"MASTER_THREADS": 2.5}, "MASTER_THREADS'] must be a whole number >= 0, not 2.5"),
        ({"ROUTER": "redis://x"}, "must start with unix:// or tcp://"),
        ({"TIMEOUTS": 1}, "unknown keys \\['TIMEOUTS'\\]"),
        ([], "must be a dict"),
    ],
)
def test_bad_settings_say_which_and_why(value, message):
    with override_settings(PARALLEL_RENDER=value):
        with pytest.raises(ImproperlyConfigured, match=message):
            conf.get_config()
        errors = [e for e in run_checks() if e.id == "parallel_render.E001"]
        assert errors and "PARALLEL_RENDER" in errors[0].hint


def test_middleware_order_check():
    from django.conf import settings

    bad = ["parallel_render.middleware.ParallelRenderMiddleware", "django.middleware.gzip.GZipMiddleware"]
    with override_settings(MIDDLEWARE=bad):
        (warning,) = [e for e in run_checks() if e.id == "parallel_render.W001"]
        assert "GZipMiddleware" in warning.msg and "Move" in warning.hint
    with override_settings(MIDDLEWARE=list(reversed(bad))):
        assert not [e for e in run_checks() if e.id == "parallel_render.W001"]
    apps = [a for a in settings.INSTALLED_APPS if a != "parallel_render"] + ["parallel_render"]
    with override_settings(INSTALLED_APPS=apps):
        assert [e for e in run_checks() if e.id == "parallel_render.W002"]


def test_missing_router_binary_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv(conf.ENV_BINARY, str(tmp_path / "nope"))
    monkeypatch.setattr(conf.os.path, "isfile", lambda path: False)
    with pytest.raises(ImproperlyConfigured, match=r"fastrouter binary was not found.*nope"):
        conf.fastrouter_binary()


def test_parallel_bench_page_prints_a_table(parallel, capsys):
    import json

    from django.core.management import call_command

    call_command("parallel_bench", "page", "/p/slow/?sleep=0.05", "--requests", "3", "--json")
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 3 and result["speedup_p50"] > 1.2
    call_command("parallel_bench", "page", "/p/leak/", "--requests", "2")
    out = capsys.readouterr().out
    assert "| serial" in out and "| parallel" in out and "speed-up" in out


def test_parallel_check_lists_blocks_with_reasons(capsys, db):
    from django.core.management import call_command

    call_command("parallel_check", "--url", "/p/unsafe/?unsendable=1&n=2", no_color=True)
    out = capsys.readouterr().out
    assert "t/exact.html" in out and "parallel  reads: " in out
    assert "inline: {% cycle %} keeps state across the page" in out
    assert "inline: inside {% filter %}, which may change its output" in out
    assert "rendering /p/unsafe/" in out
    assert "t/unsafe.html:5" in out and "inline: thing is a builtins.object" in out


def test_debug_startup_warns_about_inline_blocks():
    with override_settings(DEBUG=True):
        warnings = [e for e in run_checks(tags=["templates"]) if e.id == "parallel_render.W003"]
    assert any("t/unsafe.html:2 renders inline: inside {% filter %}" in w.msg for w in warnings)
    with override_settings(DEBUG=False):
        assert not [e for e in run_checks(tags=["templates"]) if e.id == "parallel_render.W003"]


def test_fallback_is_for_failures_and_timeouts_not_for_a_full_queue(transactional_db, monkeypatch):
    from parallel_render.cluster import LocalCluster

    # No workers and room for one queued job: the first block waits and times out (its
    # fallback shows), the second is answered BUSY at once and the master renders it.
    with LocalCluster(0, router_args=["--max-queue", "1"]) as cluster:
        monkeypatch.setenv(conf.ENV_ROUTER, cluster.address)
        conf.get_config.cache_clear()
        response = Client().get("/p/busy/?title=T")
    conf.get_config.cache_clear()
    assert response.content.decode().strip() == "first-fallback|second T"
    assert rescued(response) == ["timed out", "the router queue is full"]


def test_a_worker_that_cannot_start_is_retried_with_growing_delays(caplog):
    import re
    import time

    from parallel_render.cluster import LocalCluster

    caplog.set_level("WARNING", "parallel_render")

    def delays() -> list[float]:
        # What the supervisor says each time the worker dies: "... starting it again in 0.4 s".
        return [float(d) for d in re.findall(r"worker .*unplanned; starting it again in ([\d.]+) s", caplog.text)]

    # A wrong database alias makes every worker exit at once with a clear error.
    with LocalCluster(1, worker_args=["--db-name", "nosuchalias=x"]):
        # A loaded machine starts Python slowly: wait for enough quick deaths to see the delays grow.
        give_up = time.monotonic() + 60
        while len(delays()) < 4 and time.monotonic() < give_up:
            time.sleep(0.05)
    seen = delays()
    assert len(seen) >= 4, caplog.text[-2000:]
    # Each quick death doubles the wait: 0.1, 0.2, 0.4, then 0.8 s before the fifth start.
    assert seen[:4] == [0.1, 0.2, 0.4, 0.8], seen


def test_server_timing_is_only_sent_in_debug_unless_the_site_says_so(parallel, settings):
    base = {k: v for k, v in settings.PARALLEL_RENDER.items() if k != "SERVER_TIMING"}
    client = Client()
    with override_settings(PARALLEL_RENDER=base, DEBUG=False):
        assert "Server-Timing" not in client.get("/p/leak/").headers
    with override_settings(PARALLEL_RENDER=base, DEBUG=True):
        assert " pid " in client.get("/p/leak/").headers["Server-Timing"]
    with override_settings(PARALLEL_RENDER={**base, "SERVER_TIMING": False}, DEBUG=True):
        assert "Server-Timing" not in client.get("/p/leak/").headers


def test_a_page_that_fails_after_sending_blocks_leaves_nothing_pending(parallel):
    """Django turns the view's exception into a 500 response inside our middleware; the
    blocks already sent are still collected (or cancelled), so no answer is left behind."""
    from parallel_render.client import get_client

    client = Client(raise_request_exception=True)
    with pytest.raises(ValueError, match="boom"):
        client.get("/p/raise_after/?n=5", HTTP_X_PARALLEL_RENDER="serial")
    with pytest.raises(ValueError, match="boom"):
        client.get("/p/raise_after/?n=5")
    router = get_client(conf.get_config()["ROUTER"])
    assert router.outstanding() == (0, 0)


def test_outstanding_counts_the_jobs_a_client_is_still_owed():
    import time

    from parallel_render import protocol as p
    from parallel_render.client import RouterClient
    from parallel_render.cluster import LocalCluster

    # No workers: every job waits in the router's queue until its own deadline.
    with LocalCluster(0) as cluster:
        client = RouterClient(cluster.address)
        try:
            assert client.outstanding() == (0, 0)
            slow = client.submit(b"job", 60.0)
            quick = client.submit(b"job", 0.05)
            assert client.outstanding() == (2, 0)
            # Waiting for the slow job reads the quick job's TIMEOUT on the way and files it;
            # the slow one is cancelled when the wait ends.
            assert client.collect([slow], time.monotonic() + 2) == {}
            assert client.outstanding() == (0, 1) and client.outstanding().total == 1
            assert client.collect([quick], time.monotonic() + 2)[quick].type == p.TIMEOUT
            assert client.outstanding() == (0, 0)
        finally:
            client.close()


def test_a_timeout_that_is_no_positive_number_renders_as_serially(parallel, caplog):
    """timeout=abc (missing), a blank string, -1: serially these render; in parallel too, with TIMEOUT."""
    from parallel_render.testing import assert_parallel_equals_serial, worker_rendered

    response = assert_parallel_equals_serial(Client(), "/p/timeouts/?marker=&fail=-1&title=T")
    assert len(worker_rendered(response)) == 3
    assert response.content.decode().strip() == "[a T][b T][c T]"
    for value in ("''", "-1"):
        assert f"timeout={value} is not a positive number of seconds; using TIMEOUT" in caplog.text


@pytest.mark.parametrize("literal", ["-1", "0", '"abc"', "0.0", "1e999"])
def test_a_literal_timeout_that_can_never_be_right_is_refused_when_the_template_compiles(literal):
    from django.template import Template, TemplateSyntaxError

    with pytest.raises(TemplateSyntaxError, match="must be a positive number of seconds"):
        Template("{% load parallel %}{% parallel timeout=" + literal + " %}x{% endparallel %}")
    Template("{% load parallel %}{% parallel timeout=0.5 %}x{% endparallel %}")
    Template("{% load parallel %}{% parallel timeout=\"2\" %}x{% endparallel %}")
