"""A router and its workers as child processes, kept alive: used by runserver and the tests."""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from parallel_render import conf
from parallel_render.process import send, wait_all

logger = logging.getLogger("parallel_render")


# A process that exits sooner than this after starting is failing, not finishing its work;
# it is started again after a delay that doubles up to BACKOFF_MAX.
QUICK_DEATH = 1.0
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


class ClusterError(RuntimeError):
    pass


def private_socket_dir() -> str:
    """A fresh directory only this user can enter (mkdtemp makes it 0700)."""
    return tempfile.mkdtemp(prefix="parallel_render-")


def start_router(address: str, binary: str | None = None, args: Sequence[str] = (), timeout: float = 10.0) -> tuple[subprocess.Popen, str]:
    """Start a fastrouter and wait for its READY line; return the process and its real address."""
    binary = binary or conf.fastrouter_binary()
    cmd = [binary, "--listen", address, "--parent-pid", str(os.getpid()), *args]
    token_dir = None
    if address.startswith("tcp://") and "--auth-token-file" not in args:
        from parallel_render import signing

        token_dir = private_socket_dir()
        cmd += ["--auth-token-file", signing.write_token_file(token_dir)]
    # Its own session: a Ctrl-C meant for the terminal's foreground group must not stop the
    # router before the masters finish their pages; it stops when we say so, or dies with us.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    line = b""
    while time.monotonic() < end and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    if token_dir is not None:
        shutil.rmtree(token_dir, ignore_errors=True)  # read once, at start-up
    if not line.startswith(b"READY "):
        proc.kill()
        proc.wait()
        raise ClusterError(f"fastrouter ({' '.join(cmd)}) did not start: {line.decode(errors='replace')!r}, exit code {proc.returncode}")
    proc.stdout.close()
    return proc, line.split(None, 1)[1].decode().strip()


def worker_command(address: str, max_jobs: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "django", "parallel_worker", "--router", address, "--parent-pid", str(os.getpid())]
    if max_jobs:
        cmd += ["--max-jobs", str(max_jobs)]
    return cmd + list(extra)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra or {})
    return env


class LocalCluster:
    """One router and `workers` worker processes; dead ones are started again."""

    def __init__(
        self,
        workers: int,
        address: str | None = None,
        max_jobs: int | None = None,
        env: dict[str, str] | None = None,
        router_args: Sequence[str] = (),
        binary: str | None = None,
        worker_args: Sequence[str] = (),
    ) -> None:
        self.workers = workers
        self.worker_args = list(worker_args)
        self._dir = None if address else private_socket_dir()
        self.requested_address = address or f"unix://{self._dir}/router.sock"
        self.address = self.requested_address
        self.max_jobs = max_jobs
        self.env = child_env(env)
        self.router_args = list(router_args)
        self.binary = binary
        self.router: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.restarts = 0
        self._started: dict[int, float] = {}  # pid -> when it started
        self._retry_at: dict[object, float] = {}
        self._delay: dict[object, float] = {}
        self._told: dict[object, bool] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> LocalCluster:
        self.router, self.address = start_router(self.requested_address, self.binary, self.router_args)
        self._started[self.router.pid] = time.monotonic()
        self.procs = [self._spawn_worker() for _ in range(self.workers)]
        self._thread = threading.Thread(target=self._supervise, name="parallel_render-supervisor", daemon=True)
        self._thread.start()
        return self

    def _spawn_worker(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            worker_command(self.address, self.max_jobs, self.worker_args), env=self.env, stdin=subprocess.DEVNULL
        )
        self._started[proc.pid] = time.monotonic()
        return proc

    def _due(self, key: object, proc: subprocess.Popen | None, what: str) -> bool:
        """Whether to start key's process again now. One that keeps dying soon after it
        starts (a broken setting, say) is retried with growing delays, and said so once."""
        now = time.monotonic()
        if key not in self._retry_at:
            lived = now - self._started.pop(proc.pid, now) if proc is not None else QUICK_DEATH
            if lived < QUICK_DEATH and (proc is None or proc.returncode != 0):
                delay = self._delay[key] = min(self._delay.get(key, BACKOFF_START / 2) * 2, BACKOFF_MAX)
                if delay >= BACKOFF_MAX and not self._told.get(key):
                    self._told[key] = True
                    logger.error("%s keeps exiting at once (exit code %s); retrying every %.0f s", what,
                                 proc.returncode if proc is not None else "?", BACKOFF_MAX)
            else:
                delay = self._delay[key] = 0.0
                self._told.pop(key, None)
            self._retry_at[key] = now + delay
        if now < self._retry_at[key]:
            return False
        del self._retry_at[key]
        return True

    def _supervise(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                if self._stop.is_set():
                    return
                if self.router is not None and self.router.poll() is not None:
                    if self._due("router", self.router, "the fastrouter"):
                        logger.warning("fastrouter exited with %s; starting it again", self.router.returncode)
                        try:
                            self.router, _ = start_router(self.address, self.binary, self.router_args)
                            self._started[self.router.pid] = time.monotonic()
                        except ClusterError as exc:
                            logger.error("%s", exc)
                        self.restarts += 1
                for i, proc in enumerate(self.procs):
                    if proc.poll() is not None and self._due(i, proc, f"worker {i}"):
                        self.procs[i] = self._spawn_worker()
                        self.restarts += 1

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every worker has told the router it is idle."""
        from parallel_render.client import RouterClient

        client = RouterClient(self.address)
        end = time.monotonic() + timeout
        stats: dict = {}
        while time.monotonic() < end:
            try:
                stats = client.stats()
                if stats.get("workers_idle", 0) >= self.workers:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ClusterError(f"workers not ready after {timeout}s: {stats}")

    def stop(self, grace: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            procs = [p for p in [*self.procs, self.router] if p is not None]
            for proc in procs:
                send(proc, signal.SIGTERM)
            wait_all(procs, grace)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
