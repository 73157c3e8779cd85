from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from parallel_render import conf
from parallel_render.worker import Worker


class Command(BaseCommand):
    help = "Run one parallel_render worker: take fragments from the fastrouter and render them."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--router", help="router address (default: PARALLEL_RENDER['ROUTER'])")
        parser.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
        parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
        parser.add_argument(
            "--heartbeat", metavar="PATH", default=None,
            help="touch this file while alive, so a supervisor can tell a stuck worker",
        )
        parser.add_argument(
            "--db-name", action="append", default=[], metavar="ALIAS=NAME",
            help="use database NAME for ALIAS (test runs point workers at the test database)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        address = options["router"] or conf.get_config()["ROUTER"]
        if not address:
            raise CommandError("No router address: pass --router or set PARALLEL_RENDER['ROUTER'].")
        for item in options["db_name"]:
            alias, sep, name = item.partition("=")
            if not sep or alias not in connections:
                raise CommandError(f"--db-name {item!r}: expected ALIAS=NAME with an alias from DATABASES")
            connections[alias].close()
            connections[alias].settings_dict["NAME"] = name
        max_jobs = options["max_jobs"] or conf.get_config()["WORKER_MAX_JOBS"]
        Worker(address, max_jobs=max_jobs, parent_pid=options["parent_pid"], heartbeat=options["heartbeat"]).run()
