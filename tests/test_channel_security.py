"""Issue 9, the channel: keys from SECRET_KEY, sealed bodies end to end, the router handshake.

The seal format is checked against docs/security.md byte by byte (with an HKDF written here
from hmac, not the one the plugin uses); the refusals against real workers on a real router.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from parallel_render import keys, sealing

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
    import os
    import stat

    tmp_path.chmod(0o700)
    path = keys.write_router_key_file(str(tmp_path))
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    text = open(path).read()
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
    import socket

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
