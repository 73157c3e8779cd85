"""A production node (Quora's "Ultralisk"): the fastrouter, its workers and gunicorn masters on one machine.

The gunicorn arbiter is the node's parent process. gunicorn supervises the masters; the
hooks below (used by `gunicorn -c python:parallel_render.gunicorn_conf` and by
`manage.py runparallel`, which runs the same config in-process) start a `NodeSupervisor`
for the router and the workers, pin every process to its core, and stop the workers only
after the masters have drained. gunicorn's signal handlers only queue; its loop calls our
hooks; our own loop, a thread of the arbiter, brings the router and each worker slot back
to target. Every child dies with its parent (prctl), so nothing outlives a SIGKILL.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from parallel_render import conf
from parallel_render.cluster import ClusterError, child_env, private_socket_dir, start_router, worker_command
from parallel_render.layout import Layout, apply_affinity, plan, unpinned
from parallel_render.process import send, wait_all
from parallel_render.worker import HEARTBEAT_ENV

logger = logging.getLogger("parallel_render")

ENV_PREFIX = "PARALLEL_RENDER_NODE_"
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
# A process that dies sooner than this after starting, other than by our hand or by
# recycling itself, is failing: its slot waits (with backoff) before it starts again.
QUICK_DEATH = 5.0
READY_WAIT = 20.0  # longest a rolling restart waits for a new worker before retiring the old one


@dataclass
class NodeOptions:
    """What the node runs besides gunicorn's own settings. Travels in PARALLEL_RENDER_NODE_* variables."""

    workers: int | None = None  # None: as many as the layout plans
    affinity: bool = True
    router: str | None = None  # where the router listens; None: PARALLEL_RENDER['ROUTER'] or a private socket
    max_jobs: int | None = None  # None: PARALLEL_RENDER['WORKER_MAX_JOBS']
    max_memory_mb: float | None = None  # a worker above this resident size is replaced
    stuck_timeout: float | None = None  # a worker silent this long inside one job is killed; None: 3 x TIMEOUT, at least 30 s
    grace: float = 10.0  # seconds workers get to finish their job when the node stops

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> NodeOptions:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                if f.name == "affinity":
                    values[f.name] = raw.lower() not in ("0", "false", "no", "off")
                elif f.name == "router":
                    values[f.name] = raw
                elif f.name in ("workers", "max_jobs"):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError:
                from django.core.exceptions import ImproperlyConfigured

                raise ImproperlyConfigured(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {f.name}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[ENV_PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out


class _Worker:
    """One worker process in a slot. `retiring`: replace it, then stop it gracefully."""

    def __init__(self, proc: subprocess.Popen, slot: int, heartbeat: str) -> None:
        self.proc = proc
        self.slot = slot
        self.heartbeat = heartbeat
        self.started = time.monotonic()
        self.retiring = False
        self.retire_by = 0.0
        self.signalled = False
        self.killed_by_us = False

    def last_beat(self) -> float:
        """Wall-clock time of the last heartbeat, 0 before the worker first connected."""
        try:
            return os.stat(self.heartbeat).st_mtime
        except OSError:
            return 0.0


class NodeSupervisor:
    """The router and `layout.workers` worker slots, kept at target by one loop thread."""

    TICK = 0.1

    def __init__(self, layout: Layout, options: NodeOptions | None = None, env: dict[str, str] | None = None) -> None:
        self.layout = layout
        self.options = options or NodeOptions()
        config = conf.get_config()
        self.max_jobs = self.options.max_jobs or config["WORKER_MAX_JOBS"]
        self.stuck_timeout = self.options.stuck_timeout or max(30.0, 3 * float(config["TIMEOUT"]))
        self._dir = private_socket_dir()
        self.requested_address = self.options.router or _configured_router() or f"unix://{self._dir}/router.sock"
        self.address = self.requested_address
        self.env = child_env(env)
        self.env.pop(conf.ENV_ROUTER, None)
        self.router: subprocess.Popen | None = None
        self._router_started = 0.0
        self._router_retry_at = 0.0
        self._router_backoff = 0.0
        self.workers: list[_Worker] = []
        self._slot_retry_at: dict[int, float] = {}
        self._slot_backoff: dict[int, float] = {}
        self._spawned = 0
        self.restarts = {"router": 0, "worker": 0, "stuck": 0, "memory": 0}
        self._requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._roll: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.draining = False  # the masters are stopping: restart nothing

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> NodeSupervisor:
        self.router, self.address = start_router(self.requested_address)
        self._router_started = time.monotonic()
        apply_affinity(self.router.pid, self.layout.router_cpus)
        for slot in range(self.layout.workers):
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="parallel_render-node", daemon=True)
        self._thread.start()
        return self

    def request(self, what: str) -> None:
        """Queue 'reload' (restart the workers one by one) for the loop; safe from any thread."""
        self._requests.put(what)

    def stop(self) -> None:
        """Stop the workers (each finishes its job), then the router. Call after the masters are gone."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        procs = [w.proc for w in self.workers]
        for proc in procs:
            send(proc, signal.SIGTERM)
        wait_all(procs, self.options.grace)
        if self.router is not None:
            send(self.router, signal.SIGTERM)
            wait_all([self.router], 5.0)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w.proc.poll() is None and w.last_beat() > 0)

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.TICK):
            try:
                self.tick()
            except Exception:  # the loop must outlive any one failure
                logger.exception("node supervisor: tick failed")

    def tick(self) -> None:
        while True:
            try:
                what = self._requests.get_nowait()
            except queue.Empty:
                break
            if what == "reload":
                self._roll = sorted({w.slot for w in self.workers if not w.retiring} | set(self._roll))
                logger.info("node: restarting %d workers one by one", len(self._roll))
        now = time.monotonic()
        self._keep_router(now)
        self._reap(now)
        self._watch(now)
        self._advance_roll()
        self._fill(now)
        self._retire(now)

    def _keep_router(self, now: float) -> None:
        if self.draining or (self.router is not None and self.router.poll() is None):
            return
        if now < self._router_retry_at:
            return
        if self.router is not None:
            lived = now - self._router_started
            logger.warning("node: fastrouter exited with %s after %.1fs; starting it again", self.router.returncode, lived)
            self._router_backoff = 0.0 if lived > QUICK_DEATH else min(max(self._router_backoff * 2, BACKOFF_START), BACKOFF_MAX)
        self.restarts["router"] += 1
        try:
            self.router, _ = start_router(self.address)
        except (ClusterError, OSError) as exc:
            self._router_backoff = min(max(self._router_backoff * 2, BACKOFF_START), BACKOFF_MAX)
            self._router_retry_at = now + self._router_backoff
            self.router = None
            logger.error("node: %s; next try in %.1fs", exc, self._router_backoff)
            return
        self._router_started = time.monotonic()
        self._router_retry_at = now + self._router_backoff
        apply_affinity(self.router.pid, self.layout.router_cpus)

    def _reap(self, now: float) -> None:
        for w in list(self.workers):
            code = w.proc.poll()
            if code is None:
                continue
            self.workers.remove(w)
            _unlink(w.heartbeat)
            if w.retiring:
                continue
            lived = now - w.started
            planned = code == 0 or w.killed_by_us
            if planned or lived > QUICK_DEATH:
                self._slot_backoff[w.slot] = 0.0
            else:
                self._slot_backoff[w.slot] = min(max(self._slot_backoff.get(w.slot, 0.0) * 2, BACKOFF_START), BACKOFF_MAX)
            self._slot_retry_at[w.slot] = now + self._slot_backoff[w.slot]
            if not planned:
                logger.warning("node: worker %d (slot %d) exited with %s after %.1fs; replacing it",
                               w.proc.pid, w.slot, code, lived)
            self.restarts["worker"] += 1

    def _watch(self, now: float) -> None:
        wall = time.time()
        for w in self.workers:
            if w.proc.poll() is not None or w.killed_by_us:
                continue
            beat = w.last_beat()
            if beat > 0 and wall - beat > self.stuck_timeout:
                logger.error("node: worker %d silent for %.0fs (stuck in a job?); killing it", w.proc.pid, wall - beat)
                w.killed_by_us = True
                self.restarts["stuck"] += 1
                send(w.proc, signal.SIGKILL)
            elif self.options.max_memory_mb and not w.retiring:
                rss = _rss_mb(w.proc.pid)
                if rss > self.options.max_memory_mb:
                    logger.info("node: worker %d uses %.0f MB (limit %.0f); replacing it", w.proc.pid, rss, self.options.max_memory_mb)
                    self.restarts["memory"] += 1
                    self._start_retiring(w)

    def _advance_roll(self) -> None:
        # One slot at a time: the next starts once the previous slot's old worker was stopped.
        if not self._roll or any(w.retiring and not w.signalled for w in self.workers):
            return
        slot = self._roll.pop(0)
        for w in self.workers:
            if w.slot == slot and not w.retiring:
                self._start_retiring(w)

    def _start_retiring(self, w: _Worker) -> None:
        w.retiring = True
        w.retire_by = time.monotonic() + READY_WAIT

    def _fill(self, now: float) -> None:
        if self.draining:
            return
        staffed = {w.slot for w in self.workers if not w.retiring}
        for slot in range(self.layout.workers):
            if slot not in staffed and now >= self._slot_retry_at.get(slot, 0.0):
                self._spawn(slot)

    def _retire(self, now: float) -> None:
        """Stop a retiring worker once its slot's replacement is connected (or too late to wait)."""
        for w in self.workers:
            if not w.retiring or w.signalled:
                continue
            replaced = any(n.slot == w.slot and not n.retiring and n.last_beat() > 0 for n in self.workers)
            if replaced or now > w.retire_by:
                w.signalled = True
                send(w.proc, signal.SIGTERM)

    def _spawn(self, slot: int) -> None:
        self._spawned += 1
        heartbeat = os.path.join(self._dir, f"worker-{slot}-{self._spawned}.beat")
        with open(heartbeat, "wb"):
            pass
        os.utime(heartbeat, (0, 0))  # "not connected yet"
        proc = subprocess.Popen(
            worker_command(self.address, self.max_jobs), env={**self.env, HEARTBEAT_ENV: heartbeat},
            # Its own session: a terminal's Ctrl-C reaches the arbiter, which stops the masters
            # first and then the workers, so pages in flight still get their fragments.
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        apply_affinity(proc.pid, self.layout.for_worker(slot))
        self.workers.append(_Worker(proc, slot, heartbeat))


def _configured_router() -> str | None:
    from django.conf import settings

    user = getattr(settings, "PARALLEL_RENDER", None) or {}
    return user.get("ROUTER")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return 0.0


# -- gunicorn hooks (parallel_render.gunicorn_conf and runparallel use these) ----------------

_node: NodeSupervisor | None = None


def node() -> NodeSupervisor | None:
    """The supervisor running in this arbiter, if any."""
    return _node


def node_layout(masters: int | None = None, options: NodeOptions | None = None) -> Layout:
    options = options or NodeOptions.from_env()
    layout = plan(masters=masters, workers=options.workers)
    if not options.affinity:
        layout = unpinned(layout, "affinity turned off (--no-affinity)")
    return layout


def on_starting(server: Any) -> None:
    """Arbiter, before the listeners: start the router and workers; tell future masters where it is."""
    global _node
    _ensure_django(server)
    options = NodeOptions.from_env()
    layout = node_layout(server.cfg.workers, options)
    _close_db_connections()
    _node = NodeSupervisor(layout, options).start()
    os.environ[conf.ENV_ROUTER] = _node.address
    conf.get_config.cache_clear()
    _watch_stop(server, _node)
    for line in layout.describe().splitlines():
        server.log.info("parallel_render: %s", line)
    server.log.info("parallel_render: fastrouter at %s (pid %d), workers %s",
                    _node.address, _node.router.pid if _node.router else 0, _node.worker_pids)


def pre_fork(server: Any, worker: Any) -> None:
    """Arbiter, before forking a master: give it a CPU slot; no database connection crosses the fork."""
    _close_db_connections()
    used = {getattr(w, "parallel_render_slot", None) for w in server.WORKERS.values()}
    worker.parallel_render_slot = next(i for i in range(len(used) + 1) if i not in used)


def post_fork(server: Any, worker: Any) -> None:
    """Master, just forked: die with the arbiter, run on its cores."""
    from parallel_render.process import die_with_parent

    die_with_parent(server.pid)
    if _node is not None:
        apply_affinity(os.getpid(), _node.layout.for_master(getattr(worker, "parallel_render_slot", 0)))


def on_reload(server: Any) -> None:
    """SIGHUP: gunicorn replaces the masters; we restart the workers one by one."""
    if _node is not None:
        _node.request("reload")


def on_exit(server: Any) -> None:
    """Arbiter, after the masters have finished their pages: stop the workers, then the router."""
    global _node
    if _node is not None:
        _node.stop()
        _node = None


def _watch_stop(server: Any, supervisor: NodeSupervisor) -> None:
    """gunicorn has no hook for "stopping": wrap Arbiter.stop so nothing restarts while masters drain."""
    original = server.stop

    def stop(*args: Any, **kwargs: Any) -> None:
        supervisor.draining = True
        original(*args, **kwargs)

    server.stop = stop


def _ensure_django(server: Any) -> None:
    """Workers run `python -m django`, so they need DJANGO_SETTINGS_MODULE; a WSGI module sets it."""
    if "DJANGO_SETTINGS_MODULE" not in os.environ:
        import importlib

        uri = getattr(getattr(server, "app", None), "app_uri", None)
        if uri:
            importlib.import_module(uri.split(":")[0])
    if "DJANGO_SETTINGS_MODULE" not in os.environ:
        raise RuntimeError("parallel_render node: set DJANGO_SETTINGS_MODULE (the workers are Django processes)")
    import django

    django.setup(set_prefix=False)


def _close_db_connections() -> None:
    from django.db import connections

    connections.close_all()


def gunicorn_application(overrides: dict[str, Any] | None = None) -> Any:
    """gunicorn running parallel_render.gunicorn_conf (plus `overrides`) with this project's WSGI app."""
    from gunicorn.app.base import BaseApplication

    class NodeApplication(BaseApplication):
        def load_config(self) -> None:
            import importlib

            module = importlib.import_module("parallel_render.gunicorn_conf")
            values = {k: v for k, v in vars(module).items() if k in self.cfg.settings}
            values.update(overrides or {})
            for key, value in values.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from django.core.servers.basehttp import get_internal_wsgi_application

            return get_internal_wsgi_application()

    return NodeApplication()
