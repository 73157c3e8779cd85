"""A production node (Quora's "Ultralisk"): the fastrouter, its workers and gunicorn masters on one machine.

The node's top process is a supervisor of ours (parallel_render.supervisor), single-threaded,
and gunicorn's arbiter is one of its children, beside the router and the workers:

    runparallel / supervisor (signals: TERM INT QUIT HUP USR1 TTIN TTOU CHLD)
    ├── fastrouter                  --parent-pid: dies with the supervisor
    ├── parallel_worker x W         prctl(PR_SET_PDEATHSIG) to the supervisor
    └── gunicorn arbiter            python -m gunicorn -c python:parallel_render.gunicorn_conf APP
        └── master x M              post_fork: prctl(PR_SET_PDEATHSIG) to the arbiter

So gunicorn's `waitpid(-1)` only ever sees its masters, gunicorn forks masters from a
process with one thread, and every exit of the router, a worker or the arbiter reaches the
supervisor with its real status. The hooks below run in the arbiter: they pin each master to
its cores and make it die with the arbiter; the supervisor does everything else.

`gunicorn -c python:parallel_render.gunicorn_conf project.wsgi` gives the same tree: its
`on_starting` hook, in an arbiter no supervisor started, turns that process into the
supervisor (exec, same pid), which starts gunicorn again as its child.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any

from parallel_render import conf
from parallel_render.layout import Layout, apply_affinity, plan, unpinned
from parallel_render.supervisor import SUPERVISOR_ENV, Supervisor, log_to_stderr

logger = logging.getLogger("parallel_render")

ENV_PREFIX = "PARALLEL_RENDER_NODE_"
MASTERS_ENV = ENV_PREFIX + "MASTERS"  # gunicorn's -w, for the layout, when gunicorn started the node
PIDFILE_ENV = ENV_PREFIX + "PIDFILE"  # gunicorn's --pid file, which now names the supervisor


@dataclass
class NodeOptions:
    """What the node runs besides gunicorn's own settings. Travels in PARALLEL_RENDER_NODE_* variables."""

    workers: int | None = None  # None: as many as the layout plans
    affinity: bool = True
    router: str | None = None  # where the router listens; None: PARALLEL_RENDER['ROUTER'] or a private socket
    max_jobs: int | None = None  # None: PARALLEL_RENDER['WORKER_MAX_JOBS']
    max_memory_mb: float | None = None  # a worker above this resident size is replaced
    stuck_timeout: float | None = None  # a worker silent this long inside one job is aborted; None: 3 x TIMEOUT, at least 30 s
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


def node_layout(masters: int | None = None, options: NodeOptions | None = None) -> Layout:
    options = options or NodeOptions.from_env()
    layout = plan(masters=masters, workers=options.workers)
    if not options.affinity:
        layout = unpinned(layout, "affinity turned off (--no-affinity)")
    return layout


def wsgi_target() -> str:
    """The site's WSGI application as gunicorn names it (module:attribute)."""
    from django.conf import settings

    path = getattr(settings, "WSGI_APPLICATION", None)
    if not path:
        return "django.core.wsgi:get_wsgi_application()"
    module, _, attribute = path.rpartition(".")
    return f"{module}:{attribute}"


def run_node(gunicorn_args: list[str], masters: int | None = None, options: NodeOptions | None = None) -> int:
    """Be the node's supervisor until it stops: router, workers, and `python -m gunicorn ARGS`. Returns the exit code.

    Call from the main thread of a process that starts nothing else (runparallel does).
    """
    from parallel_render.cluster import child_env

    options = options or NodeOptions.from_env()
    log_to_stderr()
    layout = node_layout(masters, options)
    env = child_env()
    env.pop(conf.ENV_ROUTER, None)  # the node's own router, not one this process was pointed at
    supervisor = Supervisor(
        layout.workers, env=env, address=options.router or _configured_router(), max_jobs=options.max_jobs,
        stuck_timeout=options.stuck_timeout, max_memory_mb=options.max_memory_mb, layout=layout, grace=options.grace,
        arbiter=[sys.executable, "-m", "gunicorn", *gunicorn_args], arbiter_env=options.to_env(),
        **metrics_options(),
    )
    _close_db_connections()
    # Handlers first: a SIGTERM during start-up is queued, and drains the node once it runs.
    supervisor.install_signals()
    supervisor.start()
    for line in layout.describe().splitlines():
        logger.info("%s", line)
    router = supervisor.router
    logger.info("supervisor %d: fastrouter at %s (pid %d), workers %s, gunicorn arbiter pid %d; private directory %s",
                os.getpid(), supervisor.address, router.pid if router else 0, supervisor.worker_pids,
                supervisor.arbiter.pid if supervisor.arbiter else 0, supervisor.dir.path if supervisor.dir else "-")
    return supervisor.run()


def metrics_options() -> dict[str, Any]:
    """The node's Prometheus set-up: a multiprocess directory for every process when the site
    counts blocks (parallel_render.metrics in INSTALLED_APPS) or asks for a metrics port, and
    the port's server (PARALLEL_RENDER["METRICS_PORT"])."""
    import importlib.util

    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    port = conf.get_config()["METRICS_PORT"]
    counting = apps.is_installed("parallel_render.metrics")
    if not counting and port is None:
        return {}
    if importlib.util.find_spec("prometheus_client") is None:
        raise ImproperlyConfigured(
            "parallel_render metrics (METRICS_PORT or parallel_render.metrics in INSTALLED_APPS) need "
            "prometheus_client: pip install \"parallel_render[metrics]\""
        )
    bind = None
    if port is not None:
        from parallel_render.metrics.server import parse_bind

        bind = parse_bind(port)
        if not counting:
            logger.warning("METRICS_PORT is set but parallel_render.metrics is not in INSTALLED_APPS: the port "
                           "shows the router's STATS only, no block counts")
    return {"metrics": bind, "metrics_dir": True}


def _configured_router() -> str | None:
    from django.conf import settings

    user = getattr(settings, "PARALLEL_RENDER", None) or {}
    return user.get("ROUTER")


# -- gunicorn hooks (parallel_render.gunicorn_conf): they run in the arbiter --------------------

_layout: Layout | None = None


def on_starting(server: Any) -> None:
    """Arbiter, before its listeners: under our supervisor, die with it; else become the supervisor."""
    global _layout
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        _become_supervisor(server)  # does not return
    from parallel_render.process import die_with_parent

    die_with_parent(int(supervisor))
    _ensure_django(server)
    _layout = node_layout(server.cfg.workers, NodeOptions.from_env())
    from parallel_render import balance, policy

    # Before the first fork: every master maps the same counts of pages and requests in flight.
    slots = max(64, 2 * int(server.cfg.workers))
    policy.pages_in_flight.node = policy.NodePages(slots)
    balance.node_requests = balance.NodeRequests(slots)


def pre_fork(server: Any, worker: Any) -> None:
    """Arbiter, before forking a master: give it a CPU slot; no database connection crosses the fork."""
    _close_db_connections()
    used = {getattr(w, "parallel_render_slot", None) for w in server.WORKERS.values()}
    worker.parallel_render_slot = next(i for i in range(len(used) + 1) if i not in used)


def child_exit(server: Any, worker: Any) -> None:
    """Arbiter, a master has exited: its pages and requests in flight and its live Prometheus
    gauges go with it (its counters stay)."""
    for table in _master_tables():
        table.clear(getattr(worker, "parallel_render_slot", -1))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from parallel_render.metrics import process_exited

        process_exited(worker.pid)


def post_fork(server: Any, worker: Any) -> None:
    """Master, just forked: die with the arbiter, run on its cores."""
    from parallel_render.process import die_with_parent

    die_with_parent(server.pid)
    for table in _master_tables():
        table.claim(getattr(worker, "parallel_render_slot", -1))
    if _layout is not None:
        apply_affinity(os.getpid(), _layout.for_master(getattr(worker, "parallel_render_slot", 0)))


def _master_tables() -> list[Any]:
    """The counts the masters share (policy.MasterSlots), once on_starting has mapped them."""
    from parallel_render import balance, policy

    return [t for t in (policy.pages_in_flight.node, balance.node_requests) if t is not None]


def _become_supervisor(server: Any) -> None:
    """Plain `gunicorn -c python:parallel_render.gunicorn_conf APP`: exec the supervisor in this process.

    It starts gunicorn again, with the same arguments, as its child. gunicorn has not bound
    its listeners yet; its pid file (if any) keeps this pid, now the supervisor's.
    """
    if server.cfg.daemon:
        raise RuntimeError("parallel_render node: gunicorn's --daemon is not supported; run the node in the "
                           "foreground under a process manager (systemd, supervisord, a container)")
    _ensure_django(server)  # sets DJANGO_SETTINGS_MODULE from the WSGI module, for the supervisor
    from parallel_render.cluster import child_env

    env = child_env({MASTERS_ENV: str(server.cfg.workers)})
    if server.pidfile is not None:
        env[PIDFILE_ENV] = server.pidfile.fname
    server.log.info("parallel_render: this process (%d) becomes the node's supervisor; gunicorn starts again as its child",
                    os.getpid())
    os.execve(sys.executable, [sys.executable, "-m", "parallel_render.node", *without_pidfile(sys.argv[1:])], env)


def without_pidfile(args: list[str]) -> list[str]:
    """gunicorn arguments minus -p/--pid: the pid file names the supervisor, not the arbiter."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-p", "--pid"):
            skip = True
        elif not (arg.startswith("--pid=") or (arg.startswith("-p") and not arg.startswith("--") and len(arg) > 2)):
            out.append(arg)
    return out


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


def main(argv: list[str]) -> int:
    """`python -m parallel_render.node GUNICORN_ARGS`: what plain gunicorn execs into (see on_starting)."""
    import django

    django.setup(set_prefix=False)
    raw = os.environ.pop(MASTERS_ENV, "")
    pidfile = os.environ.pop(PIDFILE_ENV, "")
    try:
        return run_node(argv, int(raw) if raw else None)
    finally:
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
