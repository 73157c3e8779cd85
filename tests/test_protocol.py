"""The Python frame codec against fastrouter/PROTOCOL.md's own examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from parallel_render import protocol as p
from parallel_render import sealing

DOC = (Path(__file__).resolve().parent.parent / "fastrouter" / "PROTOCOL.md").read_text()


KEY, NP, NR = bytes(range(32)), b"\x11" * 32, b"\x22" * 32


def example(caption: str) -> bytes:
    """The hex block that follows a caption line in PROTOCOL.md."""
    match = re.search(re.escape(caption) + r"\s*\n\n((?:    [0-9a-f ]+\n)+)", DOC)
    assert match, f"no example {caption!r} in PROTOCOL.md"
    return bytes.fromhex(match.group(1).replace("\n", " "))


@pytest.mark.parametrize(
    ("caption", "frame"),
    [
        ("HELLO from a master:", p.encode(p.HELLO, payload=bytes([p.ROLE_MASTER]))),
        ("SUBMIT, job_id 7, high priority, timeout 250 ms, payload `hi`:",
         p.encode(p.SUBMIT, 7, b"hi", flags=p.FLAG_HIGH_PRIORITY, timeout_ms=250)),
        ("READY from a worker:", p.encode(p.READY)),
        ("BUSY for job 7:", p.encode(p.BUSY, 7)),
        ("ERROR WORKER_LOST for job 7, reason `worker lost`:",
         p.encode(p.ERROR, 7, b"worker lost", flags=p.ERROR_WORKER_LOST)),
        # The handshake, for K = 00..1f, Np = 32 x 11, Nr = 32 x 22.
        ("HELLO from a master with its nonce `Np` (to a router with a key):", p.encode_hello(p.ROLE_MASTER, NP)),
        ("CHALLENGE answering it, `Nr` then the router's proof:",
         p.encode_challenge(NR, p.router_proof(KEY, p.ROLE_MASTER, NP, NR))),
        ("AUTH from the master, its proof:", p.encode_auth(p.peer_proof(KEY, p.ROLE_MASTER, NP, NR))),
    ],
)
def test_documented_examples(caption, frame):
    assert frame == example(caption)
    (decoded,) = p.FrameReader().feed(example(caption))
    assert p.encode(decoded.type, decoded.job_id, decoded.payload, decoded.flags, decoded.timeout_ms) == frame


def test_reader_reassembles_frames_split_at_every_byte():
    stream = p.encode(p.RESULT, 1, b"abc") + p.encode(p.TIMEOUT, 2) + p.encode(p.RESULT, 3, b"x" * 1000)
    for cut in range(len(stream) + 1):
        reader = p.FrameReader()
        frames = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [(f.type, f.job_id, f.payload) for f in frames] == [
            (p.RESULT, 1, b"abc"), (p.TIMEOUT, 2, b""), (p.RESULT, 3, b"x" * 1000)
        ]
        assert reader.buffered == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XX" + p.encode(p.READY)[2:], "bad magic"),
        (p.encode(p.READY)[:2] + b"\x02" + p.encode(p.READY)[3:], "version"),
        (p.encode(p.READY)[:3] + b"\x63" + p.encode(p.READY)[4:], "unknown frame type"),
        (p.encode(p.READY)[:6] + b"\x01\x00" + p.encode(p.READY)[8:], "reserved"),
        (p.header(p.RESULT, 1, 2**31), "exceeds the maximum"),
    ],
)
def test_reader_rejects_bad_frames(data, message):
    with pytest.raises(p.ProtocolError, match=message):
        p.FrameReader().feed(data)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("unix://relative.sock", "absolute path"),
        ("tcp://localhost", "host and a port"),
        ("tcp://:80", "host and a port"),
        ("http://x", "must start with unix:// or tcp://"),
        (42, "must be a string"),
    ],
)
def test_bad_addresses_say_what_is_wrong(value, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        p.parse_address(value)


def test_addresses():
    assert str(p.parse_address("unix:///run/x.sock")) == "unix:///run/x.sock"
    assert p.parse_address("tcp://127.0.0.1:7878").port == 7878
    assert p.parse_address("tcp://[::1]:7878").host == "::1"


def test_frames_read_from_a_reused_buffer_stay_intact():
    stream = p.encode(p.JOB, 1, b"a" * 50) + p.encode(p.JOB, 2, b"b" * 70)
    buffer = bytearray(64)
    reader = p.FrameReader()
    frames = []
    for start in range(0, len(stream), 64):
        chunk = stream[start:start + 64]
        buffer[:len(chunk)] = chunk
        frames += reader.feed(memoryview(buffer)[:len(chunk)])
        buffer[:] = b"\0" * 64  # the next recv overwrites it
    assert [(f.job_id, f.payload) for f in frames] == [(1, b"a" * 50), (2, b"b" * 70)]
    assert reader.buffered == 0


def test_the_seal_follows_the_secret_key(settings):
    binding = sealing.node_binding("unix:///run/x.sock")
    sealed, _identity, _expiry = sealing.seal_job(binding, b"body", 1.0)
    assert sealing.sealer(binding).open(sealed, sealing.KIND_JOB).body == b"body"
    settings.SECRET_KEY = "another-key"
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(binding).open(sealed, sealing.KIND_JOB)
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(binding).open(b"short", sealing.KIND_JOB)
