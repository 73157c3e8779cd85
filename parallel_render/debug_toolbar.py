"""A django-debug-toolbar panel: what became of each {% parallel %} block of the page.

    pip install "parallel_render[toolbar]"

    DEBUG_TOOLBAR_PANELS = [
        *debug_toolbar.settings.PANELS_DEFAULTS,
        "parallel_render.debug_toolbar.ParallelRenderPanel",
    ]

Per block: its outcome (sent, inline, rescued, fallback) and why, template:line, the worker
that rendered it, and the waterfall of its submit, queue wait, render and stitch on the
page's time line (parallel_render.waterfall). Built on the block_finished signal: while the
toolbar shows a request, the panel listens for that request's blocks only.
"""

from __future__ import annotations

from typing import Any

try:
    from debug_toolbar.panels import Panel
except ImportError as exc:  # the [toolbar] extra is optional; the core never imports this module
    raise ImportError(
        "parallel_render.debug_toolbar needs django-debug-toolbar: "
        'pip install "parallel_render[toolbar]" (or pip install django-debug-toolbar)'
    ) from exc

from parallel_render import waterfall
from parallel_render.signals import BlockRecord


class ParallelRenderPanel(Panel):
    """The page's {% parallel %} blocks: outcome, reason, worker and waterfall."""

    title = "Parallel render"
    template = "parallel_render/panel.html"
    # Records reach the receiver from whichever thread stitches the page, under ASGI too.
    is_async = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records: list[BlockRecord] = []
        self._stop: Any = None

    @property
    def nav_subtitle(self) -> str:
        counts = self.get_stats().get("waterfall", {}).get("counts")
        if not counts:
            return ""
        shown = [f"{n} {outcome}" for outcome, n in counts.items() if n]
        return ", ".join(shown) or "no blocks"

    def enable_instrumentation(self) -> None:
        self._stop = waterfall.start_recording(self.toolbar.request, self._records)

    def disable_instrumentation(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def generate_stats(self, request: Any, response: Any) -> None:
        self.record_stats({"waterfall": waterfall.rows(self._records)})
