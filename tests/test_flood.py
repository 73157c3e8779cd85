"""Issue 9 under attack, end to end: pages stay right and keep their speed while processes
without the key flood the router (written from fastrouter/PROTOCOL.md, not from our client)."""

from __future__ import annotations

import os
import socket
import statistics
import struct
import threading
import time

from django.test import Client

from parallel_render.testing import parallel_workers, serially, worker_rendered
from tests.conftest import rescued

MAGIC, VERSION, HELLO, READY = b"PR", 1, 1, 3
HEADER = struct.Struct("<2sBBHHQII")  # magic, version, type, flags, reserved, job_id, timeout_ms, length


def frame(kind: int, payload: bytes = b"", length: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, 0, 0, 0, 0, len(payload) if length is None else length) + payload


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def page_times(client: Client, path: str, n: int, expected: bytes) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(path)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200
        assert len(worker_rendered(response)) == 4 and not rescued(response), response.headers.get("Server-Timing")
        assert response.content == expected
    return times


def test_pages_stay_right_and_fast_while_peers_without_the_key_flood_the_router(transactional_db):
    with parallel_workers(4) as cluster:
        path = "/p/leak/?marker=flood&n=3"  # four blocks, each rendered by a worker
        with serially():
            expected = Client().get(path).content
        client = Client()
        page_times(client, path, 3, expected)  # warm: connections, templates, the blocks' costs
        quiet = page_times(client, path, 10, expected)
        router_pid = cluster.router.pid
        before = rss_kb(router_pid)
        sock_path = cluster.address[len("unix://"):]
        stop = threading.Event()
        opened = [0]

        def flood() -> None:
            # Rogue peers of the same uid without the key: each announces itself as a worker
            # (HELLO with a nonce, then READY without AUTH), or sends a header announcing
            # 16 MiB and one byte, and holds the connection; new ones keep coming.
            held: list[socket.socket] = []
            while not stop.is_set():
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(sock_path)
                    if opened[0] % 2:
                        s.sendall(frame(HELLO, bytes([2]) + os.urandom(32)) + frame(READY))
                    else:
                        s.sendall(frame(HELLO, length=16 << 20) + b"x")
                except OSError:
                    s.close()
                    continue
                held.append(s)
                opened[0] += 1
                if len(held) > 300:
                    held.pop(0).close()
                time.sleep(0.002)
            for s in held:
                s.close()

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        for t in flooders:
            t.start()
        try:
            time.sleep(0.5)
            loud = page_times(client, path, 10, expected)
            # A new master connecting in the middle of the flood still gets through.
            fresh = Client().get(path)
            peak = rss_kb(router_pid)
        finally:
            stop.set()
            for t in flooders:
                t.join(10)
        assert fresh.content == expected and len(worker_rendered(fresh)) == 4
        assert opened[0] > 200, opened[0]
        assert peak - before < 64 * 1024, (before, peak)
        # Every block still went to a worker and the pages kept their speed: the flood only
        # costs the router a few syscalls per connection (the median, not the tail, on a shared
        # machine).
        print(f"flood: {opened[0]} rogue connections, router RSS {before} -> {peak} kB, page median "
              f"{statistics.median(quiet) * 1000:.1f} ms quiet, {statistics.median(loud) * 1000:.1f} ms flooded")
        assert statistics.median(loud) < statistics.median(quiet) * 2 + 0.05, (quiet, loud)
        stats = cluster_stats(cluster.address)
        assert stats["workers"] == 4  # no rogue peer ever became a worker
        assert stats["auth_failures"] + stats["handshake_timeouts"] + stats["evicted_pending"] + stats["protocol_errors"] > 0


def cluster_stats(address: str) -> dict:
    from parallel_render.client import RouterClient

    return RouterClient(address).stats()
