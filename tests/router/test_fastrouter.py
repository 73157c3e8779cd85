"""Integration tests of the fastrouter binary against PROTOCOL.md, over real sockets."""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest
from fastrouter_wire import (
    BUSY,
    CANCEL,
    ERROR,
    HELLO,
    HIGH,
    JOB,
    MASTER,
    PROTOCOL_ERROR,
    READY,
    RESULT,
    SHUTDOWN,
    STATS,
    SUBMIT,
    TIMEOUT,
    WORKER,
    WORKER_LOST,
    Peer,
    encode,
    fastrouter_binary,
    stats,
)

STATS_KEYS = {
    "queued",
    "queued_bytes",
    "in_flight",
    "workers_idle",
    "workers_busy",
    "masters",
    "workers",
    "submitted",
    "completed",
    "errors",
    "timeouts",
    "busy",
    "cancelled",
    "dropped",
    "protocol_errors",
}


def wait_for(predicate, timeout: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.005)


def ready_worker(address: str) -> Peer:
    w = Peer(address, WORKER)
    w.send(READY)
    return w


def wait_idle(address: str, n: int) -> None:
    assert wait_for(lambda: stats(address)["workers_idle"] == n), stats(address)


def test_round_trip_translates_job_ids(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=7, payload=b"hi", flags=HIGH, timeout_ms=250)
    job = worker.expect(JOB)
    assert job.payload == b"hi"
    assert job.flags == HIGH
    assert 0 < job.timeout_ms <= 250
    worker.send(RESULT, job_id=job.job_id, payload=b"<p>fragment</p>")
    worker.send(READY)
    result = master.expect(RESULT, 7)
    assert result.payload == b"<p>fragment</p>"
    # Two masters using the same id never see each other's results.
    other = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"from-a")
    other.send(SUBMIT, job_id=1, payload=b"from-b")
    for _ in range(2):
        job = worker.expect(JOB)
        worker.send(RESULT, job_id=job.job_id, payload=b"re:" + job.payload)
        worker.send(READY)
    assert master.expect(RESULT, 1).payload == b"re:from-a"
    assert other.expect(RESULT, 1).payload == b"re:from-b"


def test_large_payload_round_trip(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    body = os.urandom(3 << 20)
    master.send(SUBMIT, job_id=5, payload=body)
    job = worker.expect(JOB, timeout=5)
    assert job.payload == body
    worker.send(RESULT, job_id=job.job_id, payload=body[::-1])
    assert master.expect(RESULT, 5, timeout=5).payload == body[::-1]


def test_lru_across_three_workers(router):
    master = Peer(router.address, MASTER)
    workers = [Peer(router.address, WORKER) for _ in range(3)]
    order = [1, 2, 0]
    for i in order:
        workers[i].send(READY)
        wait_idle(router.address, order.index(i) + 1)
    workers[1].send(READY)  # already idle: ignored, keeps its place
    for n in range(3):
        master.send(SUBMIT, job_id=100 + n, payload=f"job{n}".encode())
    for n, i in enumerate(order):
        assert workers[i].expect(JOB).payload == f"job{n}".encode()


def test_lru_order_after_results(router):
    master = Peer(router.address, MASTER)
    workers = [Peer(router.address, WORKER) for _ in range(3)]
    for i in (0, 1, 2):
        workers[i].send(READY)
        wait_idle(router.address, i + 1)
    for n in range(3):
        master.send(SUBMIT, job_id=n, payload=b"x")
    held = [w.expect(JOB) for w in workers]
    # Finish in the order 2, 0, 1: that becomes the idle order.
    for i in (2, 0, 1):
        workers[i].send(RESULT, job_id=held[i].job_id, payload=b"r")
        workers[i].send(READY)
        idle = [2, 0, 1].index(i) + 1
        assert wait_for(lambda idle=idle: stats(router.address)["workers_idle"] == idle)
    for _ in range(3):
        master.expect(RESULT)
    for n in range(3):
        master.send(SUBMIT, job_id=10 + n, payload=f"second{n}".encode())
    assert workers[2].expect(JOB).payload == b"second0"
    assert workers[0].expect(JOB).payload == b"second1"
    assert workers[1].expect(JOB).payload == b"second2"


def test_ready_while_holding_a_job_is_a_protocol_error(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=3, payload=b"x")
    worker.expect(JOB)
    worker.send(READY)
    assert worker.expect(PROTOCOL_ERROR).payload.startswith(b"READY while holding job")
    assert worker.wait_closed()
    assert master.expect(ERROR, 3).flags == WORKER_LOST


def test_priorities_high_first_fifo_within(router):
    master = Peer(router.address, MASTER)
    for job_id, flags in [(1, 0), (2, HIGH), (3, 0), (4, HIGH), (5, 0)]:
        master.send(SUBMIT, job_id=job_id, payload=str(job_id).encode(), flags=flags)
    assert wait_for(lambda: stats(router.address)["queued"] == 5)
    worker = ready_worker(router.address)
    got = []
    for _ in range(5):
        job = worker.expect(JOB)
        got.append((job.payload, job.flags))
        worker.send(RESULT, job_id=job.job_id)
        worker.send(READY)
    assert got == [(b"2", HIGH), (b"4", HIGH), (b"1", 0), (b"3", 0), (b"5", 0)]


def test_busy_when_queue_is_full(start_router):
    router = start_router("--max-queue", "2")
    master = Peer(router.address, MASTER)
    t0 = time.monotonic()
    for job_id in (1, 2, 3, 4):
        master.send(SUBMIT, job_id=job_id, payload=b"x")
    assert master.expect(BUSY, 3).payload == b""
    assert master.expect(BUSY, 4)
    assert time.monotonic() - t0 < 1.0
    s = stats(router.address)
    assert s["queued"] == 2 and s["busy"] == 2
    # The two queued jobs are still served.
    worker = ready_worker(router.address)
    for _ in range(2):
        job = worker.expect(JOB)
        worker.send(RESULT, job_id=job.job_id)
        worker.send(READY)
    assert {master.expect(RESULT).job_id for _ in range(2)} == {1, 2}


def test_busy_on_queue_bytes(start_router):
    router = start_router("--max-queue-bytes", "10")
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"123456")
    master.send(SUBMIT, job_id=2, payload=b"123456")
    master.expect(BUSY, 2)


def test_queued_job_times_out_and_is_never_delivered(router):
    master = Peer(router.address, MASTER)
    t0 = time.monotonic()
    master.send(SUBMIT, job_id=9, payload=b"x", timeout_ms=100)
    master.expect(TIMEOUT, 9)
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 1.0, elapsed
    worker = ready_worker(router.address)
    worker.expect_nothing(0.2)
    assert stats(router.address)["timeouts"] == 1


def test_default_timeout(start_router):
    router = start_router("--default-timeout-ms", "80")
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"x", timeout_ms=0)
    master.expect(TIMEOUT, 1)


def test_in_flight_timeout_drops_late_result(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=4, payload=b"slow", timeout_ms=100)
    job = worker.expect(JOB)
    master.expect(TIMEOUT, 4)
    worker.send(RESULT, job_id=job.job_id, payload=b"too late")
    worker.send(READY)
    master.expect_nothing(0.2)
    s = stats(router.address)
    assert s["dropped"] == 1 and s["timeouts"] == 1 and s["in_flight"] == 0
    # The worker is idle again and the id can be reused.
    master.send(SUBMIT, job_id=4, payload=b"again")
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"ok")
    assert master.expect(RESULT, 4).payload == b"ok"


def test_worker_killed_mid_job_answers_worker_lost_at_once(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=21, payload=b"x", timeout_ms=10000)
    worker.expect(JOB)
    t0 = time.monotonic()
    worker.close()
    err = master.expect(ERROR, 21)
    elapsed = time.monotonic() - t0
    assert err.flags == WORKER_LOST
    assert err.payload
    assert elapsed < 0.05, f"WORKER_LOST took {elapsed * 1000:.1f} ms"


def test_master_disconnect_drops_its_queued_jobs(router):
    doomed = Peer(router.address, MASTER)
    survivor = Peer(router.address, MASTER)
    for job_id in range(5):
        doomed.send(SUBMIT, job_id=job_id, payload=b"doomed")
    survivor.send(SUBMIT, job_id=1, payload=b"alive")
    assert wait_for(lambda: stats(router.address)["queued"] == 6)
    doomed.close()
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    worker = ready_worker(router.address)
    job = worker.expect(JOB)
    assert job.payload == b"alive"
    worker.send(RESULT, job_id=job.job_id)
    worker.send(READY)
    worker.expect_nothing(0.2)
    assert stats(router.address)["dropped"] == 5


def test_master_disconnect_discards_in_flight_result(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=1, payload=b"x")
    job = worker.expect(JOB)
    master.close()
    assert wait_for(lambda: stats(router.address)["masters"] == 0)
    worker.send(RESULT, job_id=job.job_id, payload=b"nobody wants this")
    worker.send(READY)
    assert wait_for(lambda: stats(router.address)["dropped"] == 1)
    other = Peer(router.address, MASTER)
    other.send(SUBMIT, job_id=1, payload=b"y")
    assert worker.expect(JOB).payload == b"y"


def test_cancel(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"queued")
    master.send(SUBMIT, job_id=2, payload=b"kept")
    master.send(CANCEL, job_id=1)
    master.send(CANCEL, job_id=12345)  # unknown: ignored
    assert wait_for(lambda: stats(router.address)["cancelled"] == 1)
    worker = ready_worker(router.address)
    job = worker.expect(JOB)
    assert job.payload == b"kept"
    master.send(CANCEL, job_id=2)  # in flight: its result is discarded
    assert wait_for(lambda: stats(router.address)["cancelled"] == 2)
    worker.send(RESULT, job_id=job.job_id, payload=b"r")
    worker.send(READY)
    master.expect_nothing(0.2)
    worker.expect_nothing(0.05)


def test_duplicate_job_id_rejected(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=5, payload=b"a")
    master.send(SUBMIT, job_id=5, payload=b"b")
    err = master.expect(ERROR, 5)
    assert err.flags == 3


def test_stats_keys_and_values(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    s = stats(router.address)
    assert STATS_KEYS <= set(s), STATS_KEYS - set(s)
    assert s["masters"] == 1 and s["workers"] == 1 and s["workers_idle"] == 1
    assert all(isinstance(s[k], int) for k in STATS_KEYS)
    # STATS also works on an identified connection and echoes the id.
    master.send(STATS, job_id=0xDEADBEEF)
    assert master.expect(STATS, 0xDEADBEEF).payload.startswith(b"{")
    worker.send(STATS, job_id=3)
    assert worker.expect(STATS, 3).payload.startswith(b"{")


@pytest.mark.parametrize(
    "role, bad, reason",
    [
        (None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"magic"),
        (None, struct.pack("<2sBBHHQII", b"XX", 1, 1, 0, 0, 0, 0, 1) + b"\x01", b"magic"),
        (None, struct.pack("<2sBBHHQII", b"PR", 9, 1, 0, 0, 0, 0, 1) + b"\x01", b"version"),
        (None, struct.pack("<2sBBHHQII", b"PR", 1, 99, 0, 0, 0, 0, 0), b"type"),
        (None, struct.pack("<2sBBHHQII", b"PR", 1, 1, 0, 7, 0, 0, 1) + b"\x01", b"reserved"),
        (None, struct.pack("<2sBBHHQII", b"PR", 1, 2, 0, 0, 1, 0, 0xFFFFFFFF), b"64 bytes before the handshake"),
        (MASTER, struct.pack("<2sBBHHQII", b"PR", 1, 2, 0, 0, 1, 0, 0xFFFFFFFF), b"maximum frame size"),
        (MASTER, struct.pack("<2sBBHHQII", b"PR", 9, 2, 0, 0, 1, 0, 0), b"version"),
        (None, encode(SUBMIT, 1, b"x"), b"before HELLO"),
        (MASTER, encode(READY), b"READY is not allowed on a master"),
        (WORKER, encode(HELLO, payload=b"\x02"), b"HELLO is not allowed on a worker"),
        (None, encode(HELLO, payload=b"\x07"), b"HELLO payload"),
    ],
)
def test_protocol_errors_close_only_the_offender(router, role, bad, reason):
    healthy = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    offender = Peer(router.address, role)
    offender.send_raw(bad)
    err = offender.expect(PROTOCOL_ERROR)
    assert err.job_id == 0
    assert reason in err.payload, err.payload
    assert offender.wait_closed()
    healthy.send(SUBMIT, job_id=1, payload=b"fine")
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"done")
    assert healthy.expect(RESULT, 1).payload == b"done"
    assert stats(router.address)["protocol_errors"] == 1
    # Logged once, naming the problem.
    assert router.stderr().count("protocol error") == 1


def test_max_frame_option(start_router):
    router = start_router("--max-frame", "1024", "--max-output", "4096")
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"x" * 1024)  # exactly the limit: accepted
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    master.send(SUBMIT, job_id=2, payload=b"x" * 1025)
    assert master.expect(PROTOCOL_ERROR).payload.find(b"maximum frame size") >= 0
    assert master.wait_closed()


def test_thousand_idle_connections(router):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    # Authenticated and silent, as masters between requests are: never closed for it.
    idle = [Peer(router.address, MASTER) for _ in range(1000)]
    try:
        master = Peer(router.address, MASTER)
        worker = ready_worker(router.address)
        wait_idle(router.address, 1)
        t0 = time.monotonic()
        for n in range(50):
            master.send(SUBMIT, job_id=n, payload=b"x")
            job = worker.expect(JOB)
            worker.send(RESULT, job_id=job.job_id, payload=b"y")
            worker.send(READY)
            master.expect(RESULT, n)
        assert time.monotonic() - t0 < 5
        assert stats(router.address)["masters"] == 1001
    finally:
        for p in idle:
            p.close()


def test_slow_reader_is_disconnected_at_output_cap(start_router):
    router = start_router("--max-frame", "65536", "--max-output", "200000")
    slow = Peer(router.address, MASTER)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    big = b"r" * 60000
    # The master never reads; results pile up in its output buffer until the cap is hit.
    for n in range(200):
        slow.send(SUBMIT, job_id=n, payload=b"x")
        try:
            job = worker.expect(JOB, timeout=1)
        except AssertionError:
            break
        worker.send(RESULT, job_id=job.job_id, payload=big)
        worker.send(READY)
        if stats(router.address)["masters"] == 0:
            break
    assert wait_for(lambda: stats(router.address)["masters"] == 0)
    # Other peers are unaffected.
    other = Peer(router.address, MASTER)
    other.send(SUBMIT, job_id=1, payload=b"x")
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"ok")
    assert other.expect(RESULT, 1).payload == b"ok"


def test_socket_file_is_0600(router):
    mode = stat.S_IMODE(os.stat(router.sock_path).st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_ISSOCK(os.stat(router.sock_path).st_mode)


@pytest.mark.parametrize("mode", [0o777, 0o750, 0o704, 0o720])
def test_refuses_directory_open_to_others(private_dir, mode):
    d = os.path.join(private_dir, "open")
    os.mkdir(d)
    os.chmod(d, mode)
    proc = subprocess.run(
        [fastrouter_binary(), "--listen", f"unix://{d}/router.sock", "--no-auth"],
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert b"refusing to listen" in proc.stderr and d.encode() in proc.stderr
    assert b"READY" not in proc.stdout
    assert not os.path.exists(os.path.join(d, "router.sock"))


def test_stale_socket_is_replaced(start_router, private_dir):
    stale = os.path.join(private_dir, "router0.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # bound, never listening: a stale file
    router = start_router()
    assert router.sock_path == stale
    Peer(router.address, MASTER).close()


def test_second_router_on_live_socket_refused(router):
    proc = subprocess.run(
        [fastrouter_binary(), "--listen", router.address, "--no-auth"], capture_output=True, timeout=10
    )
    assert proc.returncode == 2
    assert b"already listening" in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--listen", "unix://relative.sock"], b"--listen"),
        (["--listen", "http://x"], b"--listen"),
        (["--listen", "tcp://127.0.0.1:99999"], b"--listen"),
        (["--max-queue", "lots"], b"--max-queue"),
        (["--max-frame"], b"--max-frame"),
        (["--bogus"], b"--bogus"),
        ([], b"--listen"),
    ],
)
def test_bad_cli_args_exit_2(args, needle):
    proc = subprocess.run([fastrouter_binary(), *args], capture_output=True, timeout=10)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert proc.stderr.startswith(b"fastrouter: ")


def test_help_and_version():
    out = subprocess.run([fastrouter_binary(), "--help"], capture_output=True, timeout=10)
    assert out.returncode == 0 and b"--listen" in out.stdout
    out = subprocess.run([fastrouter_binary(), "--version"], capture_output=True, timeout=10)
    assert out.returncode == 0 and out.stdout.startswith(b"fastrouter ")


def test_tcp_port_zero(start_router):
    router = start_router(listen="tcp://127.0.0.1:0")
    assert router.address.startswith("tcp://127.0.0.1:")
    assert int(router.address.rsplit(":", 1)[1]) > 0
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=1, payload=b"tcp")
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"ok")
    assert master.expect(RESULT, 1).payload == b"ok"


def test_sigterm_drains_in_flight_and_answers_queued_jobs(router):
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=1, payload=b"in flight")
    job = worker.expect(JOB)
    master.send(SUBMIT, job_id=2, payload=b"queued")
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    router.proc.send_signal(signal.SIGTERM)
    # The queued job is answered at once; the socket is gone so no new peer can connect.
    assert master.expect(ERROR, 2).flags == SHUTDOWN
    assert wait_for(lambda: not os.path.exists(router.sock_path))
    # The job a worker already holds still completes, then the router exits.
    worker.send(RESULT, job_id=job.job_id, payload=b"finished during drain")
    assert master.expect(RESULT, 1).payload == b"finished during drain"
    assert router.proc.wait(5) == 0
    assert master.wait_closed()


def test_sigint_also_shuts_down(router):
    router.proc.send_signal(signal.SIGINT)
    assert router.proc.wait(5) == 0
    assert not os.path.exists(router.sock_path)


def test_shutdown_error_code(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"x")
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    router.proc.send_signal(signal.SIGTERM)
    err = master.expect(ERROR, 1)
    assert err.flags == SHUTDOWN
    assert router.proc.wait(5) == 0


def test_exits_when_parent_dies(private_dir):
    sock = os.path.join(private_dir, "child.sock")
    # A shell parent starts the router with --parent-pid $$ and then dies. The router's READY
    # line goes elsewhere, so the first line read is always the pid.
    script = (
        f'"{fastrouter_binary()}" --listen unix://{sock} --no-auth --parent-pid $$ --quiet >/dev/null & '
        "echo $!; sleep 0.5"
    )
    parent = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    child_pid = int(parent.stdout.readline())
    parent.wait(5)

    def gone():
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        # A zombie reparented to init counts as gone once it is reaped; check its state.
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    assert wait_for(gone, timeout=5)
    assert wait_for(lambda: not os.path.exists(sock), timeout=2)


def test_random_traffic_never_crashes_the_router(start_router):
    """Bounded fuzz: random frames and garbage from many peers; the router must keep serving."""
    import random

    router = start_router("--max-frame", "4096", "--max-queue", "50")
    rng = random.Random(1234)
    peers = []
    for _ in range(300):
        p = Peer(router.address, rng.choice([None, MASTER, WORKER]))
        kind = rng.random()
        try:
            if kind < 0.3:
                p.send_raw(rng.randbytes(rng.randrange(1, 64)))
            else:
                for _ in range(rng.randrange(1, 8)):
                    ftype = rng.choice([1, 2, 3, 5, 9, 11, rng.randrange(0, 256)])
                    payload = rng.randbytes(rng.choice([0, 1, 5, 100]))
                    p.send_raw(
                        struct.pack(
                            "<2sBBHHQII",
                            b"PR",
                            1,
                            ftype,
                            rng.choice([0, 0, 1, 2]),
                            0,
                            rng.randrange(0, 8),
                            rng.choice([0, 1, 5]),
                            len(payload),
                        )
                        + payload
                    )
        except OSError:
            pass  # the router may already have closed an offender
        if rng.random() < 0.5:
            p.close()
        else:
            peers.append(p)
    for p in peers:  # the router handles their traffic while they are connected, then their close
        p.wait_read_by_router()
    for p in peers:
        p.close()
    assert router.proc.poll() is None
    assert wait_for(lambda: (lambda s: s["masters"] == 0 and s["workers"] == 0)(stats(router.address)))
    master = Peer(router.address, MASTER)
    worker = ready_worker(router.address)
    master.send(SUBMIT, job_id=1, payload=b"still here", timeout_ms=5000)
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"yes")
    assert master.expect(RESULT, 1).payload == b"yes"
    s = stats(router.address)
    assert s["masters"] == 1 and s["workers"] == 1
