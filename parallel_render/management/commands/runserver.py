"""runserver that also starts a fastrouter and PARALLEL_RENDER['WORKERS'] workers.

It subclasses whichever runserver comes after parallel_render in INSTALLED_APPS (usually
staticfiles'), so both keep working. The router and workers are kept by the same
supervisor as a production node's (parallel_render.supervisor, via LocalCluster), in a thread
of the serving process: restarts with backoff, stuck workers aborted with their stack in the
output, exits reported by signal name. Under the autoreloader they belong to the serving
child: a reload ends that child and its cluster (drained at exit), and the new child starts a
fresh one. Every process we start dies with its parent, even after SIGKILL.
"""

from __future__ import annotations

import atexit
import importlib
import os
from typing import Any

from django.apps import apps

from parallel_render import conf
from parallel_render.process import die_with_parent


def next_runserver() -> type:
    seen_self = False
    for app in apps.get_app_configs():
        if app.name == "parallel_render":
            seen_self = True
            continue
        if not seen_self:
            continue
        try:
            module = importlib.import_module(f"{app.name}.management.commands.runserver")
        except ImportError:
            continue
        return module.Command
    from django.core.management.commands.runserver import Command

    return Command


class Command(next_runserver()):  # type: ignore[misc]
    help = "Start a development server, a fastrouter and parallel_render workers."

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--noparallel", action="store_false", dest="use_parallel",
            help="Do not start the fastrouter and workers; every {%% parallel %%} block renders inline.",
        )

    def inner_run(self, *args: Any, **options: Any) -> None:
        if os.environ.get("RUN_MAIN") == "true":
            # Django's reloader does not take its serving child down when it is killed itself.
            die_with_parent(os.getppid())
        if options.get("use_parallel", True):
            self.start_cluster()
        super().inner_run(*args, **options)

    def start_cluster(self) -> None:
        from parallel_render.cluster import LocalCluster

        config = conf.get_config()
        workers = conf.worker_count()
        if not config["ENABLED"] or workers == 0:
            self.stdout.write("parallel_render: disabled; {% parallel %} blocks render inline.")
            return
        if config["ROUTER"] and not os.environ.get("PARALLEL_RENDER_RUNSERVER"):
            self.stdout.write(f"parallel_render: using the router at {config['ROUTER']}; starting no workers.")
            return
        problem = conf.fastrouter_problem()
        if problem is not None:
            self.stdout.write(f"parallel_render: {{% parallel %}} blocks render inline: {problem} (parallel_render.W005).")
            return
        cluster = LocalCluster(workers).start()
        atexit.register(cluster.stop)
        os.environ[conf.ENV_ROUTER] = cluster.address
        os.environ["PARALLEL_RENDER_RUNSERVER"] = "1"
        conf.get_config.cache_clear()
        self.stdout.write(
            f"parallel_render: fastrouter at {cluster.address} (pid {cluster.router.pid}), "
            f"{workers} workers (pids {', '.join(map(str, cluster.worker_pids))})"
        )
