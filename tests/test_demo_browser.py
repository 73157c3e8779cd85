"""The demo site in a real browser: blocks come from workers, and the page shows it: its first
screen (parallel and serial times, speed-up, waterfall) and the debug toolbar's panel."""

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

from tests.chromium import Chromium
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
               DEMO_WORKERS="4", PYTHONPATH=str(ROOT),
               # DEBUG on: the debug toolbar (on ?toolbar=1 pages) and its static files.
               DEMO_DEBUG="1", DEMO_TOOLBAR="1",
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


# The toolbar renders into a shadow root (django-debug-toolbar 6+), or into the page itself.
TOOLBAR = "((document.getElementById('djDebugRoot') || {}).shadowRoot || document)"
SCREENSHOTS = os.environ.get("PR_SCREENSHOTS") == "1"  # rewrite docs/*.png from this run


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./scripts/test.sh installs it)")
def test_first_screen_shows_parallel_and_serial_times_the_speed_up_and_the_waterfall(demo):
    with Chromium(1280, 800) as browser:
        browser.open(f"{demo}/q/1/?latency=20")
        # The serial time comes from the page's own background fetch of ?serial=1.
        browser.wait_for("document.getElementById('speedup').dataset.value")
        shown = browser.eval("""(() => {
            const screen = document.getElementById('first-screen');
            const rows = Array.from(screen.querySelectorAll('.pr-waterfall .pr-row'));
            return {parallel: +document.getElementById('parallel-ms').dataset.ms,
                    serial: +document.getElementById('serial-ms').dataset.ms,
                    speedup: +document.getElementById('speedup').dataset.value,
                    bottom: screen.getBoundingClientRect().bottom, text: screen.innerText,
                    rows: rows.map(r => ({outcome: r.dataset.outcome, pid: r.dataset.pid || null,
                                          bars: Array.from(r.querySelectorAll('.pr-seg')).map(s => s.classList[1].replace('pr-seg-', ''))}))};
        })()""")
        if SCREENSHOTS:
            (ROOT / "docs" / "demo-first-screen.png").write_bytes(browser.screenshot())
    assert shown["bottom"] <= 800, "the numbers and the waterfall fit the first screen"
    # 17 blocks of 20 ms each: at least 340 ms serially; 4 workers share them in parallel.
    assert shown["serial"] >= 340 and 0 < shown["parallel"] < shown["serial"], shown
    assert shown["speedup"] == pytest.approx(shown["serial"] / shown["parallel"], rel=0.01)
    assert shown["speedup"] > 1.3, shown
    assert len(shown["rows"]) == 17
    sent = [r for r in shown["rows"] if r["outcome"] == "sent"]
    assert len(sent) >= 15 and all(r["pid"] for r in sent)
    assert all({"queue", "render", "stitch"} >= set(r["bars"]) - {"submit"} and "render" in r["bars"] for r in sent)
    for words in ("In parallel", "Serially", "Speed-up", "Waterfall"):
        assert words in shown["text"], f"the first screen explains {words!r}"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./scripts/test.sh installs it)")
def test_debug_toolbar_panel_shows_each_block_with_its_outcome_worker_and_waterfall(demo):
    with Chromium(1280, 800) as browser:
        browser.open(f"{demo}/q/1/?latency=20&toolbar=1")
        button = f"{TOOLBAR}.querySelector('#djdt-ParallelRenderPanel a')"
        subtitle = browser.wait_for(f"{button} && {button}.textContent.replace(/\\s+/g, ' ').trim()")
        assert "sent" in subtitle, subtitle
        browser.eval(f"{button}.click()")  # the toolbar fetches the panel's content and opens it
        browser.wait_for(f"{TOOLBAR}.querySelectorAll('#ParallelRenderPanel .pr-row').length")
        rows = browser.eval(f"""Array.from({TOOLBAR}.querySelectorAll('#ParallelRenderPanel .pr-row')).map(r => ({{
            outcome: r.dataset.outcome, label: r.dataset.label, pid: r.dataset.pid || null,
            cells: Array.from(r.cells).map(c => c.innerText.trim()),
            bars: Array.from(r.querySelectorAll('.pr-seg')).map(s => [s.classList[1], s.getBoundingClientRect().width])}}))""")
        png = browser.screenshot()
        if SCREENSHOTS:
            (ROOT / "docs" / "toolbar-panel.png").write_bytes(png)
    assert png.startswith(b"\x89PNG")
    assert len(rows) == 17, rows
    labels = {r["label"] for r in rows}
    assert "qa/question_body.html:29" in labels and {"qa/question_body.html:33", "qa/question_body.html:35"} <= labels
    sent = [r for r in rows if r["outcome"] == "sent"]
    assert len(sent) >= 15
    for r in sent:
        assert r["cells"][1] == "sent" and r["cells"][2] == r["pid"], r  # outcome, then its worker's pid
        kinds = [kind for kind, _width in r["bars"]]
        assert "pr-seg-render" in kinds and kinds == sorted(kinds, key=["pr-seg-submit", "pr-seg-queue", "pr-seg-render", "pr-seg-stitch"].index)
        assert all(width > 0 for _kind, width in r["bars"]), "every bar is drawn"
    assert len({r["pid"] for r in sent}) >= 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (./scripts/test.sh installs it)")
def test_streamed_question_page_paints_the_question_before_its_answers_arrive(demo):
    # 17 blocks of 600 ms on 4 workers: the page takes about 3 s, its question paints at once.
    with Chromium(1280, 800) as browser:
        browser.call("Page.navigate", session=True, url=f"{demo}/q/1/stream/?latency=600")
        first = browser.wait_for("""(() => {
            const fcp = performance.getEntriesByName('first-contentful-paint')[0];
            return fcp && document.querySelector('section.question h1') && {
                fcp: fcp.startTime, state: document.readyState,
                answers: document.querySelectorAll('article.answer').length};
        })()""")
        png = browser.screenshot()
        if SCREENSHOTS:
            (ROOT / "docs" / "streaming-first-paint.png").write_bytes(png)
        done = browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('article.answer').length")
    assert first["state"] == "loading" and first["answers"] < done, (first, done)
    assert done >= 10
