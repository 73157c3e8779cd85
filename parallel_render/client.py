"""The master's connection to the fastrouter: submit without waiting, collect with one deadline.

One connection per process, shared by its threads. Whoever needs answers and finds nobody
reading becomes the reader for a while and files every answer it reads under its job id, so
threads never steal each other's results.
"""

from __future__ import annotations

import atexit
import hmac
import ipaddress
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import NamedTuple

from parallel_render import keys, sealing, syscalls
from parallel_render import protocol as p

logger = logging.getLogger("parallel_render")


class RouterUnavailable(Exception):
    pass


class Answer(NamedTuple):
    type: int  # RESULT, ERROR, TIMEOUT, BUSY, or WITHDRAWN (taken back: the master renders it)
    payload: bytes
    flags: int = 0
    received: float = 0.0  # time.monotonic() when it arrived

    @property
    def kind(self) -> str:
        return p.TYPE_NAMES.get(self.type, str(self.type)).lower()


class Outstanding(NamedTuple):
    """The jobs a RouterClient still owes its callers, from RouterClient.outstanding().

    Both are 0 whenever no page of this process is being rendered: every page collects (or
    cancels) each block it sent before it is returned. A count that stays above 0 while the
    process is idle means jobs are being left behind.
    """

    awaiting: int
    """Jobs submitted and not answered by the router yet (queued, or being rendered)."""
    uncollected: int
    """Jobs the router has answered whose answer no caller has taken yet (collect())."""

    @property
    def total(self) -> int:
        return self.awaiting + self.uncollected


class HandshakeError(ConnectionError):
    """The router did not prove this site's key, or refused ours (with the router's reason)."""


def connect(address: p.Address, timeout: float = 1.0) -> socket.socket:
    """A plain connection to the router, before the handshake (see open_connection)."""
    if address.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address.path
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (address.host, address.port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:  # OSError, or a signal handler's SystemExit (a worker told to stop)
        sock.close()
        raise
    return sock


def open_connection(address: p.Address, role: int, then: bytes = b"", timeout: float = 1.0) -> socket.socket:
    """A connection to the router that has completed the handshake as `role`, with `then`
    (e.g. READY) sent in the same write as AUTH. The socket keeps `timeout`.

    Raises OSError when the router cannot be reached, HandshakeError (an OSError too) when it
    does not prove this site's key or refuses ours; the socket is closed either way.
    """
    sock = connect(address, timeout)
    try:
        handshake(sock, address, role, then)
    except BaseException:
        sock.close()
        raise
    return sock


def handshake(sock: socket.socket, address: p.Address | str, role: int, then: bytes = b"", key: bytes | None = None) -> None:
    """PROTOCOL.md "Handshake", the peer's side: HELLO role ‖ Np; read CHALLENGE Nr ‖ proof and
    check the router's proof; AUTH with ours, then `then`. Uses the socket's timeout.

    key: the router-auth key (default: derived from this site's SECRET_KEY).
    """
    key = keys.router_auth_key() if key is None else key
    mine = os.urandom(p.NONCE_SIZE)
    try:
        sock.sendall(p.encode_hello(role, mine))
    except OSError as exc:
        # A router that refuses us on sight (peer credentials) has written why, then closed.
        frame = _handshake_frame(sock, address, quiet=True)
        if frame is not None and frame.type == p.PROTOCOL_ERROR:
            raise HandshakeError(f"the router at {address} refused this connection: {_reason(frame)}") from exc
        raise
    frame = _handshake_frame(sock, address)
    assert frame is not None
    if frame.type == p.PROTOCOL_ERROR:
        raise HandshakeError(f"the router at {address} refused the handshake: {_reason(frame)}")
    if frame.type != p.CHALLENGE:
        raise HandshakeError(
            f"the router at {address} answered HELLO with {p.TYPE_NAMES.get(frame.type, frame.type)}, not CHALLENGE"
        )
    try:
        theirs, proof = p.decode_challenge(frame.payload)
    except p.ProtocolError as exc:
        raise HandshakeError(f"the router at {address} sent a bad CHALLENGE: {exc}") from None
    if not hmac.compare_digest(proof, p.router_proof(key, role, mine, theirs)):
        raise HandshakeError(f"the router at {address} does not hold this site's key (different SECRET_KEY?)")
    sock.sendall(p.encode_auth(p.peer_proof(key, role, mine, theirs)) + then)


def _reason(frame: p.Frame) -> str:
    return frame.payload.decode("utf-8", "replace")


# The longest answer a peer reads during the handshake (a CHALLENGE is 64 bytes; this leaves
# room for a PROTOCOL_ERROR's reason), so a stranger cannot make it allocate more.
HANDSHAKE_MAX_READ = 4096


def _handshake_frame(sock: socket.socket, address: p.Address | str, quiet: bool = False) -> p.Frame | None:
    """The router's one answer to HELLO, read exactly (nothing after it is consumed)."""
    try:
        head = _read_exactly(sock, p.HEADER_SIZE)
        magic, version, type_, flags, _reserved, job_id, timeout_ms, length = p.HEADER.unpack(head)
        if magic != p.MAGIC or version != p.VERSION or length > HANDSHAKE_MAX_READ:
            raise HandshakeError(
                f"the router at {address} answered HELLO with something that is not a fastrouter "
                f"protocol version {p.VERSION} frame"
            )
        return p.Frame(type_, flags, job_id, timeout_ms, _read_exactly(sock, length))
    except TimeoutError:
        if quiet:
            return None
        raise HandshakeError(f"the router at {address} did not answer HELLO with CHALLENGE in time") from None
    except OSError:
        if quiet:
            return None
        raise


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise HandshakeError("the router closed the connection during the handshake")
        data += chunk
    return data


_exposure_checked: set[tuple[str, int]] = set()


def warn_if_exposed(address: p.Address) -> None:
    """Once per process and address: log a warning when a tcp:// router's host resolves to an
    address that is not loopback (decided on what it resolves to, not on its name)."""
    if address.scheme != "tcp" or (address.host, address.port) in _exposure_checked:
        return
    _exposure_checked.add((address.host, address.port))
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError:
        return  # connecting will say what is wrong
    exposed = sorted({info[4][0] for info in infos if not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback})
    if exposed:
        logger.warning(
            "the fastrouter address %s resolves to %s, not a loopback address: jobs are sealed end to end; "
            "headers travel in the clear", address, ", ".join(exposed),
        )


class RouterClient:
    """A master's connection. Thread-safe; reconnects with backoff after a failure."""

    BACKOFF_START = 0.05
    BACKOFF_MAX = 2.0

    def __init__(self, address: str, max_payload: int = p.MAX_FRAME) -> None:
        self.address = p.parse_address(address)
        # Jobs through this router are sealed for this binding (docs/security.md).
        self.binding = sealing.node_binding(address)
        warn_if_exposed(self.address)
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sock: socket.socket | None = None
        self._reader = p.FrameReader()
        self._reading = False
        self._next_id = 1
        self._pending: set[int] = set()
        self._answers: dict[int, Answer] = {}
        # WITHDRAW requests waiting for their WITHDRAWN, and the "not taken" answers read for them.
        self._withdrawing: set[int] = set()
        self._not_taken: set[int] = set()
        self._status = StatusPage(self.address)
        self._generation = 0  # bumps on every (re)connect, so a reader can tell its socket died
        self._retry_at = 0.0
        self._backoff = self.BACKOFF_START
        self._last_error = ""

    # -- connection -----------------------------------------------------------------------

    def _ensure_connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        now = time.monotonic()
        if now < self._retry_at:
            raise RouterUnavailable(
                f"fastrouter at {self.address} is unreachable ({self._last_error}); next try in "
                f"{self._retry_at - now:.2f}s"
            )
        try:
            sock = open_connection(self.address, p.ROLE_MASTER)
            sock.settimeout(None)
        except HandshakeError as exc:
            self._last_error = str(exc)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)
            logger.error("%s", exc)
            raise RouterUnavailable(str(exc)) from exc
        except OSError as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)
            logger.warning("fastrouter at %s is unreachable: %s", self.address, self._last_error)
            raise RouterUnavailable(f"fastrouter at {self.address} is unreachable: {self._last_error}") from exc
        self._sock = sock
        self._reader = p.FrameReader()
        self._backoff = self.BACKOFF_START
        self._generation += 1
        return sock

    def _fail_connection(self, reason: str) -> None:
        """Called with the lock held: every unanswered job is answered ERROR, then reconnect later."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        self._last_error = reason
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)
        now = time.monotonic()
        for job_id in self._pending:
            self._answers.setdefault(job_id, Answer(p.ERROR, reason.encode(), 0, now))
        self._cond.notify_all()
        logger.warning("lost the fastrouter connection to %s: %s", self.address, reason)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, payload: bytes, timeout: float, high_priority: bool = False, no_queue: bool = False) -> int:
        """Queue a job and return its id at once; raise RouterUnavailable if it cannot be sent.

        no_queue: the router answers BUSY unless a worker is idle right now (nested blocks
        use it, so they never wait on a queue only their own worker could drain).
        """
        if len(payload) > self.max_payload:
            raise ValueError(f"job of {len(payload)} bytes exceeds MAX_PAYLOAD ({self.max_payload})")
        timeout_ms = max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        flags = (p.FLAG_HIGH_PRIORITY if high_priority else 0) | (p.FLAG_NO_QUEUE if no_queue else 0)
        with self._lock:
            self._ensure_connected()
            job_id = self._next_id
            self._next_id += 1
            self._pending.add(job_id)
            if not self._send_locked(p.header(p.SUBMIT, job_id, len(payload), flags, timeout_ms), payload):
                self._pending.discard(job_id)
                self._answers.pop(job_id, None)
                raise RouterUnavailable(f"fastrouter at {self.address}: {self._last_error}")
            return job_id

    def _send_locked(self, *frames: bytes) -> bool:
        """With the lock held: write frames in one call. False when the connection failed
        (every unanswered job on it has been answered ERROR)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            if len(frames) == 1 or sum(len(frame) for frame in frames) < 16384:
                data = b"".join(frames)
                # Most jobs fit the socket's buffer: sent without letting go of the
                # interpreter lock (syscalls), and only what did not fit the usual way.
                sent = syscalls.send_now(sock, data)
                if sent < len(data):
                    sock.sendall(memoryview(data)[sent:])
            else:
                _sendall_gather(sock, list(frames))
        except OSError as exc:
            self._fail_connection(f"send failed: {exc}")
            return False
        return True

    def cancel(self, job_ids: list[int]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._pending.discard(job_id)
                self._answers.pop(job_id, None)
            if self._sock is None or not job_ids:
                return
            self._send_locked(*(p.encode(p.CANCEL, job_id) for job_id in job_ids))

    def withdraw(self, job_ids: list[int], deadline: float) -> dict[int, bool | None]:
        """Take jobs back from the router if no worker has started them (one write, one wait).

        Per job, True: it was still queued and the router removed it; it is answered and no
        worker will render it, so the caller renders it. False: a worker has it; its answer
        comes to collect() as usual. None: it is answered already (or the connection failed,
        which answers it too). The router answers every WITHDRAW exactly once, so a job is
        never both taken back and rendered by a worker.
        """
        outcome: dict[int, bool | None] = {}
        with self._cond:
            asked = []
            for job_id in job_ids:
                if job_id not in self._pending or job_id in self._answers:
                    outcome[job_id] = None
                else:
                    asked.append(job_id)
            if not asked:
                return outcome
            self._withdrawing.update(asked)
            try:
                if not self._send_locked(*(p.encode(p.WITHDRAW, job_id) for job_id in asked)):
                    return {**outcome, **dict.fromkeys(asked)}
                waiting = set(asked)
                while True:
                    for job_id in list(waiting):
                        answer = self._answers.get(job_id)
                        if answer is not None:
                            if answer.type == p.WITHDRAWN:
                                del self._answers[job_id]
                                self._pending.discard(job_id)
                                outcome[job_id] = True
                            else:
                                outcome[job_id] = None
                        elif job_id in self._not_taken:
                            outcome[job_id] = False
                        else:
                            continue
                        waiting.discard(job_id)
                    remaining = deadline - time.monotonic()
                    if not waiting or remaining <= 0 or self._sock is None:
                        return {**dict.fromkeys(waiting, False), **outcome}
                    if self._reading:
                        self._cond.wait(remaining)
                    else:
                        self._read_some(remaining)
            finally:
                self._withdrawing.difference_update(asked)
                self._not_taken.difference_update(asked)

    def outstanding(self) -> Outstanding:
        """How many jobs sent through this client are still to be answered or collected.

        Safe to call from any thread (a health check, a test, a debugging session): it takes the
        client's lock for a moment and never touches the socket.
        """
        with self._lock:
            return Outstanding(len(self._pending.difference(self._answers)), len(self._answers))

    def load(self) -> RouterLoad | None:
        """The router's load from its status page (no syscall), or None where it publishes none."""
        return self._status.read()

    def answered(self, job_ids: list[int]) -> bool:
        """Whether the router has answered every one of these jobs, without waiting.

        Reads what has already arrived on the connection (unless another thread is reading),
        takes nothing and cancels nothing: collect() still returns these answers. A streamed
        page asks this before it would wait for a block, to send what it has first.
        """
        with self._cond:
            if any(job_id not in self._answers for job_id in job_ids) and not self._reading and self._sock is not None:
                self._read_some(0)
            return all(job_id in self._answers for job_id in job_ids)

    def collect(self, job_ids: list[int], deadline: float) -> dict[int, Answer]:
        """Wait until every job is answered or time.monotonic() reaches deadline.

        Returns the answers that arrived; jobs missing from the result were cancelled.
        """
        wanted = set(job_ids)
        got: dict[int, Answer] = {}
        with self._cond:
            while True:
                for job_id in list(wanted):
                    answer = self._answers.pop(job_id, None)
                    if answer is not None:
                        got[job_id] = answer
                        wanted.discard(job_id)
                        self._pending.discard(job_id)
                if not wanted:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                if self._sock is None:
                    break
                self._read_some(remaining)
        self.cancel(sorted(wanted))
        return got

    def _read_some(self, timeout: float) -> None:
        """With the lock held on entry and exit: read what arrives within timeout and file it."""
        sock = self._sock
        generation = self._generation
        assert sock is not None
        self._reading = True
        self._lock.release()
        error = None
        frames: list[p.Frame] = []
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
            if ready:
                data = _receive(sock)
                if data is None:
                    pass  # nothing had arrived after all
                elif not data:
                    error = "the router closed the connection"
                else:
                    frames = self._reader.feed(data)
        except p.ProtocolError as exc:
            error = f"protocol error from router: {exc}"
        except (OSError, ValueError) as exc:
            error = f"receive failed: {exc}"
        finally:
            self._lock.acquire()
            self._reading = False
        now = time.monotonic()
        for frame in frames:
            if frame.type in (p.RESULT, p.ERROR, p.TIMEOUT, p.BUSY):
                if frame.job_id in self._pending:
                    self._answers[frame.job_id] = Answer(frame.type, frame.payload, frame.flags, now)
            elif frame.type == p.WITHDRAWN:
                if frame.job_id in self._withdrawing:
                    if frame.flags & p.FLAG_TAKEN:
                        self._answers[frame.job_id] = Answer(p.WITHDRAWN, b"", frame.flags, now)
                    else:
                        self._not_taken.add(frame.job_id)
            elif frame.type == p.PROTOCOL_ERROR:
                error = "router reported a protocol error: " + frame.payload.decode("utf-8", "replace")
        if error and generation == self._generation:
            self._fail_connection(error)
        self._cond.notify_all()

    def stats(self, timeout: float = 2.0) -> dict:
        """Ask the router for its counters over a separate short-lived connection."""
        import orjson

        sock = open_connection(self.address, p.ROLE_MASTER, p.encode(p.STATS, 1), timeout)
        try:
            reader = p.FrameReader()
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                data = sock.recv(65536)
                if not data:
                    break
                for frame in reader.feed(data):
                    if frame.type == p.STATS:
                        return orjson.loads(frame.payload)
            raise RouterUnavailable(f"no STATS answer from {self.address}")
        finally:
            sock.close()


def _receive(sock: socket.socket) -> bytes | None:
    """What has arrived on a socket select() found readable: b"" when the router closed it,
    None when nothing had arrived after all. Read without letting go of the interpreter lock
    (syscalls): the thread got it back once when select() returned, and need not wait for it
    a second time."""
    if not syscalls.AVAILABLE:
        return sock.recv(1 << 18)
    chunks: list[bytes] = []
    while True:
        got = syscalls.recv_now(sock)
        if got is None:
            break
        if not got:
            return b"".join(chunks)  # closed: b"" now, or after the data before it
        chunks.append(got)
        if len(got) < syscalls.CHUNK:
            break
    return b"".join(chunks) if chunks else None


def _sendall_gather(sock: socket.socket, chunks: list[bytes]) -> None:
    parts = [memoryview(chunk) for chunk in chunks]
    while parts:
        sent = sock.sendmsg(parts[:512])
        while sent and parts:
            if sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            else:
                parts[0] = parts[0][sent:]
                sent = 0


class RouterLoad(NamedTuple):
    """The router's load as its status page shows it (fastrouter/PROTOCOL.md, "Status page")."""

    workers: int
    idle: int
    queued: int
    in_flight: int
    service_us: int  # moving average of a job's time with a worker
    wait_us: int  # moving average of a dispatched job's time in the queue
    updated_us: int
    pid: int
    stopping: int


class StatusPage:
    """Reads the status page a Unix-socket router keeps next to its socket, through a shared mapping."""

    MAGIC = b"PRSTAT1\0"
    FIELDS = struct.Struct("<Q9Q")  # seq, then RouterLoad's fields in order
    STALE_US = 2_000_000  # a page not written for this long belongs to a router that is gone
    RETRY = 1.0

    def __init__(self, address: p.Address) -> None:
        self.path = address.path + ".status" if address.scheme == "unix" else None
        self._map: mmap.mmap | None = None
        self._retry_at = 0.0

    def read(self) -> RouterLoad | None:
        if self.path is None:
            return None
        page = self._map
        if page is None:
            page = self._open()
            if page is None:
                return None
        for _ in range(4):
            seq, *values = self.FIELDS.unpack_from(page, 8)
            if seq & 1:
                continue
            if self.FIELDS.unpack_from(page, 8)[0] != seq:
                continue
            load = RouterLoad(*values)
            if time.monotonic_ns() // 1000 - load.updated_us > self.STALE_US:
                self._close()  # the router restarted (a new page at the same path) or died
                return None
            return load
        return None  # the router is writing right now; decide without it

    def _open(self) -> mmap.mmap | None:
        now = time.monotonic()
        if now < self._retry_at:
            return None
        self._retry_at = now + self.RETRY
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            page = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if page[:8] != self.MAGIC:
            page.close()
            return None
        self._map = page
        return page

    def _close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


_clients: dict[str, RouterClient] = {}
_clients_pid = os.getpid()
_clients_lock = threading.Lock()


def get_client(address: str, max_payload: int = p.MAX_FRAME) -> RouterClient:
    """This process's client for address; a forked child gets its own connection."""
    global _clients_pid
    with _clients_lock:
        if _clients_pid != os.getpid():
            _clients.clear()
            _clients_pid = os.getpid()
        client = _clients.get(address)
        if client is None:
            client = _clients[address] = RouterClient(address, max_payload)
        client.max_payload = max_payload
        return client


def close_client(address: str) -> None:
    """Close and forget this process's client for address (its router is gone for good)."""
    with _clients_lock:
        client = _clients.pop(address, None) if _clients_pid == os.getpid() else None
    if client is not None:
        client.close()


@atexit.register
def _close_clients() -> None:
    """A process that exits closes its connections (a gunicorn master's, say)."""
    for address in list(_clients):
        close_client(address)
