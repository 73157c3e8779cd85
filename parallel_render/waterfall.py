"""A page's {% parallel %} blocks on one time line, from their block_finished records.

One row per block: its outcome and reason, template:line, the worker that rendered it, and
four segments on a time axis that starts with the page's render session:

- submit: the master reading and encoding what the block reads, until the job goes out;
- queue: the job waiting in the router for a free worker (and the trip to it);
- render: the block's own render, in its worker or in the master;
- stitch: from the render's end until its HTML is in the page (the trip back, the master
  finishing its own part of the page and gathering the other blocks, the one pass that
  replaces the placeholders).

The django-debug-toolbar panel (parallel_render.debug_toolbar) and the demo's first screen
draw it with one template, "parallel_render/waterfall.html":

    with recording(request) as records:
        html = render_to_string("page.html", context, request)
    waterfall_html = render_waterfall(records)

`rows()` returns plain data (str, float, int, lists and dicts) so the toolbar can store it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

from parallel_render.signals import OUTCOMES, BlockRecord, block_finished

SEGMENTS = ("submit", "queue", "render", "stitch")

_uids = itertools.count()


@contextlib.contextmanager
def recording(request: Any) -> Iterator[list[BlockRecord]]:
    """Collect the records of this request's blocks (and only this request's) meanwhile."""
    records: list[BlockRecord] = []
    stop = start_recording(request, records)
    try:
        yield records
    finally:
        stop()


def start_recording(request: Any, records: list[BlockRecord]) -> Any:
    """Append the block_finished records of request's blocks to records; returns the stop function."""

    def receive(sender: Any, record: BlockRecord, **kwargs: Any) -> None:
        if record.request is request:
            records.append(record)

    uid = f"parallel_render.waterfall.{next(_uids)}"
    block_finished.connect(receive, weak=False, dispatch_uid=uid)
    return lambda: block_finished.disconnect(dispatch_uid=uid)


def segments(record: BlockRecord) -> list[tuple[str, float, float]]:
    """(kind, start ms, end ms) of the record's segments; [] where it has no place on the time line."""
    start, render_start, render_ms = record.start_ms, record.render_start_ms, record.render_ms
    if start is None or render_start is None or render_ms is None:
        return []
    out: list[tuple[str, float, float]] = []
    sent = start
    if record.submit_ms is not None:
        sent = start + record.submit_ms
        out.append(("submit", start, sent))
        if render_start > sent:
            out.append(("queue", sent, render_start))
    end = render_start + render_ms
    out.append(("render", render_start, end))
    if record.stitched_ms is not None and record.stitched_ms > end:
        out.append(("stitch", end, record.stitched_ms))
    return out


def _step(span: float) -> float:
    """A round tick step giving about five ticks over span ms."""
    raw = max(span, 1.0) / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def rows(records: Iterable[BlockRecord]) -> dict[str, Any]:
    """The waterfall of these records: {"rows": [...], "end_ms", "ticks": [{"ms", "left"}], "counts"}.

    Rows are in the order the blocks began (blocks with no place on the time line last);
    each segment has its kind, start and length in ms, and its left and width in % of the axis.
    """
    records = list(records)
    spans = [segments(r) for r in records]
    end = max((e for s in spans for _k, _b, e in s), default=0.0)
    step = _step(end)
    axis = max(step * math.ceil(end / step), step)
    order = sorted(range(len(records)), key=lambda i: (records[i].start_ms is None, records[i].start_ms or 0.0))
    out = []
    for i in order:
        r = records[i]
        parts = {kind: round(e - b, 1) for kind, b, e in spans[i]}
        out.append({
            "label": r.label, "outcome": r.outcome, "reason": r.reason, "pid": r.pid, "index": r.index,
            "start_ms": None if r.start_ms is None else round(r.start_ms, 1),
            "submit_ms": parts.get("submit"), "queue_ms": parts.get("queue"),
            "render_ms": None if r.render_ms is None else round(r.render_ms, 1), "stitch_ms": parts.get("stitch"),
            "segments": [{"kind": kind, "start": round(b, 1), "ms": round(e - b, 1),
                          "left": round(100 * b / axis, 2), "width": round(100 * (e - b) / axis, 2)}
                         for kind, b, e in spans[i]],
        })
    ticks = [{"ms": round(k * step, 1) if step < 1 else int(k * step), "left": round(100 * k * step / axis, 2)}
             for k in range(round(axis / step) + 1)]
    counts = {o: sum(1 for r in records if r.outcome == o) for o in OUTCOMES}
    return {"rows": out, "end_ms": round(end, 1), "axis_ms": axis, "ticks": ticks, "counts": counts}


def render_waterfall(records: Iterable[BlockRecord]) -> str:
    """The waterfall as HTML (a SafeString), drawn by "parallel_render/waterfall.html"."""
    from django.template.loader import render_to_string

    return render_to_string("parallel_render/waterfall.html", {"waterfall": rows(records)})
