"""System calls a master makes without letting go of the interpreter lock: sends that fit the
socket's buffer, receives of what has arrived, reads of its CPU counter. Each gives what the
usual call gives, falls back to it where it must, and does not wait for the lock to come back."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import pytest

from parallel_render import protocol as p
from parallel_render import syscalls
from parallel_render.client import RouterClient
from parallel_render.cluster import LocalCluster
from tests.conftest import a_thread_keeping_the_lock_busy
from tests.test_dispatch import EchoWorker


def test_send_and_receive_what_fits_without_waiting():
    assert syscalls.AVAILABLE
    a, b = socket.socketpair()
    try:
        assert syscalls.recv_now(b) is None  # nothing has arrived
        assert syscalls.send_now(a, b"frame one") == 9
        assert syscalls.recv_now(b) == b"frame one"
        # A full buffer takes what fits, then nothing: the caller sends the rest as usual.
        a.setblocking(False)
        taken = sum(iter(lambda: syscalls.send_now(a, b"x" * 65536), 0))
        assert taken > 0 and syscalls.send_now(a, b"more") == 0
        received = 0
        while (got := syscalls.recv_now(b)) is not None:
            received += len(got)
        assert received == taken
        b.close()
        with pytest.raises(OSError):  # EPIPE, not a SIGPIPE that would end the process
            syscalls.send_now(a, b"to nobody")
    finally:
        a.close()
        b.close()
    c, d = socket.socketpair()
    d.close()
    assert syscalls.recv_now(c) == b""  # the peer closed
    c.close()


def timed(call: Callable[[], object], times: int) -> float:
    started = time.monotonic()
    for _ in range(times):
        call()
    return time.monotonic() - started


def test_a_send_and_receive_keep_the_interpreter_lock():
    a, b = socket.socketpair()
    try:
        with a_thread_keeping_the_lock_busy():
            kept = timed(lambda: (syscalls.send_now(a, b"job"), syscalls.recv_now(b)), 50)
            let_go = timed(lambda: (a.send(b"job"), b.recv(100)), 20)
    finally:
        a.close()
        b.close()
    # A call that lets go waits a whole turn (0.2 s) whenever the spinning thread takes the
    # lock meanwhile, in most runs at least once (let_go, for the message); a call that keeps
    # it never does, and at most one turn can fall in the loop's millisecond.
    assert kept < 0.3, (kept, let_go)


@pytest.fixture
def router():
    with LocalCluster(0) as cluster:
        yield cluster


def test_a_job_the_socket_takes_in_part_is_sent_whole(router, monkeypatch):
    """When the socket's buffer takes only part of a job at once, the rest follows the usual
    way, and the router gets every frame whole, in order."""
    real = syscalls.send_now
    monkeypatch.setattr(syscalls, "send_now", lambda sock, data: real(sock, data[:7]))
    worker = EchoWorker(router.address)
    client = RouterClient(router.address)
    try:
        payloads = [bytes([65 + i % 26]) * (1 + 997 * i) for i in range(12)]  # up to 11 kB each
        ids = [client.submit(payload, 5.0) for payload in payloads]
        answers = client.collect(ids, time.monotonic() + 10)
        assert [answers[i].type for i in ids] == [p.RESULT] * len(ids)
        assert [answers[i].payload for i in ids] == payloads
    finally:
        client.close()
        worker.close()


def test_without_libc_the_usual_calls_do_it(router, monkeypatch):
    monkeypatch.setattr(syscalls, "_send", None)
    monkeypatch.setattr(syscalls, "_recv", None)
    monkeypatch.setattr(syscalls, "AVAILABLE", False)
    worker = EchoWorker(router.address)
    client = RouterClient(router.address)
    try:
        ids = [client.submit(b"job %d" % i, 5.0) for i in range(5)]
        answers = client.collect(ids, time.monotonic() + 10)
        assert [answers[i].payload for i in ids] == [b"job %d" % i for i in range(5)]
    finally:
        client.close()
        worker.close()


def test_threads_reading_at_once_each_get_their_own_bytes(tmp_path):
    """The interpreter may switch threads between a call and the copy of what it read: each
    thread reads into a buffer of its own."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    wrong: list[str] = []

    def reader(n: int) -> None:
        a, b = socket.socketpair()
        path = tmp_path / f"file{n}"
        path.write_bytes(bytes([48 + n]) * (100 + n))
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(300):
                message = b"%d:%d" % (n, i)
                syscalls.send_now(a, message)
                if (got := syscalls.recv_now(b)) != message:
                    wrong.append(f"thread {n} received {got!r} for {message!r}")
                if syscalls.read_whole(fd) != path.read_bytes():
                    wrong.append(f"thread {n} read another file")
        finally:
            a.close()
            b.close()
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []
