"""The fastrouter frame format (fastrouter/PROTOCOL.md): encoding, incremental decoding, addresses."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from django.core.exceptions import ImproperlyConfigured

MAGIC = b"PR"
VERSION = 1
HEADER = struct.Struct("<2sBBHHQII")
HEADER_SIZE = HEADER.size  # 24

HELLO = 1
SUBMIT = 2
READY = 3
JOB = 4
RESULT = 5
ERROR = 6
TIMEOUT = 7
BUSY = 8
STATS = 9
PROTOCOL_ERROR = 10
CANCEL = 11
WITHDRAW = 12
WITHDRAWN = 13

TYPE_NAMES = {
    HELLO: "HELLO",
    SUBMIT: "SUBMIT",
    READY: "READY",
    JOB: "JOB",
    RESULT: "RESULT",
    ERROR: "ERROR",
    TIMEOUT: "TIMEOUT",
    BUSY: "BUSY",
    STATS: "STATS",
    PROTOCOL_ERROR: "PROTOCOL_ERROR",
    CANCEL: "CANCEL",
    WITHDRAW: "WITHDRAW",
    WITHDRAWN: "WITHDRAWN",
}

ROLE_MASTER = 1
ROLE_WORKER = 2

FLAG_HIGH_PRIORITY = 0x0001
FLAG_NO_QUEUE = 0x0002
FLAG_TAKEN = 0x0001  # WITHDRAWN: the job was still queued; the master renders it

ERROR_WORKER_LOST = 1
ERROR_SHUTDOWN = 2
ERROR_REJECTED = 3

MAX_FRAME = 16 * 1024 * 1024


class ProtocolError(Exception):
    pass


class Frame(NamedTuple):
    type: int
    flags: int
    job_id: int
    timeout_ms: int
    payload: bytes


def header(type_: int, job_id: int = 0, length: int = 0, flags: int = 0, timeout_ms: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, flags, 0, job_id, timeout_ms, length)


def encode(type_: int, job_id: int = 0, payload: bytes = b"", flags: int = 0, timeout_ms: int = 0) -> bytes:
    return header(type_, job_id, len(payload), flags, timeout_ms) + payload


class FrameReader:
    """Turns a byte stream into frames; knows nothing of sockets."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        # Nothing held back from the last read (the usual case): parse data where it is
        # instead of copying it into the buffer first, and keep only an incomplete tail.
        buf: bytes | bytearray | memoryview = data
        if self._buf:
            self._buf += data
            buf = self._buf
        frames = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            magic, version, type_, flags, reserved, job_id, timeout_ms, length = HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r}")
            if version != VERSION:
                raise ProtocolError(f"unsupported protocol version {version}")
            if reserved:
                raise ProtocolError("reserved header field is not zero")
            if type_ not in TYPE_NAMES:
                raise ProtocolError(f"unknown frame type {type_}")
            if length > self._max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the maximum of {self._max_frame}")
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            frames.append(Frame(type_, flags, job_id, timeout_ms, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if buf is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < len(buf):
            self._buf += buf[pos:]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


@dataclass(frozen=True)
class Address:
    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"tcp://{self.host}:{self.port}"


def parse_address(value: str) -> Address:
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"PARALLEL_RENDER['ROUTER'] must be a string, not {type(value).__name__}.")
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if not path.startswith("/"):
            raise ImproperlyConfigured(
                f"Router address {value!r}: a unix:// address needs an absolute path, e.g. unix:///run/app/router.sock."
            )
        return Address("unix", path=path)
    if value.startswith("tcp://"):
        rest = value[len("tcp://") :]
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(
                f"Router address {value!r}: a tcp:// address needs a host and a port, e.g. tcp://127.0.0.1:7878."
            )
        return Address("tcp", host=host.strip("[]"), port=int(port))
    raise ImproperlyConfigured(
        f"Router address {value!r} must start with unix:// or tcp://."
    )
