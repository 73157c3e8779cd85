"""One signal per {% parallel %} block per render: what became of it, and what it cost.

    from django.dispatch import receiver
    from parallel_render.signals import BlockRecord, block_finished

    @receiver(block_finished)
    def log_block(sender, record: BlockRecord, **kwargs):
        print(record.outcome, record.template, record.line, record.render_ms)

`block_finished` is sent once the block's HTML is final, in the process that made it final:
the master for a page's blocks (their request is `record.request`), a worker for the blocks
nested in the one it renders (no request there). `sender` is the block's ParallelNode.

A block's outcome is one of:

- "sent": a worker rendered it and its HTML is in the page;
- "inline": the master rendered it in place and never sent it (`reason` says why: too cheap,
  no idle worker, a value that cannot be sent, no render session for this request, ...);
- "rescued": it was sent (or meant to go in a bundle) and the master rendered it itself
  afterwards: taken back before a worker started it, refused, lost or failed (`reason`);
- "fallback": its `{% fallback %}` part stands in for it (it failed or timed out);
- "cached": its HTML came from the fragment cache (`{% parallel cache=... %}`, docs/cache.md).

Nothing is built or sent while no receiver is connected: senders test `block_finished.receivers`
(a list, so the test is one attribute read) before they make a record.

A page whose view raises after its blocks went out sends nothing for them: they have no
outcome (parallel_render.middleware.abandon cancels them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from django.dispatch import Signal

Outcome = Literal["sent", "inline", "rescued", "fallback", "cached"]
OUTCOMES: tuple[Outcome, ...] = ("sent", "inline", "rescued", "fallback", "cached")

# The reason of a block rendered where no render session is active.
NO_SESSION = "no render session (no middleware, ENABLED off, no router, or a serial request)"

# Receivers get `record` (a BlockRecord); sender is the block's ParallelNode.
block_finished = Signal()


@dataclass(frozen=True)
class BlockRecord:
    """What became of one {% parallel %} block in one render.

    Times are milliseconds. For a block a worker rendered: `render_ms` is the worker's own
    render of it (as the worker reports it), `total_ms` runs from the master's submit to the
    router's answer arriving in the master, and `queue_ms` is the difference: the time in the
    router's queue plus the trip there and back (and, for a block bundled with others, the
    rendering of the blocks before it in its job). For a block the master rendered, `render_ms`
    is the master's render of it (inline, rescued or its fallback), `total_ms` (rescued and
    fallback only) runs from its submit to the end of that render, and `queue_ms` is None.

    Where the block sits on the page's time line (a waterfall), in ms from the render
    session's start (the middleware opening it, just before the view runs); None where
    unknown (no render session: a serial request): `start_ms` when the master began the block
    (its tag's render); `submit_ms` how long the master spent sending it (reading and
    encoding its values, until the job went to the router); `render_start_ms` when its render
    began (in its worker, on the clock the machine's processes share; else in the master);
    `stitched_ms` when its HTML was in the page (the end of the pass that replaced its
    placeholder; None for an inline block, rendered in place). A block's queue wait is
    `render_start_ms - start_ms - submit_ms`.
    """

    outcome: Outcome
    reason: str  # why it is not "sent"; "" when it is
    template: str | None  # the template's name (None: built from a string)
    line: int  # the line of its {% parallel %} tag
    block_id: str  # stable across processes: "template#ordinal:digest"
    index: int | None  # its place among this render session's sent blocks (None: never sent)
    queue_ms: float | None
    render_ms: float | None
    total_ms: float | None
    pid: int | None  # the worker that rendered it ("sent" only)
    nested: int  # blocks nested in it that the worker sent to other workers
    request: Any  # the HttpRequest whose page it belongs to; None in a worker
    start_ms: float | None = None
    submit_ms: float | None = None
    render_start_ms: float | None = None
    stitched_ms: float | None = None
    # The node's worker slot that rendered it ("sent" only; None for a worker the node did not
    # start): unlike the pid, it stays when the slot's worker is replaced.
    worker_slot: int | None = None

    @property
    def label(self) -> str:
        """template:line, as logs and the Server-Timing header name the block."""
        return f"{self.template or '<string>'}:{self.line}"


def send(
    node: Any,
    outcome: Outcome,
    reason: str = "",
    request: Any = None,
    *,
    index: int | None = None,
    queue_ms: float | None = None,
    render_ms: float | None = None,
    total_ms: float | None = None,
    pid: int | None = None,
    nested: int = 0,
    start_ms: float | None = None,
    submit_ms: float | None = None,
    render_start_ms: float | None = None,
    worker_slot: int | None = None,
    later: list[tuple[Any, BlockRecord]] | None = None,
) -> None:
    """Build the block's record and send block_finished. Callers test `block_finished.receivers` first.

    later: keep the record there instead, for send_stitched() once the block is in the page.
    """
    record = BlockRecord(
        outcome, reason, node.template_name, node.line, f"{node.template_name or '<string>'}#{node.ordinal}:{node.digest}",
        index, queue_ms, render_ms, total_ms, pid, nested, request, start_ms, submit_ms, render_start_ms,
        worker_slot=worker_slot,
    )
    if later is not None:
        later.append((node, record))
    else:
        block_finished.send(sender=node, record=record)


def send_stitched(held: list[tuple[Any, BlockRecord]], stitched_ms: float | None) -> None:
    """Send the records send(later=held) kept, now that their blocks are in the page."""
    records, held[:] = list(held), []
    for node, record in records:
        block_finished.send(sender=node, record=replace(record, stitched_ms=stitched_ms))
