"""Helpers for tests that start whole process trees (runparallel, runserver) and signal them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

# A background job of a non-interactive shell starts with SIGINT ignored, and a process
# inherits that through exec: Python then installs no KeyboardInterrupt handler, and a test
# that sends SIGINT would wait forever. This prefix puts SIGINT back to its default, then
# execs the real command (same pid), so such tests do not depend on how pytest was started.
SIGINT_DEFAULT = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]


def python(*args: str) -> list[str]:
    """`python ARGS` with SIGINT at its default, whatever this process inherited."""
    return [*SIGINT_DEFAULT, *args]


def wait_for(condition, timeout: float, step: float = 0.05) -> bool:
    """Poll condition until it is true or timeout passes; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


@contextlib.contextmanager
def gunicorn_site(router: str, probe: str, workers: int = 1, kind: str = "gthread", threads: int = 4,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """A real gunicorn serving the test site (tests.wsgi) on a free port, its masters sending
    blocks to the router at `router`; yields its base URL once `probe` answers."""
    extra = ["--threads", str(threads)] if kind == "gthread" else []
    with _served(lambda port: ["-m", "gunicorn", "tests.wsgi", "-b", f"127.0.0.1:{port}", "-w", str(workers),
                               "-k", kind, *extra, "--log-level", "warning"], router, probe, env) as base:
        yield base


@contextlib.contextmanager
def uvicorn_site(router: str, probe: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real uvicorn serving the test site (tests.asgi, Django's ASGI handler) on a free port."""
    with _served(lambda port: ["-m", "uvicorn", "tests.asgi:application", "--host", "127.0.0.1", "--port", str(port),
                               "--log-level", "warning"], router, probe, env) as base:
        yield base


@contextlib.contextmanager
def _served(args, router: str, probe: str, env: dict[str, str] | None) -> Iterator[str]:
    """`python ARGS(port)` serving the test site on the test database, on a free port."""
    from django.conf import settings

    from tests.servers import free_port

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    environ = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(root),
                   PR_TEST_DB=str(settings.DATABASES["default"]["NAME"]), PARALLEL_RENDER_ROUTER=router, **(env or {}))
    proc = subprocess.Popen([sys.executable, *args(port)], cwd=root, env=environ)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for(lambda: _answers(base + probe), 20):
            raise AssertionError(f"{args(port)[1]} did not start")
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False
