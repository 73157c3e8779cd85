"""Process plumbing shared by runserver, the node and the tests: parent-death, spawning."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when our parent dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker's parent check still applies
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def send(proc: subprocess.Popen, sig: int) -> None:
    """Signal proc if it is still running."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def wait_all(procs: list[subprocess.Popen], grace: float) -> None:
    """Wait for every process, sharing one grace period; kill whatever outlives it."""
    end = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.01, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
