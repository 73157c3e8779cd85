"""System calls a master's threads make without letting go of the interpreter lock.

Python lets go of the interpreter lock around every system call, so that other threads run
while one waits. A call that never waits (a read of a small kernel file, a send that fits the
socket's buffer, a receive of what has already arrived) gains nothing by it, and in a master
whose other threads keep the lock busy, the calling thread then waits to get it back: up to
the switch interval (5 ms) each time, with its page. These call libc through ctypes.PyDLL,
which keeps the lock across the call (docs/dispatch.md has the measurements). Where ctypes
cannot reach libc, each returns what tells its caller to make the usual call instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from typing import Any

# Without waiting, and without SIGPIPE on a closed peer (an EPIPE instead).
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0x40) | getattr(socket, "MSG_NOSIGNAL", 0x4000)
_RECV_FLAGS = getattr(socket, "MSG_DONTWAIT", 0x40)
_WOULD_WAIT = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
CHUNK = 65536


def _libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    try:
        function = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_ssize_t
    return function


_pread = _libc_function("pread", (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long))
_send = _libc_function("send", (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int))
_recv = _libc_function("recv", (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
AVAILABLE = None not in (_pread, _send, _recv)
# One buffer per thread, kept: another thread may run between a call and the copy of what it
# read (the interpreter can switch threads between any two steps).
_local = threading.local()


def _thread_buffer() -> Any:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = ctypes.create_string_buffer(CHUNK)
    return buffer


def _error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def read_whole(fd: int, locked: bool = True) -> bytes:
    """The whole of a small kernel file (/proc, cgroupfs) from its start.

    A master reads its CPU counter this way every 10 ms: at 8 connections on the demo page
    with every block kept in place, reading it with os.pread() made the node serve 0.92x the
    pages of plain Django; this way, 0.97x to 1.0x. locked=False, or no libc: os.pread().
    """
    chunks, offset = [], 0
    while True:
        if locked and _pread is not None:
            buffer = _thread_buffer()
            size = _pread(fd, buffer, CHUNK, offset)
            if size < 0:
                raise _error()
            chunk = ctypes.string_at(buffer, size)
        else:
            chunk = os.pread(fd, CHUNK, offset)
        chunks.append(chunk)
        offset += len(chunk)
        if len(chunk) < CHUNK:
            return b"".join(chunks)


def send_now(sock: socket.socket, data: bytes) -> int:
    """How much of data the socket took at once (0: its buffer is full, or no libc): the
    caller sends the rest as usual. Raises OSError when the connection failed."""
    if _send is None or not data:
        return 0
    sent = _send(sock.fileno(), data, len(data), _SEND_FLAGS)
    if sent >= 0:
        return sent
    error = _error()
    if error.errno in _WOULD_WAIT:
        return 0
    raise error


def recv_now(sock: socket.socket, size: int = CHUNK) -> bytes | None:
    """What has arrived on the socket, up to size bytes, without waiting: b"" when the peer
    closed the connection, None when nothing has arrived (or no libc: the caller receives as
    usual). Raises OSError when the connection failed."""
    if _recv is None:
        return None
    buffer = _thread_buffer()
    got = _recv(sock.fileno(), buffer, min(size, CHUNK), _RECV_FLAGS)
    if got >= 0:
        return ctypes.string_at(buffer, got)
    error = _error()
    if error.errno in _WOULD_WAIT:
        return None
    raise error
