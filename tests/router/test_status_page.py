"""The router's status page (PROTOCOL.md "Status page"), read the way a master reads it: mmap
and struct.unpack_from under the seqlock."""

from __future__ import annotations

import mmap
import os
import signal
import stat
import struct
import subprocess
import time

import pytest
from fastrouter_wire import JOB, MASTER, READY, RESULT, SUBMIT, WORKER, Peer, fastrouter_binary, stats
from test_fastrouter import ready_worker, wait_for

FIELDS = (
    "workers",
    "workers_idle",
    "queued",
    "in_flight",
    "service_ewma_us",
    "queue_wait_ewma_us",
    "updated_us",
    "pid",
    "stopping",
)


def read_status(path: str) -> dict:
    """One consistent snapshot: retry while seq is odd or moved during the read."""
    with open(path, "rb") as f:
        page = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
    try:
        assert page[:8] == b"PRSTAT1\0", page[:8]
        for _ in range(1000):
            (seq,) = struct.unpack_from("<Q", page, 8)
            if seq & 1:
                continue
            values = struct.unpack_from("<9Q", page, 16)
            if struct.unpack_from("<Q", page, 8)[0] == seq:
                return {"seq": seq, **dict(zip(FIELDS, values, strict=True))}
        raise AssertionError("the status page stayed inconsistent for 1000 reads")
    finally:
        page.close()


def now_us() -> float:
    return time.monotonic() * 1e6


def status_matches(path: str, **want):
    def check():
        s = read_status(path)
        return s if all(s[k] == v for k, v in want.items()) else None

    return wait_for(check)


def test_page_next_to_the_socket_is_private_and_names_the_router(router):
    path = router.sock_path + ".status"
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 4096
    s = read_status(path)
    assert s["pid"] == router.proc.pid
    assert s["seq"] % 2 == 0 and s["seq"] > 0
    assert s["stopping"] == 0
    assert abs(now_us() - s["updated_us"]) < 1e6
    with open(path, "rb") as f:
        assert f.read()[88:] == bytes(4096 - 88)


def test_idle_router_keeps_updated_us_fresh_without_changing_the_numbers(router):
    path = router.sock_path + ".status"
    first = read_status(path)
    time.sleep(0.35)  # the point: time passes with nothing happening, over three ~100 ms refreshes
    later = read_status(path)
    assert later["updated_us"] - first["updated_us"] >= 200_000  # refreshed every ~100 ms
    assert abs(now_us() - later["updated_us"]) < 300_000
    assert later["seq"] % 2 == 0 and later["seq"] > first["seq"]
    assert {k: later[k] for k in FIELDS[:6]} == {k: first[k] for k in FIELDS[:6]}


def test_numbers_follow_connects_ready_submit_and_results(router):
    path = router.sock_path + ".status"
    assert status_matches(path, workers=0, workers_idle=0, queued=0, in_flight=0)
    worker = Peer(router.address, WORKER)
    Peer(router.address)  # no HELLO: not a worker
    assert status_matches(path, workers=1, workers_idle=0)
    worker.send(READY)
    assert status_matches(path, workers=1, workers_idle=1)
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, 1, b"a", timeout_ms=5000)
    job = worker.expect(JOB)
    assert status_matches(path, workers_idle=0, in_flight=1, queued=0)
    master.send(SUBMIT, 2, b"b", timeout_ms=5000)
    master.send(SUBMIT, 3, b"c", timeout_ms=5000)
    assert status_matches(path, queued=2, in_flight=1)
    time.sleep(0.05)  # the worker "renders" job 1 for 50 ms
    worker.send(RESULT, job.job_id, b"r")
    master.expect(RESULT, 1)
    s = status_matches(path, queued=2, in_flight=0)
    assert 50_000 <= s["service_ewma_us"] < 5_000_000, s
    worker.send(READY)
    s = status_matches(path, queued=1, in_flight=1)
    assert s["queue_wait_ewma_us"] > 0  # job 1 went straight to the worker (0), job 2 waited
    # The page agrees with STATS.
    st = stats(router.address)
    s = read_status(path)
    assert (s["workers"], s["workers_idle"], s["queued"], s["in_flight"]) == (
        st["workers"],
        st["workers_idle"],
        st["queued"],
        st["in_flight"],
    )
    assert (s["service_ewma_us"], s["queue_wait_ewma_us"]) == (st["service_ewma_us"], st["queue_wait_ewma_us"])
    worker.close()
    assert status_matches(path, workers=0, in_flight=0)


def test_stopping_while_draining_and_gone_after_exit(router):
    path = router.sock_path + ".status"
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    assert status_matches(path, workers_idle=1)
    master.send(SUBMIT, 1, b"held through the drain", timeout_ms=5000)
    job = worker.expect(JOB)
    router.proc.send_signal(signal.SIGTERM)
    assert status_matches(path, stopping=1, in_flight=1)
    worker.send(RESULT, job.job_id, b"done")
    master.expect(RESULT, 1)
    assert router.proc.wait(5) == 0
    assert not os.path.exists(path)
    assert not os.path.exists(router.sock_path)


def test_killed_router_leaves_a_stale_page_the_next_one_replaces(start_router):
    first = start_router()
    path = first.sock_path + ".status"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    stale = read_status(path)
    time.sleep(0.25)  # the point: longer than the ~100 ms refresh a live router would have made
    assert read_status(path)["updated_us"] == stale["updated_us"]  # a reader can tell
    second = start_router(listen=first.address)
    s = read_status(path)
    assert s["pid"] == second.proc.pid and abs(now_us() - s["updated_us"]) < 1e6
    assert "removing stale status file" in second.stderr()


def test_no_status_file(start_router):
    router = start_router("--no-status-file")
    Peer(router.address, MASTER).close()
    assert not any(name.endswith(".status") for name in os.listdir(os.path.dirname(router.sock_path)))


def test_status_file_option_and_tcp(start_router, private_dir):
    tcp = start_router(listen="tcp://127.0.0.1:0")
    assert not any(name.endswith(".status") for name in os.listdir(private_dir))
    path = os.path.join(private_dir, "tcp-router.status")
    tcp2 = start_router("--status-file", path, listen="tcp://127.0.0.1:0")
    assert read_status(path)["pid"] == tcp2.proc.pid
    elsewhere = os.path.join(private_dir, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    path = os.path.join(elsewhere, "page")
    unix = start_router(f"--status-file={path}")
    assert read_status(path)["pid"] == unix.proc.pid
    assert not os.path.exists(unix.sock_path + ".status")
    assert tcp.proc.poll() is None


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o704])
def test_status_file_in_a_directory_open_to_others_is_refused(private_dir, mode):
    open_dir = os.path.join(private_dir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, mode)
    sock = os.path.join(private_dir, "router.sock")
    proc = subprocess.run(
        [fastrouter_binary(), "--listen", f"unix://{sock}", "--no-auth", "--status-file", f"{open_dir}/page"],
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert b"refusing to write the status file in " + open_dir.encode() in proc.stderr, proc.stderr
    assert b"chmod 700" in proc.stderr and b"--no-status-file" in proc.stderr
    assert b"READY" not in proc.stdout
    assert not os.path.exists(f"{open_dir}/page")
    assert not os.path.exists(sock)  # nothing left behind


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--status-file", "relative/page"], b"--status-file: expected an absolute file path"),
        (["--status-file", "/tmp/"], b"--status-file: expected an absolute file path"),
        (["--status-file", "/x", "--no-status-file"], b"contradict"),
        (["--no-status-file=1"], b"takes no value"),
    ],
)
def test_bad_status_file_options_exit_2(private_dir, args, needle):
    proc = subprocess.run(
        [fastrouter_binary(), "--listen", f"unix://{private_dir}/r.sock", "--no-auth", *args],
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr, proc.stderr


def test_missing_status_directory_is_refused(private_dir):
    proc = subprocess.run(
        [
            fastrouter_binary(),
            "--listen",
            f"unix://{private_dir}/r.sock",
            "--no-auth",
            "--status-file",
            f"{private_dir}/no/page",
        ],
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert f"{private_dir}/no".encode() in proc.stderr and b"status file" in proc.stderr, proc.stderr


def test_a_page_another_live_router_publishes_is_not_taken_over(start_router, private_dir):
    path = os.path.join(private_dir, "shared.status")
    first = start_router("--status-file", path)
    proc = subprocess.run(
        [fastrouter_binary(), "--listen", f"unix://{private_dir}/other.sock", "--no-auth", "--status-file", path],
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert f"router process {first.proc.pid} is still publishing".encode() in proc.stderr, proc.stderr
    assert read_status(path)["pid"] == first.proc.pid
    assert not os.path.exists(f"{private_dir}/other.sock")
