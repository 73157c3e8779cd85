"""Rendering one fragment from captured values: shared by workers and the master's rescue."""

from __future__ import annotations

import datetime
import types
import zoneinfo
from typing import Any

from django.template import Context, engines
from django.template.backends.django import DjangoTemplates
from django.utils import timezone, translation


class SkewError(Exception):
    """The worker's template is not the one the master rendered (a deploy in progress)."""


def engine_alias(engine: Any) -> str | None:
    for backend in engines.all():
        if isinstance(backend, DjangoTemplates) and backend.engine is engine:
            return backend.name
    return None


def timezone_key(tz: datetime.tzinfo) -> Any:
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    if tz is datetime.timezone.utc:
        return "UTC"
    offset = tz.utcoffset(None)
    if offset is None:
        return None
    return {"offset": offset.total_seconds(), "name": tz.tzname(None)}


def timezone_from_key(key: Any) -> datetime.tzinfo:
    if key == "UTC":
        return datetime.timezone.utc
    if isinstance(key, str):
        return zoneinfo.ZoneInfo(key)
    return datetime.timezone(datetime.timedelta(seconds=key["offset"]), key["name"])


def capture_env(context: Context) -> dict[str, Any] | None:
    """The rendering state around a block; None if it cannot be carried."""
    tz = timezone_key(timezone.get_current_timezone())
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
        "lang": translation.get_language(),
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


def render_captured(node: Any, template: Any, values: dict[str, Any], env: dict[str, Any], fallback: bool = False) -> str:
    """Render a block's body (or its fallback) from captured values, as it rendered in place."""
    context = Context(autoescape=env["ae"], use_l10n=env["l10n"], use_tz=env["use_tz"])
    if env["has_req"]:
        request = values.get("request")
        if request is None or not hasattr(request, "path"):
            request = types.SimpleNamespace(current_app=env["app"])
        context.request = request
    context.template_name = template.name
    nodelist = node.fallback if fallback else node.nodelist
    with context.render_context.push_state(template):
        context.template = template
        try:
            with translation.override(env["lang"]), timezone.override(timezone_from_key(env["tz"])):
                with context.push(values):
                    return nodelist.render(context)
        finally:
            context.template = None


def worker_template(alias: str, name: str) -> Any:
    backend = engines[alias]
    if not isinstance(backend, DjangoTemplates):
        raise SkewError(f"template engine {alias!r} is not a Django engine in this worker")
    return backend.engine.get_template(name)
