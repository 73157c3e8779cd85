"""The demo site in a real browser: blocks come from workers, and the page shows it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dom(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    profile = tempfile.mkdtemp(prefix="pr-chromium-")
    try:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", url],
            capture_output=True, timeout=60, check=True,
        )
        return out.stdout.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    db = tmp_path_factory.mktemp("demo") / "demo.sqlite3"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="demo_site.settings", DEMO_DB_PATH=str(db),
               DEMO_WORKERS="4", DEMO_DEBUG="0", PYTHONPATH=str(ROOT),
               # Every block goes to a worker (none stays in the master because all 4 are
               # busy), so the timing table has a row per block.
               DEMO_ADAPTIVE="0")
    env.pop("PARALLEL_RENDER_ROUTER", None)
    for cmd in (["migrate", "-v0"], ["seed_demo"]):
        subprocess.run([sys.executable, "manage.py", *cmd], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(base + "/q/1/", timeout=5).read()  # also warms the workers
            break
        except OSError:
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./scripts/test.sh installs it)")
def test_demo_page_shows_blocks_rendered_by_workers_with_their_timings(demo):
    dom = chromium_dom(f"{demo}/q/1/?latency=20")
    master = re.search(r'id="master-pid">pid (\d+)', dom)
    assert master, "the page names the master's pid"
    rows = re.findall(r"<tr><td>pr-\d+</td><td>([^<]*)</td>", dom)
    assert len(rows) >= 15, "the script fills one timing row per block from Server-Timing"
    pids = {int(pid) for pid in re.findall(r"pid (\d+) render", " ".join(rows))}
    assert len(pids) >= 2 and int(master.group(1)) not in pids
    serial = chromium_dom(f"{demo}/q/1/?latency=20&serial=1")
    assert not re.findall(r"<tr><td>pr-\d+</td>", serial)
