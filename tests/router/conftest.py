# no django
"""Fixtures that run the real fastrouter binary for the tests in this directory.

The binary is not built here: set PARALLEL_RENDER_FASTROUTER, or build it with
`cmake -S fastrouter -B fastrouter/build && cmake --build fastrouter/build`.

Every router runs with a fresh key (`--auth-key-file`, a 0600 file in its private directory)
unless a test passes `--no-auth` or its own `--auth-key-file`; the key is registered under the
router's address, so the wire helpers authenticate without being told.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastrouter_wire import fastrouter_binary, register_key, write_key_file


class RouterProcess:
    def __init__(self, proc: subprocess.Popen, address: str, sock_path: str | None, stderr_path: str):
        self.proc = proc
        self.address = address
        self.sock_path = sock_path
        self.stderr_path = stderr_path
        self.key: bytes | None = None  # None: --no-auth (or a key the test did not give us)
        self.key_path: str | None = None

    def env(self) -> dict:
        """Environment for a peer process (torture_peers.py, withdraw_peers.py): the key."""
        return {**os.environ, "FASTROUTER_TEST_KEY": self.key.hex() if self.key else ""}

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def wait_ready(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not ready:
            raise AssertionError("fastrouter did not print READY in time")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise AssertionError(f"fastrouter exited before READY (rc={proc.wait(5)})")
        line += chunk
    text = line.decode().strip()
    assert text.startswith("READY "), text
    return text[len("READY ") :]


@pytest.fixture
def private_dir():
    with tempfile.TemporaryDirectory(prefix="fr-") as d:
        os.chmod(d, 0o700)
        yield d


@pytest.fixture
def start_router(private_dir):
    """Starts a router on a Unix socket in a fresh 0700 directory; kills it afterwards."""
    started: list[RouterProcess] = []

    def start(*args: str, listen: str | None = None, key: bytes | None = None) -> RouterProcess:
        """`key`: the key in the test's own --auth-key-file, to register for the wire helpers."""
        n = len(started)
        sock_path = os.path.join(private_dir, f"router{n}.sock")
        listen = listen or f"unix://{sock_path}"
        stderr_path = os.path.join(private_dir, f"stderr{n}.log")
        auth: list[str] = []
        key_path = None
        if "--no-auth" not in args and not any(a.startswith("--auth-key-file") for a in args):
            key = os.urandom(32)
            key_path = write_key_file(os.path.join(private_dir, f"router{n}.key"), key)
            auth = ["--auth-key-file", key_path]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [fastrouter_binary(), "--listen", listen, *auth, *args],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        router = RouterProcess(proc, "", sock_path if listen.startswith("unix://") else None, stderr_path)
        router.key = None if "--no-auth" in args else key
        router.key_path = key_path
        started.append(router)
        router.address = wait_ready(proc)
        register_key(router.address, router.key)
        return router

    yield start
    for router in started:
        router.stop()
        # A sanitizer build reports leaks and races on stderr; any report fails the test.
        text = router.stderr()
        assert "Sanitizer" not in text and "runtime error" not in text, text


@pytest.fixture
def router(start_router) -> RouterProcess:
    return start_router()
