"""`manage.py parallel_bench KIND ...`: each KIND is a module in parallel_render.bench.

A bench module provides `HELP`, `add_arguments(parser)` and `handle(options, stdout)`; it
prints a table, or one JSON object with --json.
"""

from __future__ import annotations

import importlib
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from parallel_render.bench import BenchError

BENCHES = ("page", "router", "capacity", "ab", "overhead", "load", "cache", "stream")


def _modules() -> dict[str, Any]:
    found = {}
    for name in BENCHES:
        try:
            found[name] = importlib.import_module(f"parallel_render.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"parallel_render.bench.{name}":
                raise
    return found


class Command(BaseCommand):
    help = "Benchmarks that print tables: " + ", ".join(BENCHES) + "."

    def add_arguments(self, parser: Any) -> None:
        sub = parser.add_subparsers(dest="bench", required=True)
        for name, module in _modules().items():
            module.add_arguments(sub.add_parser(name, help=module.HELP))

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            _modules()[options["bench"]].handle(options, self.stdout)
        except (BenchError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
