"""A node's gthread masters take new connections where fewer requests are in flight.

gunicorn's masters all wait on one listening socket, and whichever wakes first accepts: on
two masters at 2 to 4 connections, one master often serves two or three requests while the
other serves one or none. A master's threads share one interpreter lock, so those requests
take about twice as long (docs/node.md). Here each master counts the requests its threads are
handling into its slot of a table the arbiter maps before forking (anonymous shared memory,
like policy.NodePages, both policy.MasterSlots), and a master with more in flight than another waits ACCEPT_DELAY
before it accepts: the less busy master, woken by the same connection, takes it meanwhile. If
nobody did, the busier master accepts it then, so a connection waits at most that long.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from parallel_render.policy import MasterSlots

# Long enough for a less busy master's main thread to wake and accept (its threads may hold
# its interpreter lock for up to the switch interval, 5 ms, but a master with fewer requests
# in flight usually has it free), short against a page.
ACCEPT_DELAY = 0.002

NO_MASTER = -1


class NodeRequests(MasterSlots):
    """Requests in flight per master, NO_MASTER in slots where none runs."""

    EMPTY = NO_MASTER

    def __init__(self, slots: int = 64) -> None:
        super().__init__(slots)
        self._lock = threading.Lock()
        self._mine = 0

    def change(self, by: int) -> None:
        with self._lock:
            self._mine += by
            self.publish(self._mine)

    def busier_than_another(self) -> bool:
        """Whether another master has fewer requests in flight than this one."""
        slot = self.slot
        if slot is None:
            return False
        mine = self.counts[slot]
        if mine <= 0:
            return False
        return any(NO_MASTER < count < mine for count in self.counts)


# Set in the arbiter before its first fork (node.on_starting); None where no node runs.
node_requests: NodeRequests | None = None


class BalancedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, counting its requests in flight and leaving a new connection
    to a master with fewer (NodeRequests)."""

    def accept(self, *args: Any) -> Any:
        table = node_requests
        if table is not None and table.busier_than_another():
            time.sleep(ACCEPT_DELAY)
        return super().accept(*args)

    def handle(self, *args: Any) -> Any:
        table = node_requests
        if table is None:
            return super().handle(*args)
        table.change(1)
        try:
            return super().handle(*args)
        finally:
            table.change(-1)
