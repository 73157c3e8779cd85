"""The key schedule (docs/security.md, "Keys"): every key is derived from SECRET_KEY.

HKDF-SHA256, no salt, one info label per purpose, so no other secret needs distributing and
no key serves two purposes:

- the router-auth key proves a peer to the fastrouter and the router to the peer (the
  handshake, fastrouter/PROTOCOL.md); the router gets it in a 0600 key file;
- the job-seal key seals job and result bodies between masters and workers; the router never
  has it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.utils.encoding import force_bytes

ROUTER_AUTH_INFO = b"parallel_render router-auth v1"
JOB_SEAL_INFO = b"parallel_render job-seal v1"
KEY_SIZE = 32


def derive(secret_key: str | bytes, info: bytes) -> bytes:
    """HKDF-SHA256(secret_key, salt=None, info) -> 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(force_bytes(secret_key))


@functools.lru_cache(maxsize=8)
def _derived(secret_key: str | bytes, info: bytes) -> bytes:
    return derive(secret_key, info)


def router_auth_key() -> bytes:
    """The handshake key of this site (follows SECRET_KEY, also under override_settings)."""
    return _derived(settings.SECRET_KEY, ROUTER_AUTH_INFO)


def job_seal_key() -> bytes:
    """The key that seals job and result bodies; never given to the router."""
    return _derived(settings.SECRET_KEY, JOB_SEAL_INFO)


def clear_cache() -> None:
    _derived.cache_clear()


def private_key_dir() -> str:
    """A directory only this user can enter, the same on every call: where the `fastrouter`
    command leaves the key file of a router it replaces itself with (it cannot remove it)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"parallel_render-{os.geteuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{path} is not a private directory of this user (a directory, owned by uid {os.geteuid()}, mode 0700)"
        )
    return path


def write_router_key_file(directory: str, name: str = "router.key") -> str:
    """The router-auth key as 64 hex characters in a new 0600 file in directory (which must be
    private, e.g. the router's socket directory), for the router's --auth-key-file."""
    path = os.path.join(directory, name)
    try:
        os.unlink(path)  # never write through a link or into a file someone else opened
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(router_auth_key().hex() + "\n")
    return path


def key_file_name(address: str) -> str:
    """A key file's name for a router address, so routers of different addresses sharing the
    private key directory do not overwrite each other's."""
    return f"router-{hashlib.sha256(address.encode()).hexdigest()[:16]}.key"
