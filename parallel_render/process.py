"""Process plumbing shared by runserver, the node and the tests: parent-death, signals, exit statuses."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when our parent dies; exit now if it already has.

    Linux sends the signal when the *thread* that started us ends, so a supervisor that
    runs in a thread must start its children from that thread (parallel_render.supervisor
    does).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker's parent check still applies
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def send(proc: subprocess.Popen, sig: int) -> bool:
    """Signal proc if it is still running (and not yet reaped); True if the signal was sent."""
    if proc.returncode is not None:
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_all(procs: list[subprocess.Popen], grace: float) -> None:
    """Wait for every process, sharing one grace period; kill whatever outlives it."""
    end = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.01, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass(frozen=True)
class Exit:
    """How a child ended, from its wait status: an exit code or the signal that killed it."""

    code: int | None = None  # exit code, when it exited
    signal: int | None = None  # the signal that killed it
    core: bool = False
    unknown: bool = False  # someone else reaped it: the status is lost

    @classmethod
    def from_status(cls, status: int) -> Exit:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status), core=os.WCOREDUMP(status))
        if os.WIFEXITED(status):
            return cls(code=os.WEXITSTATUS(status))
        return cls(unknown=True)

    @classmethod
    def from_returncode(cls, returncode: int) -> Exit:
        return cls(signal=-returncode) if returncode < 0 else cls(code=returncode)

    @property
    def returncode(self) -> int:
        """subprocess's convention: the exit code, or minus the signal."""
        if self.signal is not None:
            return -self.signal
        return self.code if self.code is not None else 255

    @property
    def clean(self) -> bool:
        return self.code == 0

    @property
    def signal_name(self) -> str:
        return signal_name(self.signal) if self.signal is not None else ""

    def __str__(self) -> str:
        if self.unknown:
            return "exited (status unknown: reaped by another part of this process)"
        if self.signal is not None:
            return f"killed by {self.signal_name}" + (" (core dumped)" if self.core else "")
        return f"exit code {self.code}"


def reap(proc: subprocess.Popen) -> Exit | None:
    """The Exit of proc if it has ended (reaping it), else None. Never blocks.

    Waits for this pid only (never waitpid(-1)), so it cannot take another part of the
    process's children; a status someone else took is reported as unknown, never as 0.
    """
    if proc.returncode is not None:
        return Exit.from_returncode(proc.returncode)
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        proc.returncode = 255
        return Exit(unknown=True)
    if pid == 0:
        return None
    result = Exit.from_status(status)
    proc.returncode = result.returncode
    return result


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when pid exits (Linux 5.3+), or None."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None
