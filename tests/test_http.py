"""Through real HTTP: gunicorn masters (forked, threaded), the CSRF round trip, big payloads."""

from __future__ import annotations

import http.cookiejar
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from django.test import Client, override_settings

from tests.conftest import block_pids, rescued, run_concurrently
from tests.processes import gunicorn_site

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gunicorn(parallel):
    with gunicorn_site(parallel.address, "/p/leak/", workers=2) as base:
        yield base


def test_twenty_concurrent_http_requests_get_only_their_own_fragments(gunicorn):
    def fetch(path):
        with urllib.request.urlopen(gunicorn + path, timeout=30) as r:
            return r.read().decode(), r.headers["Server-Timing"] or ""

    assert not run_concurrently(fetch, n=8)[:2]
    assert run_concurrently.pids and not (run_concurrently.pids - set(_worker_pids()))


def _worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if "parallel_worker" in " ".join(p.info["cmdline"] or [])]


def test_csrf_token_rendered_by_a_worker_posts_from_a_fresh_browser(gunicorn):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{gunicorn}/form/?title=hello") as r:
        page = r.read().decode()
        timing = r.headers["Server-Timing"]
    assert re.search(r"pid \d+", timing) and not re.search(r"master render", timing)  # rendered by a worker
    assert any(c.name == "csrftoken" for c in jar), "the CSRF cookie must be set on the response"
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    data = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "x": "hello"}).encode()
    request = urllib.request.Request(f"{gunicorn}/form/", data=data, headers={"Referer": f"{gunicorn}/form/"})
    with opener.open(request) as r:
        assert r.status == 200 and r.read().decode() == "posted hello"


def test_oversize_block_renders_inline(parallel, caplog, settings):
    client = Client()
    caplog.set_level("DEBUG", logger="parallel_render")
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "MAX_PAYLOAD": 1000}):
        serial = client.get("/p/big/?n=50", HTTP_X_PARALLEL_RENDER="serial")
        response = client.get("/p/big/?n=50")
    assert response.content == serial.content
    # The block reading 50 items is too big to send; the one reading the title is not.
    assert len(block_pids(response)) == 1
    assert not rescued(response)
    assert "exceeds MAX_PAYLOAD (1000)" in caplog.text


def test_fastrouter_command_runs_the_router(tmp_path):
    os.chmod(tmp_path, 0o700)
    sock = tmp_path / "r.sock"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "django", "fastrouter", "--listen", f"unix://{sock}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == f"READY unix://{sock}"
        assert (sock.stat().st_mode & 0o777) == 0o600
    finally:
        proc.terminate()
        proc.communicate(timeout=5)  # waits, and closes the pipes
    assert not sock.exists()


def test_result_larger_than_max_payload_is_rendered_by_the_master(transactional_db, monkeypatch):
    from parallel_render import conf
    from parallel_render.cluster import LocalCluster

    # The job is small; the HTML the worker makes is not.
    with LocalCluster(1, env={"PR_TEST_DB": _db_name()}, worker_args=["--settings", "tests.settings_small"]) as c:
        c.wait_ready()
        monkeypatch.setenv(conf.ENV_ROUTER, c.address)
        conf.get_config.cache_clear()
        title = "x" * 200
        serial = Client().get(f"/p/bigresult/?title={title}", HTTP_X_PARALLEL_RENDER="serial")
        response = Client().get(f"/p/bigresult/?title={title}")
    conf.get_config.cache_clear()
    assert response.content == serial.content
    assert rescued(response) and "exceeds MAX_PAYLOAD (4000)" in rescued(response)[0]


def _db_name() -> str:
    from django.conf import settings

    return str(settings.DATABASES["default"]["NAME"])


def test_tcp_router_with_the_key_from_secret_key(transactional_db, monkeypatch):
    from django.test import override_settings

    from parallel_render import conf
    from parallel_render.client import RouterClient, RouterUnavailable
    from parallel_render.cluster import LocalCluster

    with LocalCluster(2, address="tcp://127.0.0.1:0", env={"PR_TEST_DB": _db_name()}) as c:
        assert c.address.startswith("tcp://127.0.0.1:") and not c.address.endswith(":0")
        c.wait_ready()
        monkeypatch.setenv(conf.ENV_ROUTER, c.address)
        conf.get_config.cache_clear()
        serial = Client().get("/p/leak/?marker=t&n=3", HTTP_X_PARALLEL_RENDER="serial")
        response = Client().get("/p/leak/?marker=t&n=3")
        assert response.content == serial.content
        assert set(block_pids(response)) <= set(c.worker_pids) and len(block_pids(response)) == 4
        # A process with another SECRET_KEY finds that the router does not prove its key.
        with override_settings(SECRET_KEY="someone else"):
            stranger = RouterClient(c.address)
            with pytest.raises(RouterUnavailable, match=r"does not hold this site's key \(different SECRET_KEY\?\)"):
                stranger.submit(b"x", 1.0)
    conf.get_config.cache_clear()
