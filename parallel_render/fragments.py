"""Rendering one fragment from captured values: shared by workers and the master's rescue."""

from __future__ import annotations

import contextvars
import datetime
import functools
import threading
import types
import zoneinfo
from typing import Any

from django.conf import settings
from django.template import Context, TemplateDoesNotExist, engines
from django.template.backends.django import DjangoTemplates
from django.template.loaders.cached import Loader as CachedLoader
from django.template.utils import InvalidTemplateEngineError
from django.utils import timezone, translation


class SkewError(Exception):
    """The worker's template is not the one the master rendered (a deploy in progress)."""


# id(engine) -> the alias it was found under; checked against `engines` on every use.
_aliases: dict[int, str] = {}


def engine_alias(engine: Any) -> str | None:
    alias = _aliases.get(id(engine))
    if alias is not None:
        backend = _backend(alias)
        if backend is not None and backend.engine is engine:
            return alias
    for backend in engines.all():
        if isinstance(backend, DjangoTemplates) and backend.engine is engine:
            if len(_aliases) >= 64:
                _aliases.clear()
            _aliases[id(engine)] = backend.name
            return backend.name
    return None


def _backend(alias: str) -> DjangoTemplates | None:
    try:
        backend = engines[alias]
    except InvalidTemplateEngineError:  # gone since (TEMPLATES changed)
        return None
    return backend if isinstance(backend, DjangoTemplates) else None


def timezone_key(tz: datetime.tzinfo) -> Any:
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    offset = tz.utcoffset(None)
    if offset is None:
        return None
    return {"offset": offset.total_seconds(), "name": tz.tzname(None)}


def timezone_from_key(key: Any) -> datetime.tzinfo:
    if isinstance(key, str):
        # ZoneInfo keeps one instance per key: the zone a process has active is this one.
        return zoneinfo.ZoneInfo(key)
    return _fixed_offset(key["offset"], key["name"])


@functools.lru_cache(maxsize=64)
def _fixed_offset(seconds: float, name: str) -> datetime.tzinfo:
    if seconds == 0 and name == "UTC":
        return datetime.timezone.utc
    return datetime.timezone(datetime.timedelta(seconds=seconds), name)


# What a Local reader (below) answers besides a value.
_UNSET = object()  # certainly no value for this thread or task
_UNKNOWN = object()  # cannot tell: ask Django


def _local_reader(local: Any) -> Any:
    """For one of Django's asgiref Locals (the active language's, the active time zone's): a
    function that returns its "value" for this thread or task, _UNSET, or _UNKNOWN; None when
    its storage is not laid out the way the function reads it.

    asgiref answers a read of a missing value by raising an AttributeError (its message
    formatted with the storage's repr) that getattr's default then catches: about 3 µs, paid
    twice for every block a master sends on a site that activates no language or time zone.
    The reader reads the same context variable directly, holding to asgiref's rule that a
    value stored by another thread is not this thread's (recent asgiref versions tag the
    storage with its thread; 3.8 keeps a plain dict). Whatever it does not recognise is
    _UNKNOWN, and the caller asks Django as usual.
    """
    storage = vars(local).get("_storage") if hasattr(local, "__dict__") else None
    var = vars(storage).get("_data") if hasattr(storage, "__dict__") else None
    if not isinstance(var, contextvars.ContextVar):
        return None
    get_ident = threading.get_ident

    def read() -> Any:
        held = var.get(None)
        if held is None:
            return _UNSET
        if type(held) is dict:
            data = held
        else:
            data, owner = getattr(held, "data", None), getattr(held, "thread_id", None)
            if type(data) is not dict or type(owner) is not int:
                return _UNKNOWN
            if owner != get_ident():
                return _UNSET
        return data.get("value", _UNSET)

    return read


@functools.cache
def _readers() -> tuple[Any, Any]:
    """The readers of the active language's Local (None without USE_I18N: Django's
    get_language() then reads no Local) and of the active time zone's."""
    language = None
    if settings.USE_I18N:
        from django.utils.translation import trans_real

        language = _local_reader(trans_real._active)
    return language, _local_reader(timezone._active)


def current_language() -> str | None:
    """translation.get_language(), read without asgiref's exception when none is active."""
    reader, _ = _readers()
    active = _UNKNOWN if reader is None else reader()
    if active is _UNKNOWN:
        return translation.get_language()
    if active is not _UNSET and active is not None:
        # As django.utils.translation.trans_real.get_language() reads it.
        try:
            return active.to_language()
        except AttributeError:
            pass
    return settings.LANGUAGE_CODE


def current_timezone() -> datetime.tzinfo:
    """timezone.get_current_timezone(), read without asgiref's exception when none is active."""
    _, reader = _readers()
    active = _UNKNOWN if reader is None else reader()
    if active is _UNKNOWN:
        return timezone.get_current_timezone()
    return timezone.get_default_timezone() if active is _UNSET else active


def capture_env(context: Context) -> dict[str, Any] | None:
    """The rendering state around a block; None if it cannot be carried."""
    tz = timezone_key(current_timezone())
    if tz is None:
        return None
    request = getattr(context, "request", None)
    current_app = getattr(request, "current_app", None)
    if current_app is None:
        match = getattr(request, "resolver_match", None)
        current_app = getattr(match, "namespace", None)
    return {
        "ae": context.autoescape,
        "l10n": context.use_l10n,
        "use_tz": context.use_tz,
        "lang": current_language(),
        "tz": tz,
        "app": current_app if isinstance(current_app, str) else None,
        "has_req": request is not None,
    }


def find_node(template: Any, ordinal: int, digest: str) -> Any:
    from parallel_render.templatetags.parallel import parallel_nodes

    node = parallel_nodes(template).get(ordinal)
    if node is None or node.digest != digest:
        raise SkewError(
            f"block #{ordinal} of {template.origin.template_name!r} differs between master and worker"
        )
    return node


def render_captured(
    node: Any, template: Any, values: dict[str, Any], env: dict[str, Any], fallback: bool = False,
    override: bool = True,
) -> str:
    """Render a block's body (or its fallback) from captured values, as it rendered in place.

    override=False: the caller has made env's language and time zone the active ones
    already (activate_env), as a worker does for each job.
    """
    # values is the block's own dict (decoded for it, or captured for it): the context's
    # innermost dict as it is, rather than a copy pushed onto an empty context.
    context = Context(values, autoescape=env["ae"], use_l10n=env["l10n"], use_tz=env["use_tz"])
    if env["has_req"]:
        request = values.get("request")
        if request is None or not hasattr(request, "path"):
            request = types.SimpleNamespace(current_app=env["app"])
        context.request = request
    context.template_name = template.name
    nodelist = node.fallback if fallback else node.nodelist
    # The state Template.render sets up (render_context.push_state, the bound template, the
    # values pushed), without the context managers that would only restore it: this context
    # is thrown away afterwards.
    context.render_context.template = template
    context.render_context.push()
    context.template = template
    if not override:
        return nodelist.render(context)
    with translation.override(env["lang"]), timezone.override(timezone_from_key(env["tz"])):
        return nodelist.render(context)


def activate_env(env: dict[str, Any]) -> None:
    """Make env's language and time zone this thread's active ones, until the next call.

    What a worker does before each job instead of overriding them around it: it renders
    nothing else, so nothing needs the previous ones back, and two writes cost much less
    than an override's reads and restores (a large part of a small block's cost).
    """
    translation.activate(env["lang"])
    timezone.activate(timezone_from_key(env["tz"]))


def worker_template(alias: str, name: str) -> Any:
    backend = engines[alias]
    if not isinstance(backend, DjangoTemplates):
        raise SkewError(f"template engine {alias!r} is not a Django engine in this worker")
    return backend.engine.get_template(name)


# (engine alias, template name, ordinal, digest) -> (template, node) found for it before.
_blocks: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}
MAX_BLOCKS = 4096


def worker_block(alias: str, name: str, ordinal: int, digest: str) -> tuple[Any, Any]:
    """The template and the {% parallel %} node a job names, as this worker's engine has them.

    Raises SkewError when the worker has no such template or its block differs. The pair
    found before is reused only while it is still what the engine would load: the same
    Template object in the engine's (only) cached loader, so a reset of the loaders (the
    template changed) or a different engine loads and checks the template again.
    """
    key = (alias, name, ordinal, digest)
    found = _blocks.get(key)
    if found is not None:
        backend = _backend(alias)
        cache = _loaded_templates(backend.engine) if backend is not None else None
        if cache is not None and cache.get(name) is found[0]:
            return found
    try:
        template = worker_template(alias, name)
    except TemplateDoesNotExist as exc:
        raise SkewError(f"template {name!r} not found in this worker") from exc
    found = (template, find_node(template, ordinal, digest))
    if len(_blocks) >= MAX_BLOCKS:
        _blocks.clear()
    _blocks[key] = found
    return found


def _loaded_templates(engine: Any) -> dict[str, Any] | None:
    """Where engine.get_template(name) finds a template it loaded before, when it does."""
    loaders = engine.template_loaders
    if len(loaders) == 1 and type(loaders[0]) is CachedLoader:
        return loaders[0].get_template_cache
    return None
