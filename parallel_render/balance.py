"""A node's gthread masters take new connections where fewer requests are in flight.

gunicorn's masters all wait on one listening socket, and whichever wakes first accepts: on
two masters at 2 to 4 connections, one master often serves two or three requests while the
other serves one or none. A master's threads share one interpreter lock, so those requests
take about twice as long (docs/node.md). Here each master counts the requests its application
is serving into its slot of a table the arbiter maps before forking (anonymous shared memory,
like policy.NodePages, both policy.MasterSlots). A request counts from the moment its
connection goes to the master's threads (on accepting it, or when a kept-alive connection has
a new request) until the application returns a response rendered whole (a streamed one: until
the server closes it, once its last byte is written). So a master that has just accepted a
connection is busy to the next one before a thread has read the request, and a client that
opens its next connection on reading the last byte finds the master that served it free,
though a thread still writes the response and finishes the request (access log,
request_finished, closing the socket). A master with more requests in flight than another
waits before it accepts, up to ACCEPT_WAIT, while the connection is still there and another
master is still less busy: the less busy master, woken by the same connection, takes it
meanwhile. If nobody did, the busier master accepts it then, so a connection waits at most
that long.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from parallel_render.policy import MasterSlots

# How long a busier master leaves a new connection to a less busy one, at most, and how often
# it looks whether that one took it. A less busy master's main thread may be closing the
# connection it has just answered (gunicorn drains the socket until the client closes it) or
# waiting for a CPU. On the development VM, with a fixed wait of 2 ms, it had taken the
# connection by then in 98 cases of 100.
ACCEPT_WAIT = 0.004
ACCEPT_POLL = 0.0005

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


class InFlight:
    """One request counted in a NodeRequests table until release() (a second release does nothing)."""

    __slots__ = ("_table",)

    def __init__(self, table: NodeRequests) -> None:
        self._table: NodeRequests | None = table
        table.change(1)

    @property
    def counted(self) -> bool:
        return self._table is not None

    def release(self) -> None:
        table, self._table = self._table, None
        if table is not None:
            table.change(-1)


# The request a master's thread is serving, released at the latest when its handle() returns.
_serving = threading.local()
# The attribute of a gunicorn connection that holds the count of its request until a thread serves it.
FLIGHT = "parallel_render_flight"


class ClosingResponse:
    """A streamed WSGI response that releases its request's count when the server closes it:
    its last byte is written, before the application's own close (request_finished and the rest)."""

    __slots__ = ("_flight", "_response")

    def __init__(self, response: Iterable[bytes], flight: InFlight) -> None:
        self._response = response
        self._flight = flight

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._response)

    def close(self) -> None:
        self._flight.release()
        close = getattr(self._response, "close", None)
        if close is not None:
            close()


class CountedApplication:
    """The master's WSGI application, counting each request it serves in a NodeRequests table."""

    def __init__(self, application: Callable[..., Any], table: NodeRequests) -> None:
        self.application = application
        self.table = table

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        flight = getattr(_serving, "flight", None)  # counted since its connection was queued
        if flight is None or not flight.counted:
            flight = _serving.flight = InFlight(self.table)
        try:
            response = self.application(environ, start_response)
        except BaseException:
            flight.release()
            raise
        if getattr(response, "streaming", None) is False:
            # Rendered whole (a Django HttpResponse): what is left is writing it. The writing
            # thread may then wait for the interpreter lock behind another of its master's
            # threads (up to the switch interval, 5 ms) while its client already connects
            # again, so the count ends here.
            flight.release()
            return response
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None and isinstance(response, file_wrapper):
            return response  # the server sends it with sendfile(): released when handle() returns
        return ClosingResponse(response, flight)


def _waiting_connections(listener: Any) -> Callable[[], bool] | None:
    """A check of whether a connection still waits on the listening socket (nobody accepted it
    yet), polling it without blocking; None where it cannot be polled (no poll(), not a socket)."""
    try:
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
    except (AttributeError, OSError, ValueError):
        return None
    return lambda: bool(poller.poll(0))


class BalancedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, counting its requests in flight and leaving a new connection
    to a master with fewer (NodeRequests)."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        if node_requests is not None:
            self.wsgi = CountedApplication(self.wsgi, node_requests)

    def accept(self, *args: Any) -> Any:
        # gunicorn 23 and earlier call accept(server, listener), later ones accept(listener).
        table = node_requests
        if table is not None and table.busier_than_another():
            waiting = _waiting_connections(args[-1])
            until = time.monotonic() + ACCEPT_WAIT
            while True:
                time.sleep(ACCEPT_POLL)
                if waiting is not None and not waiting():
                    return None  # a less busy master took it
                if time.monotonic() >= until or not table.busier_than_another():
                    break
        return super().accept(*args)

    def enqueue_req(self, conn: Any) -> None:
        table = node_requests
        if table is not None:
            setattr(conn, FLIGHT, InFlight(table))
        try:
            super().enqueue_req(conn)
        except BaseException:
            _release(conn)
            raise

    def handle(self, conn: Any) -> Any:
        _serving.flight = getattr(conn, FLIGHT, None)
        try:
            return super().handle(conn)
        finally:
            flight, _serving.flight = _serving.flight, None
            if flight is not None:
                flight.release()
            _release(conn)


def _release(conn: Any) -> None:
    flight = getattr(conn, FLIGHT, None)
    if flight is not None:
        setattr(conn, FLIGHT, None)
        flight.release()
