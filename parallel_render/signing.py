"""HMAC of job and result bodies, keyed from SECRET_KEY, so a worker only runs jobs a master made."""

from __future__ import annotations

import functools
import hashlib
import hmac

from django.conf import settings

MAC_SIZE = 32


class BadSignature(Exception):
    pass


@functools.cache
def job_key() -> bytes:
    return hashlib.sha256(b"parallel_render.job\0" + settings.SECRET_KEY.encode()).digest()


@functools.lru_cache(maxsize=4)
def _keyed(key: bytes) -> hmac.HMAC:
    # An HMAC with the key already hashed in: copying it is cheaper than keying a new one
    # for every job and result. Looked up by key, so a changed SECRET_KEY takes effect.
    return hmac.new(key, digestmod=hashlib.sha256)


def mac(body: bytes) -> bytes:
    h = _keyed(job_key()).copy()
    h.update(body)
    return h.digest()


def sign(body: bytes) -> bytes:
    return mac(body) + body


def unsign(data: bytes) -> bytes:
    body = data[MAC_SIZE:]
    if len(data) < MAC_SIZE or not hmac.compare_digest(data[:MAC_SIZE], mac(body)):
        raise BadSignature("bad signature: the sender does not share this site's SECRET_KEY")
    return body


def router_token() -> bytes:
    """What a peer sends in HELLO to a TCP fastrouter: derived from SECRET_KEY, so every
    process of the site has it and nobody else does."""
    return hmac.new(job_key(), b"parallel_render.router-token", hashlib.sha256).hexdigest().encode()


def hello_payload(role: int, scheme: str) -> bytes:
    return bytes([role]) + (router_token() if scheme == "tcp" else b"")


def write_token_file(directory: str) -> str:
    """The token in a 0600 file inside directory, for the router's --auth-token-file."""
    import os

    path = os.path.join(directory, "router.token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(router_token())
    return path
