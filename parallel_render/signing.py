"""The bearer token a TCP fastrouter expects in HELLO (until the challenge-response handshake)."""

from __future__ import annotations

import functools
import hashlib
import hmac

from django.conf import settings


@functools.cache
def job_key() -> bytes:
    return hashlib.sha256(b"parallel_render.job\0" + settings.SECRET_KEY.encode()).digest()


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
