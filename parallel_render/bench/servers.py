"""Real memcached and redis-server processes on free loopback ports, for tests and `parallel_bench cache`."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


@contextlib.contextmanager
def server(kind: str) -> Iterator[str]:
    """Start memcached or redis-server; yield its cache location URL."""
    binary = {"memcached": "memcached", "redis": "redis-server"}[kind]
    if shutil.which(binary) is None:
        raise RuntimeError(f"{binary} is not installed (apt-get install {binary}; ./scripts/test.sh installs it)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix=f"pr-{kind}-")
    if kind == "memcached":
        cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-u", "root"]
        url = f"memcached://127.0.0.1:{port}"
    else:
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir]
        url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
