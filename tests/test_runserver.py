"""`manage.py runserver` starts a router and workers and leaves none behind, however it ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.processes import python

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_runserver(*extra: str) -> tuple[subprocess.Popen, int]:
    """runserver on a free port, its output in a file (proc.log), SIGINT at its default whatever pytest inherited."""
    port = free_port()
    from django.conf import settings

    env = dict(
        os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
        PR_TEST_DB=str(settings.DATABASES["default"]["NAME"]),
    )
    env.pop("PARALLEL_RENDER_ROUTER", None)
    log = tempfile.NamedTemporaryFile(prefix="runserver-", suffix=".log", delete=False)
    with log:
        proc = subprocess.Popen(
            python("-m", "django", "runserver", f"127.0.0.1:{port}", *extra),
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    proc.log = Path(log.name)  # type: ignore[attr-defined]
    return proc, port


def wait_for(predicate, timeout: float = 60.0, what: str = "", proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    said = "\n".join(proc.log.read_text(errors="replace").splitlines()[-40:]) if proc is not None else ""
    raise AssertionError(f"timed out waiting for {what}" + (f"; runserver said:\n{said}" if said else ""))


def cluster_pids(root_pid: int) -> set[int]:
    """Routers and workers below root_pid."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for child in children:
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "fastrouter" in cmd or "parallel_worker" in cmd:
            found.add(child.pid)
    return found


def all_gone(pids: set[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


def page_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/p/leak/?marker=rs", timeout=30) as r:
            return r.status == 200 and "rs-0" in r.read().decode()
    except OSError:
        return False


@pytest.fixture
def runserver():
    procs = []

    def start(*extra):
        proc, port = start_runserver(*extra)
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.log.unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["sigint-group", "sigkill-parent"])
def test_no_orphans(runserver, transactional_db, how):
    proc, port = runserver()
    wait_for(lambda: len(cluster_pids(proc.pid)) == 3, what="router and 2 workers", proc=proc)
    wait_for(lambda: page_ok(port), what="the page", proc=proc)
    pids = cluster_pids(proc.pid)
    everything = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    if how == "sigint-group":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    else:
        proc.kill()
    wait_for(lambda: all_gone(pids | everything), timeout=30, what=f"{how}: no process left", proc=proc)
    proc.wait()


def test_autoreload_replaces_the_cluster(runserver, transactional_db, tmp_path):
    proc, port = runserver()
    wait_for(lambda: len(cluster_pids(proc.pid)) == 3, what="router and 2 workers", proc=proc)
    wait_for(lambda: page_ok(port), what="the page", proc=proc)
    first = cluster_pids(proc.pid)
    views = ROOT / "tests" / "testapp" / "views.py"
    os.utime(views)  # what saving the file does, for the reloader
    wait_for(lambda: all_gone(first), timeout=60, what="the old cluster to go", proc=proc)
    wait_for(lambda: len(cluster_pids(proc.pid)) == 3, what="a new cluster", proc=proc)
    wait_for(lambda: page_ok(port), what="the page after reload", proc=proc)
    assert not (cluster_pids(proc.pid) & first)


def test_a_killed_worker_is_logged_by_its_signal_and_replaced(runserver, transactional_db):
    """runserver's router and workers have the node's supervisor (in a thread of the serving process)."""
    proc, port = runserver("--noreload")
    wait_for(lambda: len(cluster_pids(proc.pid)) == 3, what="router and 2 workers", proc=proc)
    wait_for(lambda: page_ok(port), what="the page", proc=proc)
    workers = [pid for pid in cluster_pids(proc.pid) if "parallel_worker" in " ".join(psutil.Process(pid).cmdline())]
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: re.search(rf"worker {workers[0]} \(slot \d\) killed by SIGKILL", proc.log.read_text(errors="replace")),
             what="the supervisor to say how the worker ended", proc=proc)
    wait_for(lambda: len(cluster_pids(proc.pid)) == 3 and workers[0] not in cluster_pids(proc.pid), what="a new worker", proc=proc)
    wait_for(lambda: page_ok(port), what="the page", proc=proc)


def test_noparallel_starts_nothing(runserver, transactional_db):
    proc, port = runserver("--noparallel")
    wait_for(lambda: page_ok(port), what="the page", proc=proc)
    assert cluster_pids(proc.pid) == set()


def test_startup_line_names_router_and_workers(runserver, transactional_db):
    proc, port = runserver("--noreload")
    wait_for(lambda: page_ok(port), what="the page", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(30)
    out = proc.log.read_text(errors="replace")
    assert re.search(r"parallel_render: fastrouter at unix://\S+ \(pid \d+\), 2 workers", out), out


def test_parser_keeps_the_next_runserver_options_and_adds_noparallel():
    from django.contrib.staticfiles.management.commands.runserver import Command as StaticRunserver

    from parallel_render.management.commands.runserver import Command

    assert issubclass(Command, StaticRunserver)  # the app after ours in INSTALLED_APPS
    parser = Command().create_parser("manage.py", "runserver")
    assert "--noparallel" in parser.format_help() and "--nostatic" in parser.format_help()
    assert parser.parse_args(["--noparallel"]).use_parallel is False
    assert parser.parse_args([]).use_parallel is True
