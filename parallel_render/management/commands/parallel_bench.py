from __future__ import annotations

import os
from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandError

from parallel_render import conf


class Command(BaseCommand):
    help = "Benchmarks. `page URL`: the same page serially and in parallel, side by side."

    def add_arguments(self, parser: Any) -> None:
        sub = parser.add_subparsers(dest="bench", required=True)
        page = sub.add_parser("page", help="render a page serially and in parallel and compare")
        page.add_argument("url", help="an http:// URL of a running server, or a path rendered in-process")
        page.add_argument("--requests", type=int, default=50)
        page.add_argument("--workers", type=int, default=None, help="workers for an in-process run")
        page.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["bench"] == "page":
            self.page(options)

    def page(self, options: dict[str, Any]) -> None:
        from parallel_render.bench import page

        if options["requests"] < 1:
            raise CommandError("--requests must be at least 1")
        url = options["url"]
        cluster = None
        if not url.startswith(("http://", "https://")) and not conf.get_config()["ROUTER"]:
            from parallel_render.cluster import LocalCluster

            cluster = LocalCluster(options["workers"] or conf.worker_count()).start()
            cluster.wait_ready()
            os.environ[conf.ENV_ROUTER] = cluster.address
            conf.get_config.cache_clear()
        try:
            result = page.run(url, options["requests"])
        finally:
            if cluster is not None:
                cluster.stop()
        if options["json"]:
            self.stdout.write(orjson.dumps(result).decode())
        else:
            self.stdout.write(page.format_result(result))
