"""Issue 9, the channel: keys from SECRET_KEY, sealed bodies end to end, the router handshake.

The seal format is checked against docs/security.md byte by byte (with an HKDF written here
from hmac, not the one the plugin uses); the refusals against real workers on a real router.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from django.test import Client, override_settings

from parallel_render import conf, keys, policy, sealing
from parallel_render import protocol as p
from parallel_render.client import HandshakeError, RouterClient, RouterUnavailable, open_connection, warn_if_exposed
from parallel_render.cluster import LocalCluster, child_env, worker_command
from parallel_render.testing import parallel_workers, serially
from tests.conftest import block_pids, rescued
from tests.processes import stop

SITE_KEY = "tests-not-secret"  # tests/settings.py


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with no salt (a salt of HashLen zero bytes), from hmac alone."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


# -- keys ---------------------------------------------------------------------------------------


def test_the_keys_are_hkdf_of_the_secret_key_with_one_label_each(settings):
    assert keys.router_auth_key() == hkdf_sha256(SITE_KEY.encode(), b"parallel_render router-auth v1")
    assert keys.job_seal_key() == hkdf_sha256(SITE_KEY.encode(), b"parallel_render job-seal v1")
    assert keys.router_auth_key() != keys.job_seal_key()
    settings.SECRET_KEY = "another site"
    assert keys.job_seal_key() == hkdf_sha256(b"another site", b"parallel_render job-seal v1")
    assert keys.router_auth_key() == hkdf_sha256(b"another site", b"parallel_render router-auth v1")


def test_the_router_key_file_holds_64_hex_characters_and_is_private(tmp_path):
    import stat

    tmp_path.chmod(0o700)
    path = keys.write_router_key_file(str(tmp_path))
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    text = Path(path).read_text()
    assert text == keys.router_auth_key().hex() + "\n" and len(text.strip()) == 64
    # Written again (a router restarting): a fresh file, never through a link someone left there.
    os.unlink(path)
    os.symlink(str(tmp_path / "elsewhere"), path)
    keys.write_router_key_file(str(tmp_path))
    assert not os.path.islink(path) and not (tmp_path / "elsewhere").exists()


# -- the sealed body ----------------------------------------------------------------------------

BINDING = sealing.node_binding("tcp://127.0.0.1:7878")


def test_the_sealed_body_is_laid_out_as_documented():
    identity, nonce, expiry = bytes(range(16)), bytes(range(100, 112)), 1_700_000_000_123
    sealed = sealing.sealer(BINDING).seal(sealing.KIND_JOB, identity, expiry, b"the body", nonce)
    assert len(sealed) == 38 + len(b"the body") + 16
    assert sealed[0] == 1  # version
    assert sealed[1] == 1  # kind: job
    assert struct.unpack("<Q", sealed[2:10])[0] == expiry
    assert sealed[10:26] == identity
    assert sealed[26:38] == nonce
    # ChaCha20-Poly1305 under the job-seal key, AAD = header bytes 0-25 ‖ node binding.
    aead = ChaCha20Poly1305(hkdf_sha256(SITE_KEY.encode(), b"parallel_render job-seal v1"))
    assert aead.decrypt(nonce, sealed[38:], sealed[:26] + b"tcp://127.0.0.1:7878") == b"the body"
    assert sealing.sealer(BINDING).open(sealed, sealing.KIND_JOB) == (sealing.KIND_JOB, expiry, identity, b"the body")


def test_a_unix_binding_names_the_host(monkeypatch):
    assert sealing.node_binding("unix:///run/app/router.sock") == b"unix:///run/app/router.sock\0" + socket.gethostname().encode()
    sealed, _identity, _expiry = sealing.seal_job(sealing.node_binding("unix:///run/app/router.sock"), b"x", 1.0)
    # The same socket path on another machine of the fleet is another node.
    monkeypatch.setattr(socket, "gethostname", lambda: "another-machine")
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(sealing.node_binding("unix:///run/app/router.sock")).open(sealed, sealing.KIND_JOB)


def test_every_job_gets_a_fresh_identity_and_nonce_and_the_expiry_of_its_deadline():
    before = time.time()
    first, identity1, expiry1 = sealing.seal_job(BINDING, b"same", 2.0)
    second, identity2, _expiry2 = sealing.seal_job(BINDING, b"same", 2.0)
    assert identity1 != identity2 and first[26:38] != second[26:38] and first[38:] != second[38:]
    assert (before + 2.0 + sealing.EXPIRY_GRACE) * 1000 - 1 <= expiry1 <= (time.time() + 2.0 + sealing.EXPIRY_GRACE) * 1000


@pytest.mark.parametrize("offset", [0, 1, 2, 9, 10, 25, 26, 37, 38, -17, -16, -1])
def test_any_altered_byte_does_not_open(offset):
    sealed = bytearray(sealing.sealer(BINDING).seal(sealing.KIND_JOB, b"i" * 16, 2**40, b"some job body"))
    sealed[offset] ^= 0x01
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(BINDING).open(bytes(sealed), sealing.KIND_JOB)


def test_another_node_another_kind_another_key_or_a_short_body_does_not_open(settings):
    sealed = sealing.sealer(BINDING).seal(sealing.KIND_JOB, b"i" * 16, 2**40, b"body")
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(sealing.node_binding("tcp://127.0.0.1:7879")).open(sealed, sealing.KIND_JOB)
    with pytest.raises(sealing.Unopenable):  # a job never passes for a result
        sealing.sealer(BINDING).open(sealed, sealing.KIND_RESULT)
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(BINDING).open(sealed[:53], sealing.KIND_JOB)
    with pytest.raises(sealing.Unopenable):
        sealing.sealer(BINDING).open(b"", sealing.KIND_RESULT)
    settings.SECRET_KEY = "another site"
    with pytest.raises(sealing.Unopenable, match="another SECRET_KEY"):
        sealing.sealer(BINDING).open(sealed, sealing.KIND_JOB)


def test_a_result_opens_only_for_its_own_job():
    _sealed, identity, expiry = sealing.seal_job(BINDING, b"job", 1.0)
    job = sealing.Opened(sealing.KIND_JOB, expiry, identity, b"job")
    result = sealing.seal_result(BINDING, job, b"html")
    assert result[1] == sealing.KIND_RESULT and result[10:26] == identity
    assert sealing.open_result(BINDING, result, identity, expiry) == b"html"
    with pytest.raises(sealing.WrongIdentity):
        sealing.open_result(BINDING, result, b"x" * 16, expiry)
    with pytest.raises(sealing.WrongIdentity):
        sealing.open_result(BINDING, result, identity, expiry + 1)


# -- the worker's replay guard ------------------------------------------------------------------


def opened(identity: bytes, expiry_ms: int) -> sealing.Opened:
    return sealing.Opened(sealing.KIND_JOB, expiry_ms, identity, b"")


def test_the_guard_admits_a_job_once_and_never_after_its_expiry():
    guard = sealing.ReplayGuard()
    now = 1_000_000_000
    guard.admit(opened(b"a" * 16, now + 5000), now)
    with pytest.raises(sealing.Replayed):
        guard.admit(opened(b"a" * 16, now + 5000), now + 10)
    guard.admit(opened(b"b" * 16, now + 5000), now + 10)
    with pytest.raises(sealing.Expired):
        guard.admit(opened(b"c" * 16, now - 1), now)
    # Past their expiry the identities are forgotten, and a replay is refused as expired.
    assert len(guard) == 2
    guard.admit(opened(b"d" * 16, now + 20000), now + 7000)
    assert len(guard) == 1
    with pytest.raises(sealing.Expired):
        guard.admit(opened(b"a" * 16, now + 5000), now + 7000)


def test_the_guard_is_bounded_and_refuses_rather_than_forget():
    guard = sealing.ReplayGuard(limit=3)
    now = 5_000_000
    for k in range(3):
        guard.admit(opened(bytes([k]) * 16, now + 1000), now)
    with pytest.raises(sealing.TooManySeen):
        guard.admit(opened(b"z" * 16, now + 1000), now)
    with pytest.raises(sealing.Replayed):  # still remembered
        guard.admit(opened(b"\0" * 16, now + 1000), now)
    guard.admit(opened(b"z" * 16, now + 9000), now + 2000)  # the first three expired
    assert len(guard) == 1


# -- the handshake, against a stand-in of the router's side ---------------------------------------



def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_frame(sock: socket.socket) -> p.Frame:
    head = read_exactly(sock, p.HEADER_SIZE)
    (frame,) = p.FrameReader().feed(head + read_exactly(sock, p.HEADER.unpack(head)[-1]))
    return frame


class FakeRouter:
    """A Unix listener that speaks the router's side of the handshake, and nothing more.

    mode "right": a CHALLENGE with the right proof (for key), then checks the peer's AUTH;
    "wrong proof": a CHALLENGE whose proof is random bytes, followed by `lure` (say, a JOB);
    "protocol error": PROTOCOL_ERROR `reason` instead of a CHALLENGE. Each conversation is
    recorded: the peer's role, whether its AUTH was right, and every byte it sent after HELLO.
    """

    def __init__(self, mode: str, key: bytes | None = None, lure: bytes = b"", reason: str = "") -> None:
        self.mode, self.key, self.lure, self.reason = mode, key or keys.router_auth_key(), lure, reason
        self.dir = tempfile.mkdtemp(prefix="prfake-")
        self.address = f"unix://{self.dir}/router.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{self.dir}/router.sock")
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.conversations: list[dict] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        record: dict = {"after": b"", "closed": False}
        self.conversations.append(record)
        conn.settimeout(1.0)
        try:
            hello = read_frame(conn)
            record["role"], mine = p.decode_hello(hello.payload)
            if self.mode == "protocol error":
                conn.sendall(p.encode(p.PROTOCOL_ERROR, payload=self.reason.encode()))
                return
            theirs = os.urandom(32)
            proof = p.router_proof(self.key, record["role"], mine, theirs) if self.mode == "right" else os.urandom(32)
            conn.sendall(p.encode_challenge(theirs, proof) + self.lure)
            record["expected_auth"] = p.peer_proof(self.key, record["role"], mine, theirs)
            while chunk := conn.recv(65536):
                record["after"] += chunk
            record["closed"] = True
        except ConnectionResetError:  # closed with our lure unread
            record["closed"] = True
        except (OSError, EOFError):
            pass
        finally:
            conn.close()

    def auth_ok(self, record: dict) -> bool:
        return record["after"][: p.HEADER_SIZE + 32] == p.encode_auth(record.get("expected_auth", b"\0" * 32))

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def fake_router():
    made: list[FakeRouter] = []

    def make(*args, **kwargs) -> FakeRouter:
        made.append(FakeRouter(*args, **kwargs))
        return made[-1]

    yield make
    for router in made:
        router.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_the_proofs_are_the_documented_hmacs():
    key, np_, nr = b"k" * 32, b"p" * 32, b"r" * 32
    assert p.router_proof(key, 2, np_, nr) == hmac.new(key, b"PR-AUTH1 router\0\x02" + np_ + nr, hashlib.sha256).digest()
    assert p.peer_proof(key, 1, np_, nr) == hmac.new(key, b"PR-AUTH1 peer\0\x01" + np_ + nr, hashlib.sha256).digest()
    hello = p.encode_hello(p.ROLE_WORKER, np_)
    assert hello[3] == p.HELLO and hello[p.HEADER_SIZE:] == b"\x02" + np_
    assert p.encode_challenge(nr, b"x" * 32)[3] == p.CHALLENGE == 14
    assert p.encode_auth(b"y" * 32)[3] == p.AUTH == 15
    (frame,) = p.FrameReader().feed(p.encode_challenge(nr, b"x" * 32))
    assert p.decode_challenge(frame.payload) == (nr, b"x" * 32)


def test_a_peer_proves_the_key_and_sends_its_next_frames_with_auth(fake_router):
    router = fake_router("right")
    sock = open_connection(p.parse_address(router.address), p.ROLE_WORKER, p.encode(p.READY))
    wait_for(lambda: router.conversations and len(router.conversations[0]["after"]) >= p.HEADER_SIZE * 2 + 32)
    sock.close()
    (talk,) = router.conversations
    assert talk["role"] == p.ROLE_WORKER and router.auth_ok(talk)
    assert talk["after"][p.HEADER_SIZE + 32:] == p.encode(p.READY)


def test_a_router_without_the_key_is_refused_and_named(fake_router):
    router = fake_router("wrong proof")
    with pytest.raises(HandshakeError, match=re.escape(f"the router at {router.address} does not hold this site's key (different SECRET_KEY?)")):
        open_connection(p.parse_address(router.address), p.ROLE_MASTER, p.encode(p.STATS, 1))
    wait_for(lambda: router.conversations and router.conversations[0]["closed"])
    assert router.conversations[0]["after"] == b""  # no AUTH, nothing else: the peer closed


def test_a_router_with_another_sites_key_is_refused_too(fake_router):
    router = fake_router("right", key=keys.derive("another site", keys.ROUTER_AUTH_INFO))
    with pytest.raises(HandshakeError, match="does not hold this site's key"):
        open_connection(p.parse_address(router.address), p.ROLE_MASTER)


def test_a_protocol_error_during_the_handshake_says_the_routers_reason(fake_router, caplog):
    router = fake_router("protocol error", reason="peer uid 1234 gid 1234 is not allowed (see --allow-uid)")
    client = RouterClient(router.address)
    with caplog.at_level("ERROR", logger="parallel_render"):
        with pytest.raises(RouterUnavailable, match=r"refused the handshake: peer uid 1234 gid 1234 is not allowed"):
            client.submit(b"x", 1.0)
    assert f"the router at {router.address} refused the handshake: peer uid 1234" in caplog.text


# -- a router that does not hold the key, with a real master and a real worker --------------------


@contextlib.contextmanager
def worker_process(address: str, log_path: str, db_name: str | None = None):
    """One real `manage.py parallel_worker` for address, its stderr (its log) in log_path."""
    extra = ["--db-name", f"default={db_name}"] if db_name else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(worker_command(address, extra=extra), env=child_env(), stdin=subprocess.DEVNULL, stderr=log)
    try:
        yield proc
    finally:
        stop(proc)


def use_router(monkeypatch, address: str) -> None:
    monkeypatch.setenv(conf.ENV_ROUTER, address)
    conf.get_config.cache_clear()


@pytest.fixture
def restore_config():
    yield
    conf.get_config.cache_clear()


def test_a_master_renders_inline_when_the_router_does_not_prove_the_key(db, fake_router, monkeypatch, caplog, restore_config):
    router = fake_router("wrong proof")
    with serially():
        serial = Client().get("/p/leak/?marker=fk&n=2")
    use_router(monkeypatch, router.address)
    with caplog.at_level("WARNING", logger="parallel_render"):
        response = Client().get("/p/leak/?marker=fk&n=2")
    assert response.content == serial.content
    assert block_pids(response) == []
    assert f"the router at {router.address} does not hold this site's key (different SECRET_KEY?)" in caplog.text
    assert all(talk["after"] == b"" for talk in router.conversations)  # never authenticated, never submitted


def test_a_worker_refuses_to_work_for_a_router_without_the_key(fake_router, tmp_path):
    # The stranger even offers a job right after its CHALLENGE.
    job, _identity, _expiry = sealing.seal_job(sealing.node_binding("unix:///x"), b"{}", 5.0)
    lure = p.encode(p.JOB, 1, job, timeout_ms=5000)
    router = fake_router("wrong proof", lure=lure)
    log = tmp_path / "worker.log"
    with worker_process(router.address, str(log)):
        wait_for(lambda: any(talk["closed"] for talk in router.conversations), timeout=60)
        wait_for(lambda: "does not hold this site's key" in log.read_text(), timeout=10)
    for talk in router.conversations:
        if talk["closed"]:
            assert talk["role"] == p.ROLE_WORKER and talk["after"] == b""  # no AUTH, no READY, no RESULT
    text = log.read_text()
    assert f"the router at {router.address} does not hold this site's key (different SECRET_KEY?); not working for it" in text
    assert text.count("does not hold this site's key") == 1  # said once, however often it retries


# -- refusals by real workers, on a real router ---------------------------------------------------


def test_a_job_sealed_with_another_secret_key_is_refused_by_the_worker_and_rendered_inline(
    transactional_db, tmp_path, monkeypatch, restore_config
):
    from django.conf import settings

    log = tmp_path / "worker.log"
    with LocalCluster(0) as router, worker_process(router.address, str(log), settings.DATABASES["default"]["NAME"]) as worker:
        wait_for(lambda: RouterClient(router.address).stats()["workers_idle"] == 1, timeout=30)
        use_router(monkeypatch, router.address)
        client = Client()
        assert block_pids(client.get("/p/leak/?marker=k1&n=2")) == [worker.pid] * 3  # connected, as this site
        with serially():
            serial = client.get("/p/leak/?marker=secretk2&n=2")
        with override_settings(SECRET_KEY="another site"):  # the connection stays; the seal changes
            response = client.get("/p/leak/?marker=secretk2&n=2")
        assert response.content == serial.content
        assert block_pids(response) == []
        assert rescued(response) and all("too short for a sealed body" in why for why in rescued(response))
        # The next page, sealed as this site again, goes to the worker as before.
        assert block_pids(client.get("/p/leak/?marker=k3&n=2")) == [worker.pid] * 3
    text = log.read_text()
    assert "refused a job (does not open)" in text
    assert text.count("refused a job (does not open)") == 1  # once per kind
    assert "secretk2" not in text  # never the payload


def test_an_expired_job_is_refused_by_the_worker(parallel, monkeypatch):
    with serially():
        serial = Client().get("/p/leak/?marker=ex&n=2")
    monkeypatch.setattr(sealing, "EXPIRY_GRACE", -60.0)  # sealed to expire a minute before its deadline
    response = Client().get("/p/leak/?marker=ex&n=2")
    assert response.content == serial.content
    assert block_pids(response) == []
    assert rescued(response) and all(why == "worker error: the worker refused the job: expired" for why in rescued(response))


def raw_submit(address: str, payload: bytes, timeout_ms: int = 5000) -> p.Frame:
    """SUBMIT payload on a master connection of its own (authenticated as this site); its answer."""
    sock = open_connection(p.parse_address(address), p.ROLE_MASTER, p.encode(p.SUBMIT, 1, payload, timeout_ms=timeout_ms), 10.0)
    try:
        reader = p.FrameReader()
        while True:
            data = sock.recv(1 << 20)
            assert data, "the router closed the connection"
            for frame in reader.feed(data):
                if frame.job_id == 1 and frame.type in (p.RESULT, p.ERROR, p.TIMEOUT, p.BUSY):
                    return frame
    finally:
        sock.close()


def test_a_replayed_job_is_refused_by_the_worker(transactional_db, monkeypatch, restore_config):
    submitted: list[bytes] = []
    submit = RouterClient.submit

    def capture(self, payload, *args, **kwargs):
        submitted.append(payload)
        return submit(self, payload, *args, **kwargs)

    with parallel_workers(1) as cluster:
        monkeypatch.setattr(RouterClient, "submit", capture)
        response = Client().get("/p/leak/?marker=rp&n=0")  # one block: the title
        assert block_pids(response) == cluster.worker_pids
        (job,) = submitted
        answer = raw_submit(cluster.address, job)
    assert answer.type == p.RESULT
    binding = sealing.node_binding(cluster.address)
    result = sealing.sealer(binding).open(answer.payload, sealing.KIND_RESULT)
    assert result.identity == job[10:26]  # the refusal is the replayed job's, and opens for its master
    import orjson

    body = orjson.loads(result.body)
    assert body["ok"] is False and body["error"] == "the worker refused the job: replayed" and "html" not in body


class SwappingWorkers:
    """Worker peers that hold both keys and answer each job with a result sealed under another
    job's identity (its HTML "EVIL", its nonce the right one): only the identity check stops it."""

    def __init__(self, address: str, count: int) -> None:
        self.address, self.count = address, count
        self.binding = sealing.node_binding(address)
        self.jobs: list[tuple[socket.socket, p.Frame, sealing.Opened]] = []
        self.lock = threading.Lock()
        self.all_in = threading.Event()
        self.socks = [open_connection(p.parse_address(address), p.ROLE_WORKER, p.encode(p.READY), 10.0) for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(sock,), daemon=True) for sock in self.socks]
        for thread in self.threads:
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        import orjson

        try:
            frame = next(f for f in iter(lambda: read_frame(sock), None) if f.type == p.JOB)
        except (OSError, EOFError):
            return
        job = sealing.sealer(self.binding).open(frame.payload, sealing.KIND_JOB)
        with self.lock:
            self.jobs.append((sock, frame, job))
            mine = len(self.jobs) - 1
            if len(self.jobs) == self.count:
                self.all_in.set()
        if not self.all_in.wait(5):
            return
        other = self.jobs[(mine + 1) % self.count][2]
        nonce = orjson.loads(job.body)["n"]
        body = orjson.dumps({"ok": True, "html": "EVIL", "nested": 0, "n": nonce, "ms": 0.1, "pid": 1})
        sock.sendall(p.encode(p.RESULT, frame.job_id, sealing.seal_result(self.binding, other, body)))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def test_a_result_sealed_for_another_job_is_refused_by_the_master(transactional_db, monkeypatch, caplog, restore_config):
    monkeypatch.setattr(policy, "BATCH_MS", 0.0)  # a job per block, however cheap
    with serially():
        serial = Client().get("/p/leak/?marker=sw&n=2")
    with LocalCluster(0) as router:
        workers = SwappingWorkers(router.address, 3)
        try:
            wait_for(lambda: RouterClient(router.address).stats()["workers_idle"] == 3)
            use_router(monkeypatch, router.address)
            with caplog.at_level("WARNING", logger="parallel_render"):
                response = Client().get("/p/leak/?marker=sw&n=2")
        finally:
            workers.close()
    assert len(workers.jobs) == 3
    assert response.content == serial.content and b"EVIL" not in response.content
    assert rescued(response) == ["bad result: the result is sealed for another job"] * 3
    assert "master refused the result of block t/leak.html:1 (another job's identity)" in caplog.text


class KeyOnlyWorker:
    """A worker peer with the router's key and not the seal key (what the router itself holds):
    it keeps every JOB payload it is given and answers each with an empty RESULT."""

    def __init__(self, address: str) -> None:
        self.sock = open_connection(p.parse_address(address), p.ROLE_WORKER, p.encode(p.READY), 10.0)
        self.sock.settimeout(None)
        self.payloads: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                frame = read_frame(self.sock)
                if frame.type == p.JOB:
                    self.payloads.append(frame.payload)
                    self.sock.sendall(p.encode(p.RESULT, frame.job_id) + p.encode(p.READY))
        except (OSError, EOFError):
            return

    def close(self) -> None:
        self.sock.close()
        self.thread.join(2)


def test_the_router_sees_only_ciphertext(transactional_db, monkeypatch, restore_config):
    import orjson

    marker = "PlainMarker-7f3a"
    with serially():
        serial = Client().get(f"/p/leak/?marker={marker}&n=3&title={marker}-title")
    with LocalCluster(0) as router:
        spy = KeyOnlyWorker(router.address)
        try:
            wait_for(lambda: RouterClient(router.address).stats()["workers_idle"] == 1)
            use_router(monkeypatch, router.address)
            response = Client().get(f"/p/leak/?marker={marker}&n=3&title={marker}-title")
            wait_for(lambda: spy.payloads)
        finally:
            spy.close()
    assert response.content == serial.content  # every block rescued: the empty answers do not open
    opened = []
    for payload in spy.payloads:
        for plain in (marker.encode(), b"t/leak.html", b'"env"', b"Europe/Paris"):
            assert plain not in payload
        # ... while whoever holds the seal key reads the context in it.
        opened.append(orjson.loads(sealing.sealer(sealing.node_binding(router.address)).open(payload, sealing.KIND_JOB).body))
    assert marker in orjson.dumps(opened).decode()


# -- start-up: the key file, and a router that is not on loopback ---------------------------------


@pytest.mark.parametrize("address", [None, "tcp://127.0.0.1:0"])
def test_the_router_is_started_with_the_key_in_a_private_file_it_reads_once(address):
    with LocalCluster(0, address=address) as cluster:
        assert cluster.router is not None
        argv = Path(f"/proc/{cluster.router.pid}/cmdline").read_bytes().split(b"\0")
        path = argv[argv.index(b"--auth-key-file") + 1].decode()
        assert not os.path.exists(path)  # removed once the router had read it
        # Peers of this site get in; the router proved the key to them.
        assert RouterClient(cluster.address).stats()["masters"] == 1  # this STATS connection


def test_a_tcp_router_off_loopback_is_a_warning_decided_on_the_resolved_address(monkeypatch, caplog):
    from parallel_render import client

    monkeypatch.setattr(client, "_exposure_checked", set())
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host == "router.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with caplog.at_level("WARNING", logger="parallel_render"):
        for quiet in ("tcp://127.0.0.1:7878", "tcp://localhost:7878", "tcp://[::1]:7878", "unix:///run/x.sock"):
            warn_if_exposed(p.parse_address(quiet))
        assert caplog.text == ""
        warn_if_exposed(p.parse_address("tcp://router.internal:7878"))
        warn_if_exposed(p.parse_address("tcp://192.0.2.1:7878"))
        warn_if_exposed(p.parse_address("tcp://192.0.2.1:7878"))  # once per address
    assert caplog.text.count("jobs are sealed end to end; headers travel in the clear") == 2
    assert "tcp://router.internal:7878 resolves to 10.1.2.3, not a loopback address" in caplog.text
    assert "192.0.2.1" in caplog.text


def test_the_fastrouter_command_gives_the_router_the_key_of_this_site(tmp_path):
    import stat
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tmp_path.chmod(0o700)
    address = f"unix://{tmp_path}/r.sock"
    env = dict(child_env(), DJANGO_SETTINGS_MODULE="tests.settings")
    proc = subprocess.Popen([sys.executable, "-m", "django", "fastrouter", "--listen", address], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().decode().strip() == f"READY {address}"
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        key_file = argv[argv.index(b"--auth-key-file") + 1].decode()
        assert os.path.dirname(key_file) == str(tmp_path)  # the socket's private directory
        info = os.lstat(key_file)
        assert stat.S_IMODE(info.st_mode) == 0o600 and Path(key_file).read_text().strip() == keys.router_auth_key().hex()
        assert RouterClient(address).stats()["masters"] == 1  # this STATS connection: this site's peers get in
    finally:
        proc.terminate()
        proc.communicate(timeout=5)  # waits, and closes the pipe
