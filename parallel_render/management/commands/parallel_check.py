from __future__ import annotations

from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from parallel_render import inspection


class Command(BaseCommand):
    help = "List every {% parallel %} block with 'parallel' or 'inline: reason'."
    help = help.replace("%", "%%")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--url", action="append", default=[],
            help="also render this path in-process and report each block as rendered (repeatable)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        total = inline = 0
        current = None
        for report in inspection.project_blocks():
            if report.template != current:
                current = report.template
                self.stdout.write(self.style.MIGRATE_HEADING(current))
            total += 1
            inline += report.reason is not None
            style = self.style.SUCCESS if report.reason is None else self.style.WARNING
            reads = f"  reads: {', '.join(report.names)}" if report.names and report.reason is None else ""
            self.stdout.write(f"  line {report.line:<5} " + style(report.status) + reads)
            if report.cache_warning is not None:
                self.stdout.write("             " + self.style.WARNING(f"warning: {report.cache_warning}"))
        self.stdout.write(f"{total} blocks, {total - inline} parallel, {inline} inline")
        for path in options["url"]:
            try:
                rows = inspection.url_blocks(path)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(self.style.MIGRATE_HEADING(f"rendering {path}"))
            for (label, status), count in sorted(Counter(rows).items()):
                style = self.style.SUCCESS if status == "parallel" else self.style.WARNING
                self.stdout.write(f"  {label:<40} " + style(status) + (f"  (x{count})" if count > 1 else ""))
