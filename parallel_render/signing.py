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


def sign(body: bytes) -> bytes:
    return hmac.new(job_key(), body, hashlib.sha256).digest() + body


def unsign(data: bytes) -> bytes:
    mac, body = data[:MAC_SIZE], data[MAC_SIZE:]
    if len(mac) != MAC_SIZE or not hmac.compare_digest(
        mac, hmac.new(job_key(), body, hashlib.sha256).digest()
    ):
        raise BadSignature("bad signature: the sender does not share this site's SECRET_KEY")
    return body
