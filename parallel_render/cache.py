"""The fragment cache: the HTML of `{% parallel cache=SECONDS [key=expr ...] %}` blocks in a Django cache.

An entry's key is made of the block's stable id (template, ordinal, source digest), its key=
values, the active language and time zone and the rendering flags (autoescape, l10n,
use_tz); its value is ``[version, html]``. The site-wide version lives under its own key,
VERSION_KEY, and is read in the same get_many as a page's blocks: bump() writes a new one, and
every entry of another version is a miss from then on (docs/cache.md).

A page's lookups are one get_many (parallel_render.middleware.resolve, through resolve_lookups
here); a miss takes a short lock (cache.add) before it is rendered, so concurrent misses of one
key render once, and the others poll for the value for a bounded time before they render it
themselves. A cache that fails is left alone for RETRY_AFTER seconds: its blocks render as if
uncached, and no page fails because of it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from parallel_render import conf

logger = logging.getLogger("parallel_render")

VERSION_KEY = "parallel_render:fragments:version"
KEY_PREFIX = "parallel_render:fragment:"
# After a cache operation fails, the fragment cache is not used for this many seconds.
RETRY_AFTER = 5.0
# A render that waits for another render of the same key polls this often (doubling from the first).
POLL_FIRST, POLL_MAX = 0.005, 0.05


class FragmentCacheError(Exception):
    """The fragment cache did not answer (the server is down, slow or refuses)."""


@dataclass
class Lookup:
    """One cached block of a page: where its HTML lives and what became of the lookup."""

    key: str
    ttl: float
    # The site-wide version its entry must carry (known once the page's get_many is back).
    version: str = ""
    # This render took the lock of its key: it renders the block and stores it.
    owner: bool = False
    # A worker stores the block's HTML (the cache is shared between processes).
    worker_stores: bool = False

    @property
    def lock(self) -> str:
        # Per version: a render of the entry for an older version (before a bump()) does not
        # hold up the renders of the current one.
        return f"{self.key}:lock:{self.version}"

    def store_instruction(self) -> dict[str, Any]:
        """What a job carries so that its worker stores the HTML (and releases the lock)."""
        return {"k": self.key, "v": self.version, "ttl": self.ttl, "lock": self.owner}


# -- the cache ------------------------------------------------------------------------------

_down_until = 0.0
_down_lock = threading.Lock()
_round_trips = 0


def reset() -> None:
    """Forget that the cache failed (the settings changed): the next page tries it again."""
    global _down_until
    _down_until = 0.0


def round_trips() -> int:
    """Cache operations this process has made for the fragment cache (each one round trip)."""
    return _round_trips


def alias() -> str | None:
    """The Django cache alias of the fragment cache, or None when it is off."""
    return conf.get_config()["CACHE"]


def backend() -> Any:
    from django.core.cache import caches

    name = alias()
    if name is None:
        raise FragmentCacheError("PARALLEL_RENDER['CACHE'] is None: the fragment cache is off")
    return caches[name]


def is_shared(cache: Any) -> bool:
    """Whether other processes (the workers) see what this one stores in this cache."""
    from django.core.cache.backends.dummy import DummyCache
    from django.core.cache.backends.locmem import LocMemCache

    return not isinstance(cache, (LocMemCache, DummyCache))


def usable() -> bool:
    """The fragment cache is configured, and has not failed in the last RETRY_AFTER seconds."""
    return alias() is not None and time.monotonic() >= _down_until


def _call(what: str, operation: Callable[..., Any], *args: Any) -> Any:
    """Run one cache operation; a failure marks the cache down for RETRY_AFTER seconds."""
    global _round_trips, _down_until
    _round_trips += 1
    try:
        return operation(*args)
    except Exception as exc:
        with _down_lock:
            first = time.monotonic() >= _down_until
            _down_until = time.monotonic() + RETRY_AFTER
        if first:
            logger.warning(
                "fragment cache %r failed (%s: %s: %s); cached blocks render uncached for %g s",
                alias(),
                what,
                type(exc).__name__,
                exc,
                RETRY_AFTER,
            )
        raise FragmentCacheError(f"{what}: {type(exc).__name__}: {exc}") from exc


def lookup(keys: Iterable[str]) -> tuple[str, dict[str, str]]:
    """One get_many for these keys and the site-wide version: (version, {key: html}) of the hits.

    An entry stored under another version is a miss. Where no version is stored yet (a new
    or flushed cache), one is added (one more round trip, once).
    """
    cache = backend()
    keys = list(keys)
    found = _call("get_many", cache.get_many, [VERSION_KEY, *keys])
    version = found.get(VERSION_KEY)
    if not isinstance(version, str):
        return _new_version(cache), {}
    hits = {}
    for key in keys:
        entry = found.get(key)
        if type(entry) in (list, tuple) and len(entry) == 2 and entry[0] == version and isinstance(entry[1], str):
            hits[key] = entry[1]
    return version, hits


def _new_version(cache: Any) -> str:
    version = secrets.token_hex(8)
    if _call("add", cache.add, VERSION_KEY, version, None):
        return version
    found = _call("get", cache.get, VERSION_KEY)  # another process added one first
    return found if isinstance(found, str) else version


def bump(using: str | None = None) -> str:
    """Invalidate every cached fragment at once: store a new site-wide version and return it.

    Entries of older versions are misses from the next page on (they expire by their own
    timeout). using: a cache alias other than PARALLEL_RENDER['CACHE'].
    """
    from django.core.cache import caches

    cache = caches[using] if using is not None else backend()
    version = secrets.token_hex(8)
    cache.set(VERSION_KEY, version, None)
    logger.info("fragment cache version bumped to %s", version)
    return version


def take_lock(entry: Lookup, seconds: float) -> bool:
    """Take the lock of entry's key for at most `seconds`: True if this render owns the miss."""
    entry.owner = bool(_call("add", backend().add, entry.lock, 1, max(1, int(seconds + 0.999))))
    return entry.owner


def wait_for(entries: list[Lookup], until: float) -> dict[str, str]:
    """Poll for the HTML of keys another render is filling, until `until` (time.monotonic());
    return what arrived, by key. A failing cache ends the wait at once."""
    found: dict[str, str] = {}
    left = {e.key: e for e in entries}
    pause = POLL_FIRST
    cache = backend()
    while left and time.monotonic() < until:
        time.sleep(min(pause, max(until - time.monotonic(), 0)))
        pause = min(pause * 2, POLL_MAX)
        try:
            values = _call("get_many", cache.get_many, list(left))
        except FragmentCacheError:
            break
        for key, value in values.items():
            entry = left[key]
            if (
                type(value) in (list, tuple)
                and len(value) == 2
                and value[0] == entry.version
                and isinstance(value[1], str)
            ):
                found[key] = value[1]
                del left[key]
    return found


def store(entry: Lookup, html: str) -> None:
    """Store a rendered block under its key (and release its lock, if this render holds it).
    A failing cache is logged (once per outage), never raised."""
    if not entry.version:
        return  # its lookup failed: nothing known to store it under
    try:
        cache = backend()
        _call("set", cache.set, entry.key, [entry.version, html], entry.ttl)
        if entry.owner:
            _call("delete", cache.delete, entry.lock)
            entry.owner = False
    except FragmentCacheError:
        pass


def release(entry: Lookup) -> None:
    """Give up the lock of a block that was not stored (it failed), so others need not wait."""
    if entry.owner:
        entry.owner = False
        try:
            _call("delete", backend().delete, entry.lock)
        except FragmentCacheError:
            pass


def store_from_job(instruction: Any, html: str) -> None:
    """In a worker: store a block its job said to store (Lookup.store_instruction)."""
    if not isinstance(instruction, dict) or not usable():
        return
    try:
        ttl = float(instruction["ttl"])
        entry = Lookup(str(instruction["k"]), ttl, str(instruction["v"]), owner=bool(instruction.get("lock")))
    except (KeyError, TypeError, ValueError):
        logger.warning("a job's fragment-cache instruction is malformed; not stored")
        return
    if not entry.key.startswith(KEY_PREFIX):
        return  # a job only ever names the fragment cache's own keys
    store(entry, html)


# -- keys -------------------------------------------------------------------------------------


def key_part(value: Any) -> str:
    """A key= value as text that is the same in every process: a model instance is its label and
    primary key, a list or tuple its parts; anything else its type and str()."""
    from django.db.models import Model

    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, Model):
        return f"{value._meta.label}:{value.pk!r}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(key_part(v) for v in value) + "]"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"{type(value).__name__}:{value.isoformat()}"
    return f"{type(value).__qualname__}:{value}"


def block_key(node: Any, values: list[Any], env: dict[str, Any]) -> str:
    """The cache key of one block rendered with these key= values, in this rendering state
    (parallel_render.fragments.capture_env): its language, time zone and flags."""
    parts = [
        node.template_name or "<string>",
        str(node.ordinal),
        node.digest,
        *(key_part(v) for v in values),
        f"lang={env['lang']}",
        f"tz={env['tz']}",
        f"ae={env['ae']}",
        f"l10n={env['l10n']}",
        f"use_tz={env['use_tz']}",
    ]
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return KEY_PREFIX + digest


def seconds(value: Any) -> float | None:
    """A cache= value as seconds, or None for "do not cache" (0, None, '', False)."""
    if value is None or value == "" or value is False or value == 0:
        return None
    if isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"cache={value!r} is not a number of seconds") from None
    if not 0 < result < float("inf"):
        raise ValueError(f"cache={value!r} is not a positive number of seconds")
    return result


# -- a block rendered here ----------------------------------------------------------------------


def render_here(entry: Lookup, lock_seconds: float, render: Callable[[], tuple[str, bool]]) -> tuple[str, bool]:
    """A cached block that renders in this process, in place (serial mode, or a block a
    placeholder cannot stand for): its own get_many, then the render on a miss, and the store.

    render() returns the HTML and whether it is the block's own (not its fallback). Returns the
    HTML and whether it came from the cache.
    """
    try:
        entry.version, hits = lookup([entry.key])
    except FragmentCacheError:
        return render()[0], False
    if entry.key in hits:
        return hits[entry.key], True
    try:
        owner = take_lock(entry, lock_seconds)
    except FragmentCacheError:
        return render()[0], False
    if not owner:
        found = wait_for([entry], time.monotonic() + lock_seconds)
        if entry.key in found:
            return found[entry.key], True
    html, own = render()
    if own:
        store(entry, html)
    else:
        release(entry)
    return html, False


# -- a page's cached blocks ---------------------------------------------------------------------


def resolve_lookups(current: Any) -> None:
    """Look up every cached block of a render session not looked up yet, in one get_many:
    the hits go into the page (current.html), each miss takes its key's lock and is sent to a
    worker (or left to the master, see session.Pending.job), and a miss whose lock another
    render holds waits for that render's value, then is left to the master's normal rescue.

    Called by parallel_render.middleware.resolve before it gathers the blocks that went out.
    """
    pending, current.lookups = current.lookups, []
    if not pending:
        return
    # The first block of each key is looked up; a later one of the same key on this page shows
    # the same HTML when it is a hit (as serially, where the first would have filled it).
    first: dict[str, Any] = {}
    for f in pending:
        first.setdefault(f.cache.key, f)
    try:
        version, hits = lookup(first) if usable() else ("", {})
    except FragmentCacheError:
        version, hits = "", {}
    shared = bool(version) and is_shared(backend())
    waiting = []
    for f in pending:
        f.cache.version = version
        if f.cache.key in hits:
            _hit(current, f, hits[f.cache.key])
            continue
        if version and first[f.cache.key] is f:
            try:
                if not take_lock(f.cache, max(f.deadline - time.monotonic(), 0.001)):
                    waiting.append(f)
                    continue
            except FragmentCacheError:
                f.cache.version = shared = ""  # the cache is down: render uncached, store nothing
        _send(current, f, shared)
    if waiting:
        found = wait_for([f.cache for f in waiting], min(f.deadline for f in waiting))
        for f in waiting:
            if f.cache.key in found:
                _hit(current, f, found[f.cache.key])
            else:
                f.unsent = "another render of this cached block did not store it in time"
                f.job = None


def _hit(current: Any, f: Any, html: str) -> None:
    from parallel_render import signals

    current.html[f.index] = html
    f.job = None
    current.timings.append(
        f'pr-{f.index};dur={(time.monotonic() - f.submitted) * 1000:.1f};desc="{f.node.label} fragment cache hit"'
    )
    if signals.block_finished.receivers:
        origin = current.started
        signals.send(
            f.node,
            "cached",
            "",
            current.request,
            index=f.index,
            total_ms=(time.monotonic() - f.submitted) * 1000,
            start_ms=(f.began - origin) * 1000 if f.began else None,
            later=current.held,
        )


def _send(current: Any, f: Any, shared: bool) -> None:
    """Submit a missed block's job (one of its own), or leave it for the master to render."""
    import orjson

    from parallel_render import codec, sealing
    from parallel_render.client import RouterUnavailable

    encode, f.job = f.job, None
    if encode is None:
        return  # f.unsent says why the master renders it
    try:
        job = encode()
        if shared and f.cache.version:
            job["cache"] = f.cache.store_instruction()
        body = orjson.dumps(job)
    except codec.Unsendable as exc:
        f.unsent = str(exc)
        return
    except (TypeError, orjson.JSONEncodeError) as exc:
        f.unsent = f"a value cannot be encoded: {exc}"
        return
    now = time.monotonic()
    timeout = f.deadline - now
    if timeout <= 0.001:
        f.unsent = "its deadline passed before its cache lookup returned"
        return
    f.submitted = now
    sealed, f.identity, f.expiry_ms = sealing.seal_job(current.client.binding, body, timeout)
    try:
        f.job_id = current.client.submit(sealed, timeout, high_priority=current.nested, no_queue=current.nested)
    except (RouterUnavailable, ValueError) as exc:
        f.unsent = str(exc)
        return
    f.cache.worker_stores = "cache" in job


def filled(f: Any, html: str, own: bool, by_worker: bool = False) -> None:
    """The master has the HTML of a block that may be a cached one's miss: store it, unless its
    worker stores it (by_worker, as its job said), or it is not the block's own HTML but its
    {% fallback %} (own False: only release the key's lock, so others need not wait)."""
    entry = f.cache
    if entry is None or (by_worker and entry.worker_stores):
        return
    if own:
        store(entry, html)
    else:
        release(entry)


# -- checks -------------------------------------------------------------------------------------

# What a cached block should not read unless a key= names it: it differs from request to request.
PER_REQUEST = ("request", "user", "csrf_token")


def _root(expression: Any) -> str | None:
    """The first name of a FilterExpression's variable (`user` for user.pk), None for a literal."""
    lookups = getattr(getattr(expression, "var", None), "lookups", None)
    return lookups[0] if lookups else None


def unkeyed_reads(node: Any, engine: Any) -> list[str]:
    """The per-request values (PER_REQUEST) a cached block reads that none of its key= names."""
    if node.cache is None:
        return []
    reads = set(node.get_analysis(engine).names) | {_root(fe) for fe in node.extra.values()}
    keyed = {_root(fe) for fe in node.cache_keys}
    return [name for name in PER_REQUEST if name in reads and name not in keyed]


def missing_timeouts(settings_dict: dict[str, Any]) -> list[str]:
    """The socket-timeout OPTIONS a cache's settings lack, for the backends whose client waits
    forever without them (pymemcache, django-redis, Django's own Redis backend)."""
    backend_path = str(settings_dict.get("BACKEND", ""))
    options = settings_dict.get("OPTIONS") or {}
    if backend_path.endswith("memcached.PyMemcacheCache"):
        wanted = ("connect_timeout", "timeout")
    elif backend_path.startswith("django_redis."):
        wanted = ("SOCKET_CONNECT_TIMEOUT", "SOCKET_TIMEOUT")
    elif backend_path == "django.core.cache.backends.redis.RedisCache":
        wanted = ("socket_connect_timeout", "socket_timeout")
    else:
        return []
    return [name for name in wanted if options.get(name) is None]
