"""`manage.py runparallel`: a production node (router, workers, gunicorn masters, CPU layout).

This process becomes the node's supervisor (parallel_render.node.run_node): it starts the
router, the workers and gunicorn (with parallel_render.gunicorn_conf) as its children and
watches them until SIGTERM or SIGINT drains the node (twice: at once).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from parallel_render import conf
from parallel_render.cluster import ClusterError
from parallel_render.node import NodeOptions, node_layout, run_node, wsgi_target

# What a node needs beyond the core package: the `node` extra.
NODE_PACKAGES = ("gunicorn", "psutil")


def missing_node_packages() -> list[str]:
    return [name for name in NODE_PACKAGES if importlib.util.find_spec(name) is None]


class Command(BaseCommand):
    help = "Run a production node: gunicorn masters, a fastrouter and workers, pinned to cores."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default=None, help="address masters listen on (default 127.0.0.1:8000)")
        parser.add_argument("--masters", type=int, default=None, help="gunicorn worker processes (default: from the CPU layout)")
        parser.add_argument("--workers", type=int, default=None, help="render workers (default: from the CPU layout)")
        parser.add_argument("--worker-class", default=None, choices=["sync", "gthread"], help="gunicorn worker class (default gthread)")
        parser.add_argument("--threads", type=int, default=None, help="threads per gthread master (default 4)")
        parser.add_argument("--no-affinity", action="store_true", help="do not pin processes to cores")
        parser.add_argument("--layout", action="store_true", help="print the CPU layout and exit")
        parser.add_argument("--max-jobs", type=int, default=None, help="recycle a worker after this many jobs")
        parser.add_argument("--max-memory", type=float, default=None, metavar="MB", help="recycle a worker above this resident size")
        parser.add_argument("--stuck-timeout", type=float, default=None, metavar="S",
                            help="abort (SIGABRT, its stack to stderr, then SIGKILL) a worker silent this long in one job "
                                 "(default 3 x TIMEOUT, at least 30)")
        parser.add_argument("--router", default=None, help="address the router listens on (default: a private Unix socket)")

    def handle(self, *args: Any, **options: Any) -> None:
        for name in ("masters", "workers", "threads", "max_jobs"):
            if options[name] is not None and options[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        node_options = NodeOptions(
            workers=options["workers"], affinity=not options["no_affinity"], router=options["router"],
            max_jobs=options["max_jobs"], max_memory_mb=options["max_memory"], stuck_timeout=options["stuck_timeout"],
        )
        if options["layout"]:
            self.stdout.write(node_layout(options["masters"], node_options).describe())
            return
        missing = missing_node_packages()
        if missing:
            raise CommandError(
                f"runparallel needs {' and '.join(missing)}, not installed here: "
                'pip install "parallel_render[node]" installs them.'
            )
        problem = conf.fastrouter_problem()
        if problem is not None:
            raise CommandError(f"runparallel needs the fastrouter, and {problem}.")
        args = ["-c", "python:parallel_render.gunicorn_conf"]
        worker_class = options["worker_class"]
        if worker_class == "gthread":  # the node's own gthread masters (parallel_render.balance)
            worker_class = "parallel_render.balance.BalancedThreadWorker"
        for flag, value in (("--bind", options["bind"]), ("--workers", options["masters"]),
                            ("--worker-class", worker_class), ("--threads", options["threads"])):
            if value is not None:
                args += [flag, str(value)]
        try:
            code = run_node([*args, wsgi_target()], options["masters"], node_options)
        except ClusterError as exc:
            raise CommandError(str(exc)) from None
        if code:
            raise SystemExit(code)
