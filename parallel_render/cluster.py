"""A router and its workers as child processes, kept alive: used by runserver and the tests."""

from __future__ import annotations

import logging
import os
import secrets
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from parallel_render import conf

logger = logging.getLogger("parallel_render")


class ClusterError(RuntimeError):
    pass


def private_socket_dir() -> str:
    """A fresh directory only this user can enter (mkdtemp makes it 0700)."""
    return tempfile.mkdtemp(prefix="parallel_render-")


def start_router(
    address: str, binary: str | None = None, args: Sequence[str] = (), timeout: float = 10.0, key_dir: str | None = None
) -> tuple[subprocess.Popen, str]:
    """Start a fastrouter and wait for its READY line; return the process and its real address.

    The router gets this site's router-auth key (keys.py) in a 0600 file, `--auth-key-file`,
    written to key_dir (a private directory of this user; by default the socket's own
    directory when it is private, else keys.private_key_dir()) and removed once the router
    has read it at start-up; unless args already say --auth-key-file or --no-auth.
    """
    from parallel_render import keys
    from parallel_render.client import warn_if_exposed
    from parallel_render.protocol import parse_address

    binary = binary or conf.fastrouter_binary()
    cmd = [binary, "--listen", address, "--parent-pid", str(os.getpid()), *args]
    key_file = None
    if "--auth-key-file" not in args and "--no-auth" not in args:
        # A name of its own: routers started at once for the same address text (tcp://...:0)
        # must not read, or remove, each other's file.
        name = f"router-{os.getpid()}-{secrets.token_hex(4)}.key"
        key_file = keys.write_router_key_file(key_dir or router_key_dir(address), name)
        cmd += ["--auth-key-file", key_file]
    try:
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
    finally:
        if key_file is not None:
            _unlink(key_file)  # read once, at start-up
    if not line.startswith(b"READY "):
        proc.kill()
        proc.wait()
        raise ClusterError(f"fastrouter ({' '.join(cmd)}) did not start: {line.decode(errors='replace')!r}, exit code {proc.returncode}")
    proc.stdout.close()
    real = line.split(None, 1)[1].decode().strip()
    warn_if_exposed(parse_address(real))  # the router says so too; this is the plugin's own log
    return proc, real


def router_key_dir(address: str) -> str:
    """Where the router's key file goes: next to a Unix socket when its directory is private
    to this user (the router insists on that anyway), else this user's private key directory."""
    import stat

    if address.startswith("unix://"):
        directory = os.path.dirname(address[len("unix://"):])
        try:
            info = os.lstat(directory)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            return directory
    from parallel_render import keys

    return keys.private_key_dir()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
    """A router and `workers` worker processes, supervised by parallel_render.supervisor in a thread.

    The same supervision as a node's (runparallel), minus gunicorn: dead processes are
    started again with backoff, a stuck worker gets SIGABRT (its stack on stderr) then
    SIGKILL, and stop() drains. The thread starts every child itself, so each dies with it
    (PR_SET_PDEATHSIG follows the starting thread) as well as with this process.
    """

    def __init__(
        self,
        workers: int,
        address: str | None = None,
        max_jobs: int | None = None,
        env: dict[str, str] | None = None,
        router_args: Sequence[str] = (),
        binary: str | None = None,
        worker_args: Sequence[str] = (),
        stuck_timeout: float | None = None,
    ) -> None:
        from parallel_render.supervisor import Supervisor

        self.workers = workers
        self.supervisor = Supervisor(
            workers, env=child_env(env), address=address, max_jobs=max_jobs, worker_args=worker_args,
            binary=binary, router_args=router_args, stuck_timeout=stuck_timeout,
        )
        self._thread: threading.Thread | None = None

    def start(self) -> LocalCluster:
        started = threading.Event()
        failed: list[BaseException] = []

        def supervise() -> None:
            try:
                self.supervisor.start()
            except BaseException as exc:
                failed.append(exc)
                return
            finally:
                started.set()
            try:
                self.supervisor.run()
            except Exception:
                logger.exception("the supervisor of the router at %s failed; its processes were stopped", self.address)

        self._thread = threading.Thread(target=supervise, name="parallel_render-supervisor", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]
        return self

    @property
    def address(self) -> str:
        return self.supervisor.address

    @property
    def router(self) -> subprocess.Popen | None:
        return self.supervisor.router

    @property
    def worker_pids(self) -> list[int]:
        return self.supervisor.worker_pids

    @property
    def restarts(self) -> int:
        """Processes started again since start() (router and workers)."""
        return self.supervisor.restarts["router"] + self.supervisor.restarts["worker"]

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
        """Drain (workers finish their job, for up to grace seconds) and wait until every process is gone."""
        if self._thread is None:
            return
        self.supervisor.grace = grace
        self.supervisor.request("stop")
        self._thread.join(grace + 20)
        if self._thread.is_alive():
            logger.error("the supervisor of the router at %s did not stop in %.0f s", self.address, grace + 20)
        self._thread = None
        # This process's masters kept a connection to the router (client.get_client): it is gone.
        from parallel_render.client import close_client

        close_client(self.address)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
