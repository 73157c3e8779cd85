"""SUBMIT with the no-queue flag: delivered to an idle worker now, or BUSY at once."""

import struct
import time

from fastrouter_wire import Peer
from test_fastrouter import wait_idle

HEADER = struct.Struct("<2sBBHHQII")


def frame(type_, job_id=0, payload=b"", flags=0, timeout_ms=0):
    return HEADER.pack(b"PR", 1, type_, flags, 0, job_id, timeout_ms, len(payload)) + payload


def read_frame(sock):
    head = b""
    while len(head) < 24:
        chunk = sock.recv(24 - len(head))
        assert chunk, "connection closed"
        head += chunk
    _m, _v, type_, flags, _r, job_id, _timeout_ms, length = HEADER.unpack(head)
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return type_, flags, job_id, payload


def connect(address, role):
    """An authenticated connection (PROTOCOL.md "Handshake"), then raw frames on its socket."""
    s = Peer(address, role).sock
    s.settimeout(2)
    return s


def test_no_queue_goes_to_an_idle_worker_or_is_busy_at_once(router):
    master = connect(router.address, 1)
    # No worker yet: BUSY at once, never queued.
    started = time.monotonic()
    master.sendall(frame(2, 1, b"x", flags=0x0002, timeout_ms=5000))
    assert read_frame(master)[::2] == (8, 1)
    assert time.monotonic() - started < 0.5
    worker = connect(router.address, 2)
    worker.sendall(frame(3))
    wait_idle(router.address, 1)
    master.sendall(frame(2, 2, b"y", flags=0x0003, timeout_ms=5000))
    type_, flags, rid, payload = read_frame(worker)
    assert (type_, payload) == (4, b"y") and flags & 0x0002
    # The only worker is busy now: the next no-queue job is BUSY, a normal one queues.
    master.sendall(frame(2, 3, b"z", flags=0x0002, timeout_ms=5000))
    assert read_frame(master)[::2] == (8, 3)
    worker.sendall(frame(5, rid, b"done"))
    assert read_frame(master) == (5, 0, 2, b"done")
