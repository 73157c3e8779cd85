"""Helpers for tests that start whole process trees (runparallel, runserver) and signal them."""

from __future__ import annotations

import sys
import time

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
