"""One supervisor for the router, the workers and, on a node, gunicorn's arbiter.

`runparallel` runs it as the main loop of a process of its own (the top of the node);
`runserver`, `LocalCluster` and `parallel_render.testing.parallel_workers` run the very same
loop in a thread. Either way:

- **Its own children only.** It waits for each child by pid (`waitpid(pid, WNOHANG)`, never
  `waitpid(-1)`), woken by a pidfd per child (and SIGCHLD in process mode), so nobody else's
  reaping can take its children and it never takes anybody else's. A child killed by a
  signal is reported by the signal's name (`killed by SIGKILL`), an exit by its code.
- **One clock.** Every decision uses `time.monotonic()`. A worker's heartbeat is a file it
  touches while idle and when it takes a job; the supervisor only notices *that* the file
  changed (its mtime is a token, never compared with a clock) and notes the monotonic time
  when it did.
- **Stuck workers** (no heartbeat for `stuck_timeout` while the router is up) get SIGABRT:
  workers run with faulthandler on (PYTHONFAULTHANDLER), so each writes its Python stack to
  stderr before it dies; one that has not exited `ABORT_GRACE` seconds later gets SIGKILL.
- **Restarts with backoff.** Whatever dies is started again; a process that dies before it
  was ready, or within QUICK_DEATH seconds of it, waits 0.1 s, 0.2 s, ... up to 5 s first.
- **Stopping.** The first stop request (SIGTERM or SIGINT in process mode) drains: the router
  stops taking jobs (it answers queued ones so their masters render them) and lets jobs in
  flight finish, workers finish their job and exit, gunicorn's masters finish their requests;
  whatever outlives its grace period gets SIGKILL. A second request (or SIGQUIT) is a fast
  stop. The private directory (router socket, heartbeats) is removed on the way out, and a
  supervisor that could not remove it (SIGKILL) leaves it to the next one: each directory
  holds a lock only its live owner holds (see PrivateDir).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from parallel_render.process import Exit, pidfd, reap, send, signal_name

logger = logging.getLogger("parallel_render")

# A process that dies before it was ready, or this soon after, is failing rather than
# finishing its work: it is started again after a delay that doubles up to BACKOFF_MAX.
QUICK_DEATH = 1.0
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
ABORT_GRACE = 5.0  # after SIGABRT (stack written), SIGKILL
START_TIMEOUT = 60.0  # a worker that never connects to a running router this long is stuck too
READY_WAIT = 20.0  # longest a rolling restart waits for a new worker before retiring the old one
FAST_GRACE = 3.0  # a fast stop kills whatever is left after this
ROUTER_GRACE = 10.0  # the router drains jobs in flight for up to 5 s (its --drain-ms)
ARBITER_GRACE = 60.0  # gunicorn gives masters graceful_timeout (30 s) itself
CHECK_EVERY = 0.25  # heartbeats
MEMORY_EVERY = 1.0
# gunicorn's own "halt" exit codes: restarting would fail the same way.
HALT_CODES = {3: "a master failed to boot", 4: "the WSGI application failed to load"}
# prometheus_client's multiprocess directory, set for every child when metrics are on.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set in the arbiter's environment: the pid of the supervisor it must die with.
SUPERVISOR_ENV = "PARALLEL_RENDER_NODE_SUPERVISOR"

# Signals the supervisor handles when it is a process of its own.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
FORWARDED = (signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)  # to gunicorn: reopen logs, masters +1/-1


class PrivateDir:
    """A 0700 directory of ours (router socket, heartbeats), with a lock held while we live.

    The lock (flock on LOCK, taken before the file gets its name) is released by the kernel
    however we die, so `remove_leftovers()`, run by every supervisor as it starts, removes
    exactly the directories whose owner is gone, and never a live one.
    """

    PREFIX = "parallel_render-"
    LOCK = ".supervisor.lock"

    def __init__(self) -> None:
        remove_leftovers()
        self.path = tempfile.mkdtemp(prefix=self.PREFIX)
        pending = os.path.join(self.path, ".lock-pending")
        self._fd: int | None = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        os.rename(pending, os.path.join(self.path, self.LOCK))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_leftovers(directory: str | None = None) -> list[str]:
    """Remove private directories that supervisors which have died left behind; return them."""
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PrivateDir.PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.geteuid():
                continue
            fd = os.open(os.path.join(entry.path, PrivateDir.LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not a supervisor's directory (or not one it finished making)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # its supervisor is alive
                raise
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
            logger.info("removed %s, left behind by supervisor %s, which is gone", entry.path, owner)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class Child:
    """One process we started, and what we know and asked of it."""

    def __init__(self, kind: str, proc: subprocess.Popen, now: float, slot: int = 0, heartbeat: str | None = None) -> None:
        self.kind = kind  # "router", "worker", "arbiter" or "metrics"
        self.proc = proc
        self.slot = slot
        self.heartbeat = heartbeat
        self.started = now
        self.ready_at: float | None = None if kind == "worker" else now
        self.mtime = 0  # the heartbeat file's mtime as last seen: a token, not a time
        self.quiet_since = now  # monotonic time we last saw the heartbeat change
        self.stop_sent = False  # we asked it to stop: its exit is planned
        self.kill_at: float | None = None  # SIGKILL then, if it is still there
        self.killed = False  # we sent SIGKILL
        self.aborted_at: float | None = None  # we sent SIGABRT: stuck
        self.retiring = False  # replace it, then stop it gracefully
        self.retire_by = 0.0
        self.fd = pidfd(proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __str__(self) -> str:
        if self.kind == "worker":
            return f"worker {self.pid} (slot {self.slot})"
        if self.kind == "router":
            return f"fastrouter (pid {self.pid})"
        if self.kind == "metrics":
            return f"metrics server (pid {self.pid})"
        return f"gunicorn arbiter (pid {self.pid})"


class Supervisor:
    """A router, `workers` worker slots and optionally a gunicorn arbiter, kept at target."""

    def __init__(
        self,
        workers: int,
        *,
        env: dict[str, str],
        address: str | None = None,
        max_jobs: int | None = None,
        worker_args: Sequence[str] = (),
        binary: str | None = None,
        router_args: Sequence[str] = (),
        stuck_timeout: float | None = None,
        max_memory_mb: float | None = None,
        layout: Any = None,
        grace: float = 10.0,
        arbiter: Sequence[str] | None = None,
        arbiter_env: dict[str, str] | None = None,
        metrics: tuple[str, int] | None = None,
        metrics_dir: bool = False,
    ) -> None:
        from parallel_render import conf

        config = conf.get_config()
        self.workers = workers
        self.requested_address = address
        self.address = address or ""
        self.max_jobs = max_jobs
        self.worker_args = list(worker_args)
        self.binary = binary
        self.router_args = list(router_args)
        self.stuck_timeout = stuck_timeout or max(30.0, 3 * float(config["TIMEOUT"]))
        self.start_timeout = max(START_TIMEOUT, self.stuck_timeout)
        self.max_memory_mb = max_memory_mb
        self.layout = layout
        self.grace = grace
        self.env = dict(env)
        self.arbiter_command = list(arbiter) if arbiter else None
        self.arbiter_env = dict(arbiter_env or {})
        # Prometheus (parallel_render.metrics): where a metrics server listens, and whether the
        # children share one multiprocess directory (in the private directory) to count in.
        self.metrics_bind = metrics
        self.metrics_dir: str | None = None
        self._want_metrics_dir = metrics_dir or metrics is not None
        self.dir: PrivateDir | None = None
        self.children: list[Child] = []
        self.restarts = {"router": 0, "worker": 0, "arbiter": 0, "metrics": 0, "stuck": 0, "memory": 0}
        self.delay: dict[object, float] = {}  # current restart delay, per router / slot / arbiter
        self.exit_code = 0
        self.stopping = False
        self.fast = False
        self._due: dict[object, float] = {}  # restart not before
        self._told: set[object] = set()
        self._roll: list[int] = []
        self._spawned = 0
        self._next_check = 0.0
        self._next_memory = 0.0
        self._requests: collections.deque[Any] = collections.deque()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._signals_installed: dict[int, Any] = {}

    # -- what others may look at ----------------------------------------------------------

    def _of(self, kind: str) -> list[Child]:
        return [c for c in self.children if c.kind == kind]

    @property
    def router(self) -> subprocess.Popen | None:
        routers = self._of("router")
        return routers[0].proc if routers else None

    @property
    def arbiter(self) -> subprocess.Popen | None:
        arbiters = self._of("arbiter")
        return arbiters[0].proc if arbiters else None

    @property
    def worker_pids(self) -> list[int]:
        return [c.pid for c in self._of("worker")]

    def ready_count(self) -> int:
        return sum(1 for c in self._of("worker") if c.ready_at is not None and not c.stop_sent)

    @property
    def finished(self) -> bool:
        return self.stopping and not self.children

    # -- requests, from any thread or a signal handler -----------------------------------

    def request(self, what: str | int) -> None:
        """Queue "stop", "fast" (stop now) or "reload" (restart the workers one by one), or a signal."""
        self._requests.append(what)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed
                pass

    def install_signals(self) -> None:
        """Process mode: handle the signals here (main thread only). Handlers only queue."""
        self._open_wakeup()

        def on_signal(signum: int, frame: Any) -> None:
            self.request(signum)

        for sig in HANDLED:
            self._signals_installed[sig] = signal.signal(sig, on_signal)

    def _restore_signals(self) -> None:
        for sig, previous in self._signals_installed.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, previous)
        self._signals_installed.clear()

    def _open_wakeup(self) -> None:
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._wake_r, selectors.EVENT_READ)

    # -- start, run, stop -----------------------------------------------------------------

    def start(self) -> Supervisor:
        """Make the private directory, start the router (waiting for it), the workers and the arbiter."""
        self._open_wakeup()
        try:
            self.dir = PrivateDir()
            if not self.requested_address:
                self.requested_address = f"unix://{self.dir.path}/router.sock"
            self.address = self.requested_address
            if self._want_metrics_dir:
                self.metrics_dir = os.path.join(self.dir.path, "metrics")
                os.mkdir(self.metrics_dir, 0o700)
                self.env[METRICS_DIR_ENV] = self.metrics_dir
            now = time.monotonic()
            self._start_router(now, first=True)
            for slot in range(self.workers):
                self._spawn_worker(slot, now)
            if self.arbiter_command:
                self._spawn_arbiter(now)
            if self.metrics_bind:
                self._spawn_metrics(now)
        except BaseException:
            self._cleanup()
            raise
        return self

    def run(self) -> int:
        """Supervise until stopped and every child is gone; return the exit code."""
        try:
            while not self.finished:
                self._wait()
                self.step()
        finally:
            self._cleanup()
        return self.exit_code

    def step(self) -> None:
        now = time.monotonic()
        while self._requests:
            self._handle(self._requests.popleft(), now)
        self._reap(now)
        if not self.stopping:
            if now >= self._next_check:
                self._next_check = now + CHECK_EVERY
                self._check_workers(now)
            self._advance_roll()
            self._keep_router(now)
            self._fill(now)
            self._keep_arbiter(now)
            self._keep_metrics(now)
            self._retire(now)
        self._escalate(time.monotonic())

    def _wait(self) -> None:
        now = time.monotonic()
        deadlines = [self._next_check, *self._due.values()]
        deadlines += [c.kill_at for c in self.children if c.kill_at is not None]
        deadlines += [c.retire_by for c in self.children if c.retiring and not c.stop_sent]
        timeout = min(CHECK_EVERY, max(0.0, min(deadlines) - now))
        if self._selector is None:
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wake_r:
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 512):
                        pass
            # A pidfd: the child has exited; _reap takes it.

    def _cleanup(self) -> None:
        """Whatever happened: no child left behind, the private directory removed."""
        for c in list(self.children):
            if reap(c.proc) is None:
                send(c.proc, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    c.proc.wait(5)
            self._forget(c)
        if self.dir is not None:
            self.dir.remove()
        self._restore_signals()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        # Forget the pipe before closing it: request() from another thread must not write to
        # a descriptor number that something else may reuse.
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- requests and signals ---------------------------------------------------------------

    def _handle(self, what: str | int, now: float) -> None:
        if what in ("stop", signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                self._stop_fast(now, "a second stop request" if isinstance(what, str) else f"a second {signal_name(what)}")
            else:
                self._stop_gracefully(now, "asked to stop" if isinstance(what, str) else signal_name(what))
        elif what in ("fast", signal.SIGQUIT):
            self._stop_fast(now, "asked to stop at once" if isinstance(what, str) else signal_name(what))
        elif what in ("reload", signal.SIGHUP):
            if self.stopping:
                return
            self._roll = sorted({c.slot for c in self._of("worker") if not c.retiring} | set(self._roll))
            logger.info("restarting %d workers one by one", len(self._roll))
            for c in self._of("arbiter"):
                send(c.proc, signal.SIGHUP)  # gunicorn: new masters, the old ones finish their requests
        elif what in FORWARDED:
            for c in self._of("arbiter"):
                send(c.proc, int(what))

    def _stop_gracefully(self, now: float, why: str) -> None:
        self.stopping = True
        logger.info("stopping (%s): the router stops taking jobs and finishes those in flight, workers finish "
                    "their job, masters their requests; a second SIGTERM or SIGINT stops at once", why)
        order = {"router": 0, "worker": 1, "arbiter": 2, "metrics": 3}
        grace = {"router": ROUTER_GRACE, "worker": self.grace, "arbiter": ARBITER_GRACE, "metrics": FAST_GRACE}
        for c in sorted(self.children, key=lambda c: order[c.kind]):
            if not c.stop_sent:
                c.stop_sent = True
                send(c.proc, signal.SIGTERM)
            c.kill_at = min(c.kill_at or float("inf"), now + grace[c.kind])

    def _stop_fast(self, now: float, why: str) -> None:
        self.stopping = self.fast = True
        workers = [c for c in self.children if c.kind == "worker"]
        logger.warning("stopping at once (%s): SIGKILL to %d workers, SIGQUIT to gunicorn, SIGTERM to the router",
                       why, len(workers))
        for c in self.children:
            c.stop_sent = True
            if c.kind == "worker":
                c.killed = True
                send(c.proc, signal.SIGKILL)
            else:
                send(c.proc, signal.SIGQUIT if c.kind == "arbiter" else signal.SIGTERM)
                c.kill_at = min(c.kill_at or float("inf"), now + FAST_GRACE)

    # -- exits --------------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        for c in list(self.children):
            ended = reap(c.proc)
            if ended is None:
                continue
            if c.kind == "worker" and c.ready_at is None and c.heartbeat:
                # It may have connected, done its last job and exited between two checks of
                # the heartbeats: its file says whether it ever beat (before _forget removes it).
                with contextlib.suppress(OSError):
                    if os.stat(c.heartbeat).st_mtime_ns != c.mtime:
                        c.ready_at = now
            self._forget(c)
            self._exited(c, ended, now)

    def _forget(self, c: Child) -> None:
        if c in self.children:
            self.children.remove(c)
        if c.fd is not None:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(c.fd)
            os.close(c.fd)
            c.fd = None
        if c.heartbeat:
            with contextlib.suppress(OSError):
                os.unlink(c.heartbeat)
        if c.kind == "worker" and self.metrics_dir:
            # Its counters stay (a scrape adds them up); its live gauges go with it.
            from parallel_render.metrics import process_exited

            process_exited(c.pid, self.metrics_dir)

    def _exited(self, c: Child, ended: Exit, now: float) -> None:
        lived = now - c.started
        if self.stopping:
            if c.killed and not (self.fast and c.kind == "worker"):
                logger.warning("%s %s: it did not stop in time", c, ended)
            elif ended.clean or (c.stop_sent and ended.signal in (signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT)):
                logger.info("%s stopped (%s)", c, ended)
            else:
                logger.warning("%s %s while the node was stopping", c, ended)
            return
        if c.aborted_at is not None:
            logger.warning("%s %s, %.1f s after we sent SIGABRT because it was stuck; starting a new one",
                           c, ended, now - c.aborted_at)
            self._restart_later(("worker", c.slot), 0.0, now)
            return
        if c.kind == "worker" and c.stop_sent:
            logger.info("%s retired (%s)", c, ended)  # its replacement is already there
            return
        if c.kind == "worker" and ended.clean and c.ready_at is not None:
            logger.info("%s exited after its last job (%s); starting a new one", c, ended)
            self._restart_later(("worker", c.slot), 0.0, now)
            return
        if c.kind == "arbiter" and (ended.clean or ended.code in HALT_CODES):
            if ended.clean:
                logger.info("%s exited (%s) without being asked: stopping the node", c, ended)
            else:
                logger.error("%s %s (%s): stopping the node", c, ended, HALT_CODES[ended.code])
                self.exit_code = ended.code or 1
            self._stop_gracefully(now, f"gunicorn arbiter {ended}")
            return
        key = self._key(c)
        quick = c.ready_at is None or now - c.ready_at < QUICK_DEATH
        delay = min(max(self.delay.get(key, 0.0) * 2, BACKOFF_START), BACKOFF_MAX) if quick else 0.0
        when = f"in {delay:.1f} s" if delay else "now"
        before = " before it was ready" if c.ready_at is None else ""
        logger.warning("%s %s after %.1f s%s, unplanned; starting it again %s", c, ended, lived, before, when)
        if delay >= BACKOFF_MAX and key not in self._told:
            self._told.add(key)
            logger.error("%s keeps exiting at once (%s); retrying every %.0f s", _what(key), ended, BACKOFF_MAX)
        elif not quick:
            self._told.discard(key)
        self._restart_later(key, delay, now)

    @staticmethod
    def _key(c: Child) -> object:
        return ("worker", c.slot) if c.kind == "worker" else c.kind

    def _restart_later(self, key: object, delay: float, now: float) -> None:
        self.delay[key] = delay
        self._due[key] = now + delay

    def _is_due(self, key: object, now: float) -> bool:
        due = self._due.get(key)
        return due is None or now >= due

    # -- keeping things at target ---------------------------------------------------------

    def _keep_router(self, now: float) -> None:
        if self._of("router") or not self._is_due("router", now):
            return
        self._start_router(now)

    def _start_router(self, now: float, first: bool = False) -> None:
        from parallel_render.cluster import ClusterError, start_router
        from parallel_render.layout import apply_affinity

        if not first:
            self.restarts["router"] += 1
        try:
            proc, address = start_router(self.address, self.binary, self.router_args)
        except (ClusterError, OSError) as exc:
            if first:
                raise
            key = "router"
            self.delay[key] = delay = min(max(self.delay.get(key, 0.0) * 2, BACKOFF_START), BACKOFF_MAX)
            self._due[key] = time.monotonic() + delay
            logger.error("%s; next try in %.1f s", exc, delay)
            return
        self._due.pop("router", None)
        self.address = address
        router = Child("router", proc, time.monotonic())
        self._add(router)
        if self.layout is not None:
            apply_affinity(proc.pid, self.layout.router_cpus)
        if not first:
            logger.info("%s started at %s", router, address)

    def _spawn_worker(self, slot: int, now: float) -> None:
        from parallel_render.cluster import worker_command
        from parallel_render.layout import apply_affinity
        from parallel_render.worker import HEARTBEAT_ENV, SLOT_ENV

        assert self.dir is not None
        self._spawned += 1
        heartbeat = os.path.join(self.dir.path, f"worker-{slot}-{self._spawned}.beat")
        with open(heartbeat, "wb"):
            pass
        os.utime(heartbeat, ns=(0, 0))  # "not connected yet"
        proc = subprocess.Popen(
            worker_command(self.address, self.max_jobs, self.worker_args),
            # faulthandler: SIGABRT (a stuck worker) writes the worker's Python stack to stderr.
            env={**self.env, HEARTBEAT_ENV: heartbeat, SLOT_ENV: str(slot), "PYTHONFAULTHANDLER": "1"},
            # Its own session: a terminal's Ctrl-C reaches the supervisor, which stops things in order.
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._add(Child("worker", proc, now, slot, heartbeat))
        self._due.pop(("worker", slot), None)
        if self.layout is not None:
            apply_affinity(proc.pid, self.layout.for_worker(slot))

    def _spawn_arbiter(self, now: float) -> None:
        assert self.arbiter_command
        from parallel_render import conf

        env = {**self.env, **self.arbiter_env, conf.ENV_ROUTER: self.address, SUPERVISOR_ENV: str(os.getpid())}
        proc = subprocess.Popen(self.arbiter_command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._due.pop("arbiter", None)
        self._add(Child("arbiter", proc, now))

    def _spawn_metrics(self, now: float) -> None:
        import sys

        from parallel_render import conf

        assert self.metrics_bind
        host, port = self.metrics_bind
        env = {**self.env, conf.ENV_ROUTER: self.address}
        command = [sys.executable, "-m", "parallel_render.metrics.server", host, str(port), str(os.getpid())]
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._due.pop("metrics", None)
        self._add(Child("metrics", proc, now))

    def _keep_metrics(self, now: float) -> None:
        if self.metrics_bind and not self._of("metrics") and self._is_due("metrics", now):
            self.restarts["metrics"] += 1
            self._spawn_metrics(now)
            logger.info("%s started", self._of("metrics")[0])

    def _add(self, c: Child) -> None:
        self.children.append(c)
        if c.fd is not None and self._selector is not None:
            self._selector.register(c.fd, selectors.EVENT_READ)

    def _fill(self, now: float) -> None:
        staffed = {c.slot for c in self._of("worker") if not c.retiring}
        for slot in range(self.workers):
            if slot not in staffed and self._is_due(("worker", slot), now):
                self.restarts["worker"] += 1
                self._spawn_worker(slot, now)

    def _keep_arbiter(self, now: float) -> None:
        if self.arbiter_command and not self._of("arbiter") and self._is_due("arbiter", now):
            self.restarts["arbiter"] += 1
            self._spawn_arbiter(now)
            logger.info("%s started", self._of("arbiter")[0])

    def _check_workers(self, now: float) -> None:
        routers = [c for c in self._of("router") if c.proc.returncode is None]
        router_since = routers[0].ready_at if routers else None
        check_memory = bool(self.max_memory_mb) and now >= self._next_memory
        if check_memory:
            self._next_memory = now + MEMORY_EVERY
        for w in self._of("worker"):
            if w.aborted_at is not None or w.stop_sent:
                continue
            try:
                mtime = os.stat(w.heartbeat).st_mtime_ns if w.heartbeat else 0
            except OSError:
                mtime = w.mtime
            if mtime != w.mtime:
                w.mtime = mtime
                w.quiet_since = now
                if w.ready_at is None:
                    w.ready_at = now
            if router_since is None:
                continue  # no router: workers cannot beat; judge nobody
            if w.ready_at is None:
                waited = now - max(w.started, router_since)
                if waited > self.start_timeout:
                    self._abort(w, now, f"has not connected to the router in {waited:.0f} s")
            else:
                silent = now - max(w.quiet_since, router_since)
                if silent > self.stuck_timeout:
                    self._abort(w, now, f"silent for {silent:.1f} s (stuck timeout {self.stuck_timeout:g} s)")
                elif check_memory and not w.retiring:
                    rss = _rss_mb(w.pid)
                    if rss > (self.max_memory_mb or 0):
                        logger.info("%s uses %.0f MB (limit %.0f MB); replacing it", w, rss, self.max_memory_mb)
                        self.restarts["memory"] += 1
                        self._start_retiring(w)

    def _abort(self, w: Child, now: float, why: str) -> None:
        logger.error("%s %s: sending SIGABRT (its Python stack follows on stderr), SIGKILL in %.0f s if it has not "
                     "exited; then a new one starts", w, why, ABORT_GRACE)
        w.aborted_at = now
        w.kill_at = now + ABORT_GRACE
        self.restarts["stuck"] += 1
        send(w.proc, signal.SIGABRT)

    def _escalate(self, now: float) -> None:
        for c in self.children:
            if c.kill_at is None or now < c.kill_at or c.killed:
                continue
            c.killed = True
            if c.aborted_at is not None and not self.stopping:
                logger.error("%s did not exit %.1f s after SIGABRT: sending SIGKILL", c, now - c.aborted_at)
            else:
                logger.warning("%s did not stop within its grace period: sending SIGKILL", c)
            send(c.proc, signal.SIGKILL)

    # -- rolling restarts and recycling ----------------------------------------------------

    def _advance_roll(self) -> None:
        # One slot at a time: the next starts once the previous slot's old worker was stopped.
        if not self._roll or any(c.retiring and not c.stop_sent for c in self._of("worker")):
            return
        slot = self._roll.pop(0)
        for c in self._of("worker"):
            if c.slot == slot and not c.retiring and not c.stop_sent:
                self._start_retiring(c)

    def _start_retiring(self, c: Child) -> None:
        c.retiring = True
        c.retire_by = time.monotonic() + READY_WAIT

    def _retire(self, now: float) -> None:
        """Stop a retiring worker once its slot's replacement is connected (or too late to wait)."""
        for w in self._of("worker"):
            if not w.retiring or w.stop_sent:
                continue
            replaced = any(n.slot == w.slot and not n.retiring and n.ready_at is not None for n in self._of("worker"))
            if replaced or now > w.retire_by:
                w.stop_sent = True
                w.kill_at = now + self.grace
                send(w.proc, signal.SIGTERM)


def _what(key: object) -> str:
    if isinstance(key, tuple):
        return f"worker slot {key[1]}"
    return {"router": "the fastrouter", "arbiter": "gunicorn's arbiter", "metrics": "the metrics server"}.get(
        str(key), str(key))


def _rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return 0.0


def log_to_stderr() -> None:
    """A process of its own with no logging set up for us: INFO and above to stderr, gunicorn-style."""
    import sys

    if logger.hasHandlers():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] parallel_render: %(message)s",
                                           "%Y-%m-%d %H:%M:%S %z"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
