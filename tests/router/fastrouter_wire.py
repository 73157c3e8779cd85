"""Minimal PROTOCOL.md client for the fastrouter integration tests (plain sockets + struct)."""

from __future__ import annotations

import os
import select
import socket
import struct
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

HELLO, SUBMIT, READY, JOB, RESULT, ERROR, TIMEOUT, BUSY, STATS, PROTOCOL_ERROR, CANCEL, WITHDRAW, WITHDRAWN = range(
    1, 14
)
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
}


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
    """One connection to the router, optionally announced as master or worker."""

    def __init__(self, address: str, role: int | None = None):
        if address.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address[len("unix://") :])
        else:
            host, port = address[len("tcp://") :].rsplit(":", 1)
            self.sock = socket.create_connection((host.strip("[]"), int(port)))
        self.buf = b""
        self.eof = False
        if role is not None:
            self.send(HELLO, payload=bytes([role]))

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

    def close(self) -> None:
        self.sock.close()


def stats(address: str) -> dict:
    import json

    p = Peer(address)
    try:
        p.send(STATS, job_id=99)
        frame = p.expect(STATS, 99)
        return json.loads(frame.payload)
    finally:
        p.close()
