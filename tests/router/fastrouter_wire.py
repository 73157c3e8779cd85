"""Minimal PROTOCOL.md client for the fastrouter integration tests (plain sockets + struct).

Written from PROTOCOL.md, not from the plugin: HELLO ‖ Np, CHALLENGE (checked), AUTH. A router
started by the fixtures registers its key here under its address (`register_key`), so
`Peer(router.address, MASTER)` does the whole handshake; `key=None` sends the one-byte HELLO of a
`--no-auth` router, and a Peer without a role sends nothing (for tests of raw bytes).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BINARY = Path(__file__).resolve().parents[2] / "fastrouter" / "build" / "fastrouter"


def fastrouter_binary() -> str:
    """The binary under test: $PARALLEL_RENDER_FASTROUTER, else fastrouter/build/fastrouter."""
    import pytest

    path = os.environ.get("PARALLEL_RENDER_FASTROUTER") or str(DEFAULT_BINARY)
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"fastrouter binary not found at {path}: build it with "
            "`cmake -S fastrouter -B fastrouter/build && cmake --build fastrouter/build` "
            "or point PARALLEL_RENDER_FASTROUTER at one",
            pytrace=False,
        )
    return path


HEADER = struct.Struct("<2sBBHHQII")
HEADER_SIZE = HEADER.size  # 24

(
    HELLO,
    SUBMIT,
    READY,
    JOB,
    RESULT,
    ERROR,
    TIMEOUT,
    BUSY,
    STATS,
    PROTOCOL_ERROR,
    CANCEL,
    WITHDRAW,
    WITHDRAWN,
    CHALLENGE,
    AUTH,
) = range(1, 16)
MASTER, WORKER = 1, 2
HIGH = 0x0001
TAKEN = 0x0001  # WITHDRAWN
WORKER_LOST, SHUTDOWN, REJECTED = 1, 2, 3

NAMES = {
    1: "HELLO",
    2: "SUBMIT",
    3: "READY",
    4: "JOB",
    5: "RESULT",
    6: "ERROR",
    7: "TIMEOUT",
    8: "BUSY",
    9: "STATS",
    10: "PROTOCOL_ERROR",
    11: "CANCEL",
    12: "WITHDRAW",
    13: "WITHDRAWN",
    14: "CHALLENGE",
    15: "AUTH",
}

# -- the handshake (PROTOCOL.md "Handshake") ------------------------------------------------------

NONCE_SIZE = PROOF_SIZE = KEY_SIZE = 32
ROUTER_LABEL = b"PR-AUTH1 router\0"
PEER_LABEL = b"PR-AUTH1 peer\0"

_KEYS: dict[str, bytes | None] = {}
_REGISTERED = object()  # Peer's default: the key registered for the address, if any


def register_key(address: str, key: bytes | None) -> None:
    """The key peers of the router at `address` prove they hold (None: a --no-auth router)."""
    _KEYS[address] = key


def key_for(address: str) -> bytes | None:
    return _KEYS.get(address)


def write_key_file(path: str, key: bytes) -> str:
    """The key as the router's key file holds it: 64 hex characters, a newline, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(path, 0o600)
    return path


def router_proof(key: bytes, role: int, np: bytes, nr: bytes) -> bytes:
    return hmac.new(key, ROUTER_LABEL + bytes([role]) + np + nr, hashlib.sha256).digest()


def peer_proof(key: bytes, role: int, np: bytes, nr: bytes) -> bytes:
    return hmac.new(key, PEER_LABEL + bytes([role]) + np + nr, hashlib.sha256).digest()


class RouterProofError(AssertionError):
    """The CHALLENGE's proof is wrong: whoever answered does not hold the key."""


def encode(ftype: int, job_id: int = 0, payload: bytes = b"", flags: int = 0, timeout_ms: int = 0) -> bytes:
    return HEADER.pack(b"PR", 1, ftype, flags, 0, job_id, timeout_ms, len(payload)) + payload


@dataclass
class Frame:
    type: int
    flags: int
    job_id: int
    timeout_ms: int
    payload: bytes

    def __repr__(self) -> str:
        return (
            f"Frame({NAMES.get(self.type, self.type)}, flags={self.flags}, "
            f"job_id={self.job_id}, timeout_ms={self.timeout_ms}, payload={self.payload[:40]!r})"
        )


class Peer:
    """One connection to the router; with a role, it completes the handshake as that role."""

    def __init__(self, address: str, role: int | None = None, key=_REGISTERED):
        if address.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address[len("unix://") :])
        else:
            host, port = address[len("tcp://") :].rsplit(":", 1)
            self.sock = socket.create_connection((host.strip("[]"), int(port)))
        self.buf = b""
        self.eof = False
        self.challenge: Frame | None = None
        if role is not None:
            self.handshake(role, key_for(address) if key is _REGISTERED else key)

    def handshake(self, role: int, key: bytes | None, np: bytes | None = None) -> None:
        """HELLO; with a key, check the CHALLENGE's proof (closing if it is wrong) and AUTH."""
        if key is None:
            self.send(HELLO, payload=bytes([role]))
            return
        np = os.urandom(NONCE_SIZE) if np is None else np
        self.send(HELLO, payload=bytes([role]) + np)
        self.challenge = self.expect(CHALLENGE)
        nr, proof = self.challenge.payload[:NONCE_SIZE], self.challenge.payload[NONCE_SIZE:]
        if len(nr) != NONCE_SIZE or not hmac.compare_digest(proof, router_proof(key, role, np, nr)):
            self.close()
            raise RouterProofError(f"the router's proof in {self.challenge} is wrong")
        self.send(AUTH, payload=peer_proof(key, role, np, nr))

    def send(self, ftype: int, job_id: int = 0, payload: bytes = b"", flags: int = 0, timeout_ms: int = 0) -> None:
        self.sock.sendall(encode(ftype, job_id, payload, flags, timeout_ms))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], left)
        if not ready:
            return False
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _take(self) -> Frame | None:
        if len(self.buf) < HEADER_SIZE:
            return None
        magic, version, ftype, flags, reserved, job_id, timeout_ms, length = HEADER.unpack_from(self.buf)
        assert magic == b"PR" and version == 1 and reserved == 0, self.buf[:HEADER_SIZE]
        if len(self.buf) < HEADER_SIZE + length:
            return None
        payload = self.buf[HEADER_SIZE : HEADER_SIZE + length]
        self.buf = self.buf[HEADER_SIZE + length :]
        return Frame(ftype, flags, job_id, timeout_ms, payload)

    def recv(self, timeout: float = 2.0) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if not self._fill(deadline):
                raise AssertionError(f"no frame within {timeout}s (eof={self.eof}, buffered={self.buf!r})")

    def expect(self, ftype: int, job_id: int | None = None, timeout: float = 2.0) -> Frame:
        frame = self.recv(timeout)
        assert frame.type == ftype, f"expected {NAMES[ftype]}, got {frame}"
        if job_id is not None:
            assert frame.job_id == job_id, f"expected job {job_id}, got {frame}"
        return frame

    def expect_nothing(self, wait: float = 0.15) -> None:
        deadline = time.monotonic() + wait
        while self._fill(deadline):
            pass
        frame = self._take()
        assert frame is None, f"expected no frame, got {frame}"

    def wait_closed(self, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline) and not self.eof:
                return False
        return True

    def unread(self) -> int:
        """Bytes this peer sent that the router has not read yet (Linux, a router on this host).

        On a Unix socket the kernel keeps what was sent charged to the sender until the receiver
        reads it (SIOCOUTQ), so 0 means the router has read everything. On TCP SIOCOUTQ counts
        only what the router's kernel has not acknowledged; what it acknowledged and the router
        has not read is the receive queue of the router's end, in /proc/net/tcp. Read in that
        order, both 0 means the router has read everything. A connection the router has closed
        counts 0: it will read nothing more.
        """
        outq = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if self.sock.family == socket.AF_UNIX:
            return outq
        rx_queue = self._router_end_rx_queue()
        return 0 if rx_queue is None else outq + rx_queue

    def _router_end_rx_queue(self) -> int | None:
        """What the router's end of this TCP connection received and the router has not read;
        None once the router has closed it."""
        try:
            router_end = (self.sock.getpeername()[:2], self.sock.getsockname()[:2])
        except OSError:  # reset: the router closed it
            return None
        table = "/proc/net/tcp6" if self.sock.family == socket.AF_INET6 else "/proc/net/tcp"
        with open(table) as f:
            next(f)
            for line in f:
                local, remote, state, queues = line.split()[1:5]
                if (_proc_net_address(local), _proc_net_address(remote)) == router_end:
                    # ESTABLISHED (accepted or not yet), SYN_RECV or CLOSE_WAIT: the router will
                    # still read it; any other state follows the router's close.
                    return int(queues.split(":")[1], 16) if state in ("01", "03", "08") else None
        return None

    def wait_read_by_router(self, timeout: float = 5.0) -> None:
        """Waits until the router has read every byte this peer sent (and so acted on it)."""
        deadline = time.monotonic() + timeout
        while self.unread():
            assert time.monotonic() < deadline, f"the router left {self.unread()} bytes unread for {timeout}s"
            time.sleep(0.002)

    def close(self) -> None:
        self.sock.close()


def _proc_net_address(text: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6}: the host as 32-bit words in host byte order, the port."""
    host, port = text.split(":")
    raw = b"".join(struct.pack("=I", int(host[i : i + 8], 16)) for i in range(0, len(host), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)


def stats(address: str) -> dict:
    """STATS as a monitoring tool sees them: it must authenticate, as a master, first.

    The answer counts the asking connection among `masters` and `connections`; `masters` is
    given back without it, so tests read the masters they made. (`connections` keeps it.)
    """
    import json

    p = Peer(address, MASTER)
    try:
        p.send(STATS, job_id=99)
        frame = p.expect(STATS, 99)
        s = json.loads(frame.payload)
        s["masters"] -= 1
        return s
    finally:
        p.close()
