"""The router trusts no one it has not authenticated (issue 9), over raw sockets.

Written from fastrouter/PROTOCOL.md "Handshake": the challenge-response keyed by
`--auth-key-file`, peer credentials on the Unix socket, the bounds before authentication
(64-byte frames, `--handshake-ms`, `--max-pending`) and after it (a buffer that grows with the
bytes received, `--frame-ms`, `--max-masters` / `--max-workers`), and the start-up refusals.
Every attack also checks that a healthy master and worker are still served.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fastrouter_wire import (
    AUTH,
    CHALLENGE,
    HELLO,
    JOB,
    MASTER,
    PROTOCOL_ERROR,
    READY,
    RESULT,
    STATS,
    SUBMIT,
    WORKER,
    Peer,
    RouterProofError,
    encode,
    fastrouter_binary,
    peer_proof,
    register_key,
    router_proof,
    stats,
    write_key_file,
)
from test_fastrouter import ready_worker, wait_for, wait_idle
from test_hardening import round_trip

DOC = (Path(__file__).resolve().parents[2] / "fastrouter" / "PROTOCOL.md").read_text()
NOBODY = 65534  # nobody / nogroup on Debian; the tests run as root and switch to it
MIB = 1 << 20


def doc_example(caption: str) -> bytes:
    match = re.search(re.escape(caption) + r"[^\n]*\n\n((?:    [0-9a-f ]+\n)+)", DOC)
    assert match, f"no example {caption!r} in PROTOCOL.md"
    return bytes.fromhex(match.group(1).replace("\n", " "))


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since start) of a process, in kB."""
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS:", "VmHWM:"))}


def header(ftype: int, length: int, job_id: int = 0) -> bytes:
    return struct.pack("<2sBBHHQII", b"PR", 1, ftype, 0, 0, job_id, 0, length)


def hello(role: int, np: bytes) -> bytes:
    return encode(HELLO, payload=bytes([role]) + np)


def refused(peer: Peer, needle: bytes, timeout: float = 2.0) -> bytes:
    """The peer is sent PROTOCOL_ERROR naming `needle` (after a CHALLENGE, if any) and closed."""
    frame = peer.recv(timeout)
    if frame.type == CHALLENGE:
        frame = peer.recv(timeout)
    assert frame.type == PROTOCOL_ERROR, frame
    assert needle in frame.payload, frame.payload
    assert peer.wait_closed(timeout)
    return frame.payload


def start_exit_2(*args: str) -> bytes:
    done = subprocess.run([fastrouter_binary(), *args], capture_output=True, timeout=10)
    assert done.returncode == 2, done
    assert b"READY" not in done.stdout
    assert done.stderr.startswith(b"fastrouter: "), done.stderr
    return done.stderr


@pytest.fixture
def key_file(private_dir):
    key = os.urandom(32)
    return key, write_key_file(os.path.join(private_dir, "test.key"), key)


# -- the handshake ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_authenticated_peers_are_served(start_router, transport):
    router = start_router(listen="tcp://127.0.0.1:0" if transport == "tcp" else None)
    assert router.key is not None
    round_trip(router.address)
    s = stats(router.address)
    assert s["auth"] is True
    assert s["auth_failures"] == s["peers_refused"] == s["handshake_timeouts"] == 0, s
    assert s["pending"] == 0 and s["evicted_pending"] == 0 and s["protocol_errors"] == 0, s


def test_protocol_md_handshake_examples(start_router, private_dir):
    """The three hex examples, checked with Python's hmac, and the HELLO accepted byte for byte."""
    key = bytes(range(32))
    np, nr = b"\x11" * 32, b"\x22" * 32
    example_hello = doc_example("HELLO from a master with its nonce")
    example_challenge = doc_example("CHALLENGE answering it")
    example_auth = doc_example("AUTH from the master")
    assert example_hello == hello(MASTER, np)
    assert example_challenge == encode(CHALLENGE, payload=nr + router_proof(key, MASTER, np, nr))
    assert example_auth == encode(AUTH, payload=peer_proof(key, MASTER, np, nr))
    assert router_proof(key, MASTER, np, nr).hex() in DOC and peer_proof(key, MASTER, np, nr).hex() in DOC
    # A router holding that key (its file as PROTOCOL.md describes it) takes that HELLO.
    path = os.path.join(private_dir, "doc.key")
    with open(path, "w") as f:
        f.write("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")
    os.chmod(path, 0o600)
    router = start_router("--auth-key-file", path, key=key)
    master = Peer(router.address)
    master.send_raw(example_hello)
    challenge = master.expect(CHALLENGE)
    got_nr, proof = challenge.payload[:32], challenge.payload[32:]
    assert got_nr != nr  # a fresh nonce from the kernel, not the example's
    assert proof == router_proof(key, MASTER, np, got_nr)
    master.send(AUTH, payload=peer_proof(key, MASTER, np, got_nr))
    worker = ready_worker(router.address)
    wait_idle(router.address, 1)
    master.send(SUBMIT, job_id=1, payload=b"doc")
    job = worker.expect(JOB)
    worker.send(RESULT, job_id=job.job_id, payload=b"ok")
    assert master.expect(RESULT, 1).payload == b"ok"


def test_auth_may_share_a_write_with_the_next_frames(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=3, payload=b"waiting", timeout_ms=5000)
    worker = Peer(router.address)
    np = os.urandom(32)
    worker.send_raw(hello(WORKER, np))
    nr = worker.expect(CHALLENGE).payload[:32]
    worker.send_raw(encode(AUTH, payload=peer_proof(router.key, WORKER, np, nr)) + encode(READY))
    job = worker.expect(JOB)
    assert job.payload == b"waiting"
    worker.send(RESULT, job_id=job.job_id, payload=b"done")
    assert master.expect(RESULT, 3).payload == b"done"


def test_wrong_proof_is_refused_counted_and_logged_once_without_the_key(router):
    liar = Peer(router.address)
    np = os.urandom(32)
    liar.send_raw(hello(WORKER, np))
    challenge = liar.expect(CHALLENGE)
    liar.send(AUTH, payload=peer_proof(os.urandom(32), WORKER, np, challenge.payload[:32]))
    liar.send(READY)
    refused(liar, b"authentication failed")
    round_trip(router.address)
    s = stats(router.address)
    assert s["auth_failures"] == 1 and s["protocol_errors"] == 1 and s["workers"] == 0, s
    err = router.stderr()
    assert err.count("protocol error") == 1
    assert router.key.hex() not in err


def test_a_flood_of_bad_proofs_is_logged_in_a_few_lines_and_a_count(router):
    """Each refused peer is one line, up to a burst of 20 and then 5 a second: an attacker who
    cannot get in cannot fill the operator's log either. The next line says what was left out."""

    def liar() -> None:
        peer = Peer(router.address)
        np = os.urandom(32)
        peer.send_raw(hello(WORKER, np))
        challenge = peer.expect(CHALLENGE)
        peer.send(AUTH, payload=peer_proof(os.urandom(32), WORKER, np, challenge.payload[:32]))
        refused(peer, b"authentication failed")
        peer.close()

    started = time.monotonic()
    for _ in range(150):
        liar()
    took = time.monotonic() - started
    round_trip(router.address)
    assert stats(router.address)["auth_failures"] == 150
    logged = router.stderr().count("protocol error")
    assert 20 <= logged <= 20 + 5 * took + 1, (logged, took)
    assert "left out" not in router.stderr()
    time.sleep(0.5)  # room for two more lines: the count of those left out comes with the next
    liar()
    round_trip(router.address)
    found = re.search(r"\((\d+) more messages about peers were left out", router.stderr())
    assert found and int(found.group(1)) == 150 - logged, router.stderr()


def test_a_peer_replaying_a_recorded_auth_is_refused(router):
    """An eavesdropper records a whole handshake; replayed on a new connection it fails (new Nr)."""
    np = os.urandom(32)
    honest = Peer(router.address)
    honest.send_raw(hello(MASTER, np))
    nr = honest.expect(CHALLENGE).payload[:32]
    recorded = encode(AUTH, payload=peer_proof(router.key, MASTER, np, nr))
    honest.send_raw(recorded)
    honest.send(STATS, job_id=1)
    assert honest.expect(STATS, 1)
    # Waiting for the CHALLENGE first, or sending it all in one write: refused either way.
    replay = Peer(router.address)
    replay.send_raw(hello(MASTER, np))
    assert replay.expect(CHALLENGE).payload[:32] != nr
    replay.send_raw(recorded + encode(STATS, 2))
    refused(replay, b"authentication failed")
    blind = Peer(router.address)
    blind.send_raw(hello(MASTER, np) + recorded + encode(SUBMIT, 1, b"x"))
    refused(blind, b"authentication failed")
    # Nor does the router's own proof pass as a peer's: the labels differ.
    mirror = Peer(router.address)
    mirror.send_raw(hello(MASTER, np))
    mirror.send(AUTH, payload=mirror.expect(CHALLENGE).payload[32:])
    refused(mirror, b"authentication failed")
    assert stats(router.address)["auth_failures"] == 3


def test_the_router_proves_it_holds_the_key(router):
    peer = Peer(router.address, MASTER)
    np_nr = peer.challenge.payload
    assert len(np_nr) == 64
    # The helper checked the proof against the right key; against another key it refuses.
    with pytest.raises(RouterProofError):
        Peer(router.address, MASTER, key=os.urandom(32))


def test_a_fake_router_with_a_wrong_proof_gets_no_auth(private_dir):
    """The peer's side of PROTOCOL.md step 2, as the wire helpers implement it: a listener that
    answers CHALLENGE without the key learns nothing; the peer closes without sending AUTH."""
    path = os.path.join(private_dir, "fake.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    received = []

    def fake_router():
        conn, _ = server.accept()
        conn.settimeout(2)
        received.append(conn.recv(4096))
        conn.sendall(encode(CHALLENGE, payload=os.urandom(32) + os.urandom(32)))
        data = b""
        try:
            while chunk := conn.recv(4096):
                data += chunk
        except OSError:
            pass
        received.append(data)
        conn.close()

    t = threading.Thread(target=fake_router)
    t.start()
    with pytest.raises(RouterProofError):
        Peer(f"unix://{path}", MASTER, key=os.urandom(32))
    t.join(5)
    server.close()
    assert len(received[0]) == 24 + 33 and received[0][3] == HELLO
    assert received[1] == b""  # no AUTH was sent, the connection was closed


def test_one_byte_hello_to_a_keyed_router_and_a_nonce_to_a_keyless_one(start_router):
    keyed = start_router()
    old = Peer(keyed.address, MASTER, key=None)  # the one-byte HELLO of earlier releases
    refused(old, b"authentication required")
    plain = start_router("--no-auth")
    assert stats(plain.address)["auth"] is False
    eager = Peer(plain.address)
    eager.send_raw(hello(MASTER, os.urandom(32)))
    refused(eager, b"this router has no key")
    round_trip(plain.address)  # the one-byte HELLO is the whole handshake there


@pytest.mark.parametrize(
    "first, reason",
    [
        (encode(STATS, 1), b"STATS before HELLO"),
        (encode(AUTH, payload=b"p" * 32), b"AUTH before HELLO"),
        (encode(SUBMIT, 1, b"x"), b"SUBMIT before HELLO"),
        (hello(MASTER, b"n" * 32) + encode(STATS, 1), b"STATS before AUTH"),
        (hello(MASTER, b"n" * 32) + encode(SUBMIT, 1, b"x"), b"SUBMIT before AUTH"),
        (hello(MASTER, b"n" * 32) + hello(MASTER, b"n" * 32), b"second HELLO"),
        (hello(MASTER, b"n" * 31), b"32-byte nonce"),
        (hello(3, b"n" * 32), b"role byte"),
        (hello(MASTER, b"n" * 32) + encode(AUTH, payload=b"p" * 31), b"authentication failed"),
    ],
)
def test_nothing_is_accepted_before_the_handshake(router, first, reason):
    offender = Peer(router.address)
    offender.send_raw(first)
    refused(offender, reason)
    assert stats(router.address)["protocol_errors"] == 1


def test_a_worker_that_has_not_authenticated_gets_no_job(router):
    master = Peer(router.address, MASTER)
    master.send(SUBMIT, job_id=1, payload=b"for workers who hold the key", timeout_ms=5000)
    assert wait_for(lambda: stats(router.address)["queued"] == 1)
    impostor = Peer(router.address)
    impostor.send_raw(hello(WORKER, os.urandom(32)) + encode(READY))
    payload = refused(impostor, b"READY before AUTH")
    assert b"for workers" not in payload + impostor.buf
    s = stats(router.address)
    assert s["queued"] == 1 and s["workers"] == 0 and s["in_flight"] == 0, s
    worker = ready_worker(router.address)
    job = worker.expect(JOB)
    assert job.payload == b"for workers who hold the key"
    worker.send(RESULT, job_id=job.job_id, payload=b"ok")
    assert master.expect(RESULT, 1).payload == b"ok"


# -- bounds before authentication ------------------------------------------------------------


def test_a_header_over_64_bytes_is_refused_before_its_payload(router):
    offender = Peer(router.address)
    offender.send_raw(header(HELLO, 65))  # the header alone: refused without waiting for bytes
    refused(offender, b"64 bytes before the handshake")


def _header_then_one_byte(peers: list[Peer], length: int) -> None:
    """Each peer sends a header announcing `length`, and, once the router has read them all, one
    byte of the payload: the second read is where a buffer sized from the header would grow.
    Returns once the router has read that byte too (or closed the connection)."""
    for data in (header(SUBMIT, length, job_id=1), b"x"):
        for p in peers:
            try:
                p.send_raw(data)
            except OSError:
                pass  # already refused and closed
        for p in peers:
            p.wait_read_by_router()


def _flood(address: str, n: int, length: int) -> list[Peer]:
    peers = [Peer(address) for _ in range(n)]
    _header_then_one_byte(peers, length)
    return peers


def _all_closed(peers: list[Peer], deadline: float) -> int:
    """How many of the peers saw the router close the connection before `deadline`."""
    closed = 0
    for p in peers:
        if p.wait_closed(max(0.0, deadline - time.monotonic())):
            closed += 1
        p.close()
    return closed


@pytest.mark.parametrize(
    "transport, n, length",
    [
        ("unix", 200, 16 * MIB),  # refused from the header at once
        ("unix", 200, 64),  # a legal length: waits, then the handshake deadline or eviction
        ("tcp", 16, 16 * MIB),
        ("tcp", 16, 64),
    ],
)
def test_unauthenticated_flood_costs_no_memory_and_ends_by_the_deadline(start_router, transport, n, length, capsys):
    router = start_router("--handshake-ms", "2000", listen="tcp://127.0.0.1:0" if transport == "tcp" else None)
    before = memory_kb(router.proc.pid)
    t0 = time.monotonic()
    peers = _flood(router.address, n, length)
    during = memory_kb(router.proc.pid)
    closed = _all_closed(peers, t0 + 2.0 + 1.5)
    after = memory_kb(router.proc.pid)
    growth_kb = max(during["VmRSS"], after["VmRSS"]) - before["VmRSS"]
    peak_kb = after["VmHWM"] - before["VmHWM"]
    with capsys.disabled():
        print(
            f"\n  {n} unauthenticated {transport} peers announcing {length} bytes: RSS {before['VmRSS']} kB before, "
            f"{during['VmRSS']} kB during, {after['VmRSS']} kB after; peak +{peak_kb} kB; {closed} closed "
            f"in {time.monotonic() - t0:.2f} s"
        )
    assert growth_kb < 64 * 1024 and peak_kb < 64 * 1024
    assert closed == n
    s = stats(router.address)
    assert s["pending"] == 0 and s["masters"] == 0, s
    assert s["protocol_errors"] == n, s  # each told why, once
    if length <= 64:  # a legal length waits for the handshake deadline, or room under --max-pending
        assert s["handshake_timeouts"] + s["evicted_pending"] == n, s
    round_trip(router.address)


@pytest.mark.parametrize("transport, n", [("unix", 200), ("tcp", 16)])
def test_authenticated_peers_announcing_16_mib_hold_only_what_they_sent(start_router, transport, n, capsys):
    """After the handshake the buffer grows with the bytes that arrive, and --frame-ms ends it."""
    router = start_router("--frame-ms", "1500", listen="tcp://127.0.0.1:0" if transport == "tcp" else None)
    peers = [Peer(router.address, MASTER) for _ in range(n)]
    assert wait_for(lambda: stats(router.address)["masters"] == n, timeout=10)
    before = memory_kb(router.proc.pid)
    t0 = time.monotonic()
    _header_then_one_byte(peers, 16 * MIB)
    during = memory_kb(router.proc.pid)
    assert stats(router.address)["masters"] == n  # still waiting for the rest of their frames
    closed = _all_closed(peers, t0 + 1.5 + 2.0)
    after = memory_kb(router.proc.pid)
    growth_kb = max(during["VmRSS"], after["VmRSS"]) - before["VmRSS"]
    with capsys.disabled():
        print(
            f"\n  {n} authenticated {transport} masters announcing 16 MiB: RSS {before['VmRSS']} kB before, "
            f"{during['VmRSS']} kB during, {after['VmRSS']} kB after; peak +{after['VmHWM'] - before['VmHWM']} kB; "
            f"{closed} closed in {time.monotonic() - t0:.2f} s"
        )
    assert growth_kb < 64 * 1024 and after["VmHWM"] - before["VmHWM"] < 64 * 1024
    assert closed == n
    s = stats(router.address)
    assert s["frame_timeouts"] == n and s["masters"] == 0, s
    round_trip(router.address)


def test_handshake_timeout(start_router):
    router = start_router("--handshake-ms", "300")
    idle_master = Peer(router.address, MASTER)
    silent = Peer(router.address)
    halfway = Peer(router.address)
    halfway.send_raw(hello(WORKER, os.urandom(32)))
    halfway.expect(CHALLENGE)
    t0 = time.monotonic()
    refused(silent, b"handshake timeout")
    refused(halfway, b"handshake timeout")
    assert 0.2 <= time.monotonic() - t0 < 2.0
    time.sleep(0.5)  # the point: the authenticated master idles well past --handshake-ms
    idle_master.send(STATS, job_id=5)  # and is still served
    assert json.loads(idle_master.expect(STATS, 5).payload)["handshake_timeouts"] == 2


def test_max_pending_closes_the_oldest_unauthenticated_connection(start_router):
    router = start_router("--max-pending", "4")
    pending = [Peer(router.address) for _ in range(4)]
    # stats() connects (a fifth unauthenticated connection: the oldest goes), then authenticates.
    assert wait_for(lambda: stats(router.address)["evicted_pending"] == 1)
    refused(pending[0], b"too many connections waiting to authenticate")
    newcomer = Peer(router.address)  # 3 were left: it fits
    newcomer.expect_nothing(0.1)
    latest = Peer(router.address)  # a fifth again: the oldest still waiting goes
    refused(pending[1], b"too many connections waiting to authenticate")
    for p in [*pending[2:], newcomer, latest]:
        p.expect_nothing(0.05)
        assert not p.eof
    # Those left can still complete the handshake.
    newcomer.handshake(MASTER, router.key)
    newcomer.send(STATS, job_id=1)
    s = json.loads(newcomer.expect(STATS, 1).payload)
    assert s["evicted_pending"] == 2 and s["pending"] == 3, s
    round_trip(router.address)


# -- bounds after authentication ---------------------------------------------------------------


def test_slowloris_partial_frame_is_closed_after_frame_ms_and_idle_peers_are_not(start_router):
    router = start_router("--frame-ms", "400", "--handshake-ms", "400")
    idle = Peer(router.address, MASTER)
    slow = Peer(router.address, MASTER)
    frame = encode(SUBMIT, 1, b"s" * 200, timeout_ms=10000)
    t0 = time.monotonic()
    slow.send_raw(frame[:30])
    # A byte every 50 ms: the same frame still arriving, so its deadline does not move.
    i = 30
    while i < 60 and not slow._fill(time.monotonic() + 0.05):
        slow.send_raw(frame[i : i + 1])
        i += 1
    elapsed = time.monotonic() - t0
    refused(slow, b"frame not completed in time")
    assert 0.35 <= elapsed < 1.5, elapsed
    # The idle master has outlived both deadlines and is still served.
    idle.send(SUBMIT, job_id=2, payload=b"after", timeout_ms=5000)
    worker = ready_worker(router.address)
    job = worker.expect(JOB)
    assert job.payload == b"after"
    s = stats(router.address)
    assert s["frame_timeouts"] == 1 and s["queued"] == 0, s


def _admitted(address: str, role: int) -> bool:
    """A new connection of this role completes the handshake and is served."""
    p = Peer(address, role)
    p.send(STATS, job_id=1)
    frame = p.recv()
    p.close()
    return frame.type == STATS


@pytest.mark.parametrize(
    "role, option, name", [(WORKER, "--max-workers", b"workers"), (MASTER, "--max-masters", b"masters")]
)
def test_connections_per_role_are_capped(start_router, role, option, name):
    router = start_router(option, "3")
    peers = [Peer(router.address, role) for _ in range(3)]
    extra = Peer(router.address, role)
    refused(extra, b"too many " + name + b" (" + option.encode() + b" 3)")
    peers[0].close()
    assert wait_for(lambda: _admitted(router.address, role))
    assert peers[1].wait_closed(0.1) is False  # the others were never disturbed


# -- peer credentials (SO_PEERCRED) ---------------------------------------------------------------


def _as_another_user(router, uid: int, gid: int, role: int | None) -> dict:
    """Connects from a child process that switched to uid/gid; returns what it saw.

    The router's private directory and socket are opened up first, as a misconfigured
    deployment would: the file modes are the first line of defence, this is the second."""
    os.chmod(os.path.dirname(router.sock_path), 0o711)
    os.chmod(router.sock_path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result: dict = {}
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            peer = Peer(router.address)
            if role is not None:
                try:
                    peer.handshake(role, router.key)
                    peer.send(STATS, job_id=7)
                except (AssertionError, OSError) as exc:
                    result["error"] = str(exc)
            frame = peer.recv(timeout=3)
            result.update(type=frame.type, payload=frame.payload.decode(errors="replace"))
            if frame.type == PROTOCOL_ERROR:
                result["closed"] = peer.wait_closed(3)
        except BaseException as exc:
            result.setdefault("error", repr(exc))
        finally:
            os.write(w, json.dumps(result).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.parametrize("auth", ["key", "no-auth"])
def test_a_peer_of_another_uid_is_refused_before_it_sends_anything(start_router, auth):
    router = start_router(*(["--no-auth"] if auth == "no-auth" else []))
    seen = _as_another_user(router, NOBODY, NOBODY, None)  # connects, sends nothing, listens
    assert seen["type"] == PROTOCOL_ERROR, seen
    assert seen["payload"].startswith(f"peer uid {NOBODY} gid {NOBODY} is not allowed"), seen
    assert seen["closed"]
    s = stats(router.address)
    assert s["peers_refused"] == 1 and s["pending"] == 0, s
    assert router.stderr().count("protocol error") == 1
    round_trip(router.address)


@pytest.mark.parametrize("option", ["--allow-uid", "--allow-gid"])
def test_allow_uid_and_allow_gid_let_another_user_in(start_router, option):
    router = start_router(option, "4242", option, str(NOBODY))  # repeatable
    seen = _as_another_user(router, NOBODY, NOBODY, MASTER)
    assert seen.get("type") == STATS and "error" not in seen, seen
    if option == "--allow-gid":
        # Only the listed gid lets that uid in: the same uid with another gid is refused.
        other = _as_another_user(router, NOBODY, 4243, None)
        assert other["type"] == PROTOCOL_ERROR and f"peer uid {NOBODY} gid 4243" in other["payload"], other
    assert stats(router.address)["peers_refused"] == (1 if option == "--allow-gid" else 0)


# -- start-up refusals ------------------------------------------------------------------------


def test_without_a_key_or_no_auth_the_router_refuses_to_start(private_dir, key_file):
    err = start_exit_2("--listen", f"unix://{private_dir}/r.sock")
    assert b"--auth-key-file" in err and b"--no-auth" in err
    err = start_exit_2("--listen", f"unix://{private_dir}/r.sock", "--no-auth", "--auth-key-file", key_file[1])
    assert b"contradict" in err
    assert not os.path.exists(f"{private_dir}/r.sock")


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:0", "tcp://0.0.0.0:0", "tcp://[::1]:0"])
def test_no_auth_is_refused_with_tcp(listen):
    assert b"--no-auth is refused with a tcp listener" in start_exit_2("--listen", listen, "--no-auth")


def test_a_non_loopback_address_is_warned_about_naming_it(start_router, key_file):
    router = start_router("--auth-key-file", key_file[1], "--quiet", listen="tcp://0.0.0.0:0", key=key_file[0])
    err = router.stderr()
    assert "WARNING" in err and "0.0.0.0" in err and "NOT a loopback address" in err, err
    port = int(router.address.rsplit(":", 1)[1])
    register_key(f"tcp://127.0.0.1:{port}", key_file[0])
    round_trip(f"tcp://127.0.0.1:{port}")
    # A name is resolved first; localhost resolves to loopback, so no warning.
    local = start_router("--auth-key-file", key_file[1], listen="tcp://localhost:0", key=key_file[0])
    assert "WARNING" not in local.stderr(), local.stderr()


def _key_case(private_dir: str, case: str) -> tuple[str, bytes]:
    path = os.path.join(private_dir, f"key-{case}")
    key = os.urandom(32)
    text = {
        "short": key.hex()[:63],
        "long": key.hex() + "0",
        "not-hex": "z" + key.hex()[1:],
        "two-newlines": key.hex() + "\n\n",
    }.get(case, key.hex() + "\n")
    if case == "directory":
        os.mkdir(path, 0o700)
        return path, b"not a regular file"
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    if case == "symlink":
        link = path + ".link"
        os.symlink(path, link)
        return link, b"symbolic link"
    if case.startswith("mode-"):
        os.chmod(path, int(case[5:], 8))
        return path, b"chmod 600"
    if case == "other-owner":
        os.chown(path, NOBODY, NOBODY)
        return path, b"owned by uid 65534"
    return path, b"64 hexadecimal characters"


@pytest.mark.parametrize(
    "case",
    [
        "mode-0644",
        "mode-0640",
        "mode-0604",
        "mode-0700",
        "symlink",
        "short",
        "long",
        "not-hex",
        "two-newlines",
        "other-owner",
        "directory",
    ],
)
def test_a_key_file_that_is_not_private_and_exact_is_refused(private_dir, case):
    path, needle = _key_case(private_dir, case)
    err = start_exit_2("--listen", f"unix://{private_dir}/r.sock", "--auth-key-file", path)
    assert needle in err, err
    assert b"--auth-key-file" in err
    with open(os.path.realpath(path) if case != "directory" else os.devnull, "rb") as f:
        secret = f.read().strip()
    assert not secret or secret[:16] not in err  # the key is never echoed


def test_a_key_file_of_mode_0400_is_accepted(start_router, private_dir):
    key = os.urandom(32)
    path = write_key_file(os.path.join(private_dir, "ro.key"), key)
    os.chmod(path, 0o400)
    router = start_router("--auth-key-file", path, key=key)
    round_trip(router.address)


def test_directories_owned_by_another_uid_are_refused(private_dir):
    theirs = os.path.join(private_dir, "theirs")
    os.mkdir(theirs, 0o700)
    os.chown(theirs, NOBODY, NOBODY)
    err = start_exit_2("--listen", f"unix://{theirs}/router.sock", "--no-auth")
    assert b"refusing to listen in " + theirs.encode() in err and b"owned by uid 65534" in err, err
    assert not os.path.exists(os.path.join(theirs, "router.sock"))
    err = start_exit_2("--listen", f"unix://{private_dir}/r.sock", "--no-auth", "--status-file", f"{theirs}/page")
    assert b"refusing to write the status file in " + theirs.encode() in err and b"owned by uid 65534" in err, err
    assert not os.path.exists(f"{private_dir}/r.sock")


def test_auth_token_file_is_gone():
    with tempfile.TemporaryDirectory() as d:
        err = start_exit_2("--listen", f"unix://{d}/r.sock", "--auth-token-file", "/x")
    assert b"replaced by --auth-key-file" in err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--handshake-ms", "0"),
        ("--frame-ms", "0"),
        ("--max-pending", "0"),
        ("--max-masters", "0"),
        ("--max-workers", "x"),
        ("--allow-uid", "-1"),
        ("--allow-gid", "4294967295"),
    ],
)
def test_bad_bound_options_exit_2(private_dir, option, value):
    assert option.encode() in start_exit_2("--listen", f"unix://{private_dir}/r.sock", "--no-auth", option, value)
