"""Where a block renders: sent to a worker only when that can make the page sooner.

A block sent to a router with no idle worker only waits in its queue while the master, which
could render it, goes on and then waits for it: under load that makes pages slower than
plain Django. So a master asks the router's status page (shared memory, no syscall) before
each block, and when it reaches the point of waiting it takes back, newest first, every one
of its blocks that no worker has started (middleware.gather). The reasoning and the
measurements behind the numbers are in docs/dispatch.md.
"""

from __future__ import annotations

from parallel_render.client import RouterLoad

# Blocks cheaper than this (by their measured cost) travel together, several to a job (a
# bundle), rather than a job each; a bundle goes out once it holds this much work.
BATCH_MS = 1.0


def should_send(load: RouterLoad | None, cost_ms: float | None, nested: bool = False) -> bool:
    """Whether a block of this expected cost should go to the router now, given its load.

    Without a status page (a TCP router) every block is sent: the take-back at the end of
    the page keeps a queued block from costing more than the master rendering it itself.
    """
    if load is None:
        return True
    if load.stopping or load.workers == 0:
        return False
    ahead = load.queued - load.idle  # jobs that no idle worker will take before this one
    if ahead < 0:
        return True  # a worker is idle now
    if nested or cost_ms is None:
        # A nested block may not queue at all; an unmeasured one renders here, which measures it.
        return False
    # Workers free up one every service_us / workers on average; this block starts after the
    # ones ahead of it. If that wait is longer than rendering it, the master renders it.
    wait_ms = (ahead + 1) * load.service_us / load.workers / 1000.0
    return wait_ms < cost_ms
