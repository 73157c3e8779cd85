"""Sealed job and result bodies (docs/security.md, "Sealed bodies").

Every job a master submits and every result a worker returns travels sealed with
ChaCha20-Poly1305 under the job-seal key (keys.job_seal_key(), which the router never has):

    offset size field
         0    1 version, 1
         1    1 kind: 1 job, 2 result
         2    8 expiry: the job's deadline, wall-clock ms since the Unix epoch, u64 LE
        10   16 job identity: 16 random bytes the master chooses per job
        26   12 nonce: 12 random bytes, fresh for every sealed body
        38    … ciphertext and 16-byte tag

The associated data is bytes 0-25 followed by the node binding (node_binding()). A result
carries its job's identity and expiry: a worker refuses a job that does not open, has
expired or was seen before (ReplayGuard); a master refuses a result that does not open or
carries another job's identity.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from parallel_render import keys

logger = logging.getLogger("parallel_render")

VERSION = 1
KIND_JOB = 1
KIND_RESULT = 2
PREFIX = struct.Struct("<BBQ16s")  # version, kind, expiry, identity: the authenticated header
PREFIX_SIZE = PREFIX.size  # 26
IDENTITY_SIZE = 16
NONCE_SIZE = 12
HEADER_SIZE = PREFIX_SIZE + NONCE_SIZE  # 38
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 54 bytes a sealed body adds to its plaintext

# A job's seal stays valid this long past the job's own deadline: masters and workers read
# the same clock on one node; the margin covers a tcp:// router's peers on other machines.
EXPIRY_GRACE = 1.0

# Identities a worker remembers at most (until their expiry): about 100 bytes each, so at most
# about 6.5 MB per worker. A worker that would need more refuses jobs (the master renders them)
# rather than forget an identity early. With the default TIMEOUT (10 s, + 1 s of grace) that is
# ~6,000 jobs a second per worker, several times what one core renders of blocks worth sending.
MAX_SEEN = 65536


class Refused(Exception):
    """A sealed body that is not accepted; `kind` names the reason, one log line per kind."""

    kind = "refused"


class Unopenable(Refused):
    kind = "does not open"


class Expired(Refused):
    kind = "expired"


class Replayed(Refused):
    kind = "replayed"


class TooManySeen(Refused):
    kind = "replay cache full"


class WrongIdentity(Refused):
    kind = "another job's identity"


class Opened(NamedTuple):
    kind: int
    expiry_ms: int
    identity: bytes
    body: bytes


def node_binding(address: str) -> bytes:
    """What binds a sealed body to one node: the router address as configured (as written)
    and, for a Unix socket (the same path on every machine of a fleet), the host name."""
    binding = address.encode()
    if address.startswith("unix://"):
        binding += b"\0" + socket.gethostname().encode()
    return binding


class Sealer:
    """Seals and opens bodies with one key for one node binding; one AEAD object for all."""

    __slots__ = ("_aead", "binding")

    def __init__(self, key: bytes, binding: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.binding = binding

    def seal(self, kind: int, identity: bytes, expiry_ms: int, body: bytes, nonce: bytes | None = None) -> bytes:
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        prefix = PREFIX.pack(VERSION, kind, expiry_ms, identity)
        return prefix + nonce + self._aead.encrypt(nonce, body, prefix + self.binding)

    def open(self, data: bytes, kind: int) -> Opened:
        """The body, or Unopenable: too short, another version or kind, another key or node, altered."""
        if len(data) < OVERHEAD:
            raise Unopenable(f"{len(data)} bytes is too short for a sealed body")
        version, got_kind, expiry_ms, identity = PREFIX.unpack_from(data)
        if version != VERSION or got_kind != kind:
            raise Unopenable(f"sealed body version {version} kind {got_kind}, expected version {VERSION} kind {kind}")
        try:
            body = self._aead.decrypt(data[PREFIX_SIZE:HEADER_SIZE], data[HEADER_SIZE:], data[:PREFIX_SIZE] + self.binding)
        except InvalidTag:
            raise Unopenable(
                "authentication failed: sealed with another SECRET_KEY or for another node, or altered"
            ) from None
        return Opened(got_kind, expiry_ms, identity, body)


# One Sealer per node binding for this site's SECRET_KEY. Reading settings.SECRET_KEY costs
# more than the rest of a lookup, so it is not read per job: conf.clear_config empties this
# when SECRET_KEY changes (the setting_changed signal, e.g. override_settings).
_sealers: dict[bytes, Sealer] = {}


def sealer(binding: bytes) -> Sealer:
    """The Sealer for this site's SECRET_KEY and a node binding (cached)."""
    found = _sealers.get(binding)
    if found is None:
        found = _sealers[binding] = Sealer(keys.job_seal_key(), binding)
    return found


def clear_cache() -> None:
    _sealers.clear()


def expiry_ms(timeout: float) -> int:
    """A job's expiry: its deadline, `timeout` seconds from now, plus EXPIRY_GRACE, in
    wall-clock milliseconds."""
    return int((time.time() + timeout + EXPIRY_GRACE) * 1000)


def seal_job(binding: bytes, body: bytes, timeout: float) -> tuple[bytes, bytes, int]:
    """A master's job body sealed for a job due in `timeout` seconds: (sealed, identity, expiry_ms).

    The master keeps identity and expiry with the pending job and refuses a result that
    carries others."""
    fresh = os.urandom(IDENTITY_SIZE + NONCE_SIZE)  # one getrandom() for both
    identity = fresh[:IDENTITY_SIZE]
    expiry = expiry_ms(timeout)
    return sealer(binding).seal(KIND_JOB, identity, expiry, body, fresh[IDENTITY_SIZE:]), identity, expiry


def seal_result(binding: bytes, job: Opened, body: bytes) -> bytes:
    """A worker's result for the job it opened, under that job's identity and expiry."""
    return sealer(binding).seal(KIND_RESULT, job.identity, job.expiry_ms, body)


def open_result(binding: bytes, data: bytes, identity: bytes, expiry: int) -> bytes:
    """The body of the result of the job sealed with identity and expiry; Unopenable or
    WrongIdentity otherwise (a result never takes another job's place)."""
    opened = sealer(binding).open(data, KIND_RESULT)
    if opened.identity != identity or opened.expiry_ms != expiry:
        raise WrongIdentity("the result is sealed for another job")
    return opened.body


class ReplayGuard:
    """A worker's memory of the job identities it has accepted, each until its expiry.

    Identities are kept in buckets by the second their job expires in (the expiry is sealed
    with the identity, so a replay falls in the same bucket), and a bucket is dropped whole
    once that second has passed: a replay of any of its jobs is refused as expired by then.
    At most `limit` identities are held; past that a job is refused, never admitted by
    forgetting an identity that has not expired.
    """

    def __init__(self, limit: int = MAX_SEEN) -> None:
        self.limit = limit
        self._buckets: dict[int, set[bytes]] = {}
        self._count = 0
        self._purged_second = 0

    def __len__(self) -> int:
        return self._count

    def admit(self, job: Opened, now_ms: int | None = None) -> None:
        """Accept a job once, before its expiry; raise Expired, Replayed or TooManySeen."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if job.expiry_ms < now:
            raise Expired(f"the job expired {now - job.expiry_ms} ms ago")
        second = now // 1000
        if second != self._purged_second:
            self._purge(second)
        bucket = self._buckets.get(job.expiry_ms // 1000)
        if bucket is not None and job.identity in bucket:
            raise Replayed("a job with this identity was already accepted")
        if self._count >= self.limit:
            raise TooManySeen(f"{self._count} unexpired job identities held, the most this worker keeps")
        if bucket is None:
            bucket = self._buckets[job.expiry_ms // 1000] = set()
        bucket.add(job.identity)
        self._count += 1

    def _purge(self, second: int) -> None:
        self._purged_second = second
        for expired in [s for s in self._buckets if s < second]:
            self._count -= len(self._buckets.pop(expired))


class RefusalLog:
    """Logs the first refusal of each kind at WARNING and the rest at DEBUG, never a body."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.counts: dict[str, int] = {}

    def __call__(self, exc: Refused, what: str) -> None:
        seen = self.counts.get(exc.kind, 0)
        self.counts[exc.kind] = seen + 1
        level = logging.DEBUG if seen else logging.WARNING
        if logger.isEnabledFor(level):
            more = "" if seen else " (further refusals of this kind are logged at DEBUG)"
            logger.log(level, "%s refused %s (%s): %s%s", self.who, what, exc.kind, exc, more)
