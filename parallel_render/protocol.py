"""The fastrouter frame format (fastrouter/PROTOCOL.md): encoding, incremental decoding, addresses."""

from __future__ import annotations

import hashlib
import hmac
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
CHALLENGE = 14
AUTH = 15

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
    CHALLENGE: "CHALLENGE",
    AUTH: "AUTH",
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

# The handshake (PROTOCOL.md, "Handshake"): HELLO role ‖ Np, CHALLENGE Nr ‖ router proof, AUTH peer proof.
NONCE_SIZE = 32
PROOF_SIZE = 32
ROUTER_PROOF_LABEL = b"PR-AUTH1 router\0"
PEER_PROOF_LABEL = b"PR-AUTH1 peer\0"
MAX_HANDSHAKE_PAYLOAD = 64  # what a router accepts from a peer before the handshake is complete


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


# -- the handshake ------------------------------------------------------------------------------


def encode_hello(role: int, nonce: bytes) -> bytes:
    """HELLO, payload role ‖ Np (33 bytes)."""
    if role not in (ROLE_MASTER, ROLE_WORKER) or len(nonce) != NONCE_SIZE:
        raise ValueError("HELLO needs a role (1 master, 2 worker) and a 32-byte nonce")
    return encode(HELLO, payload=bytes([role]) + nonce)


def decode_hello(payload: bytes) -> tuple[int, bytes]:
    """(role, Np) from a HELLO payload; ProtocolError if it is not role ‖ 32 bytes."""
    if len(payload) != 1 + NONCE_SIZE or payload[0] not in (ROLE_MASTER, ROLE_WORKER):
        raise ProtocolError(f"HELLO payload of {len(payload)} bytes is not a role and a {NONCE_SIZE}-byte nonce")
    return payload[0], payload[1:]


def router_proof(key: bytes, role: int, peer_nonce: bytes, router_nonce: bytes) -> bytes:
    """HMAC(K, "PR-AUTH1 router\0" ‖ role ‖ Np ‖ Nr): the router's proof that it holds K."""
    return hmac.new(key, ROUTER_PROOF_LABEL + bytes([role]) + peer_nonce + router_nonce, hashlib.sha256).digest()


def peer_proof(key: bytes, role: int, peer_nonce: bytes, router_nonce: bytes) -> bytes:
    """HMAC(K, "PR-AUTH1 peer\0" ‖ role ‖ Np ‖ Nr): the peer's proof that it holds K."""
    return hmac.new(key, PEER_PROOF_LABEL + bytes([role]) + peer_nonce + router_nonce, hashlib.sha256).digest()


def encode_challenge(router_nonce: bytes, proof: bytes) -> bytes:
    """CHALLENGE, payload Nr ‖ the router's proof (64 bytes)."""
    if len(router_nonce) != NONCE_SIZE or len(proof) != PROOF_SIZE:
        raise ValueError("CHALLENGE needs a 32-byte nonce and a 32-byte proof")
    return encode(CHALLENGE, payload=router_nonce + proof)


def decode_challenge(payload: bytes) -> tuple[bytes, bytes]:
    """(Nr, the router's proof) from a CHALLENGE payload."""
    if len(payload) != NONCE_SIZE + PROOF_SIZE:
        raise ProtocolError(f"CHALLENGE payload of {len(payload)} bytes, expected {NONCE_SIZE + PROOF_SIZE}")
    return payload[:NONCE_SIZE], payload[NONCE_SIZE:]


def encode_auth(proof: bytes) -> bytes:
    """AUTH, payload the peer's proof (32 bytes)."""
    if len(proof) != PROOF_SIZE:
        raise ValueError("AUTH needs a 32-byte proof")
    return encode(AUTH, payload=proof)


def decode_auth(payload: bytes) -> bytes:
    if len(payload) != PROOF_SIZE:
        raise ProtocolError(f"AUTH payload of {len(payload)} bytes, expected {PROOF_SIZE}")
    return payload


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
