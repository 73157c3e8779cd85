"""Context values as orjson-safe data, and back, so a worker sees what the master saw.

The policy (docs/values.md): JSON scalars, strings (safe strings stay safe), lists, tuples,
dicts with string keys, Decimal, date/time/datetime/timedelta, UUID, lazy translations
(resolved in the master's active language), model instances (loaded fields, extra
attributes, select_related and prefetch caches), querysets, the request, the user and
perms. Anything else raises Unsendable naming the value's path and type, and the block
renders inline. Nothing here imports or calls code named by the payload: models are looked up
in the app registry, and that is all.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import math
import uuid
from typing import Any

from django.apps import apps
from django.db import models
from django.db.models.query import ModelIterable, QuerySet
from django.http import HttpRequest, QueryDict
from django.utils.functional import LazyObject, Promise, empty
from django.utils.safestring import SafeString, mark_safe

JSON_SCALARS = (str, int, float, bool, type(None))
MAX_INT = 2**63 - 1

# Request headers a template or context processor commonly reads; others are not sent.
REQUEST_META_KEYS = (
    "HTTP_HOST",
    "SERVER_NAME",
    "SERVER_PORT",
    "REMOTE_ADDR",
    "HTTP_USER_AGENT",
    "HTTP_ACCEPT_LANGUAGE",
    "HTTP_REFERER",
    "QUERY_STRING",
    "SCRIPT_NAME",
    "CSRF_COOKIE",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
)


class Unsendable(Exception):
    """A value that cannot travel to a worker; the message names it and its type."""

    def __init__(self, path: str, value: Any, why: str = "") -> None:
        self.path = path
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        detail = f": {why}" if why else ""
        super().__init__(f"{path} is a {self.type_name}, which cannot be sent to a worker{detail}")


class RemoteAttributeError(Exception):
    """Raised by a rebuilt request for an attribute the master did not send.

    Deliberately not an AttributeError: a template would silently render it as empty, while
    the master's page would show the value. The worker fails the block and the master
    renders it inline instead.
    """


class Encoder:
    def __init__(self) -> None:
        self._seen: dict[int, int] = {}  # id(instance) -> reference number
        self._keep: list[Any] = []  # keep encoded objects alive so ids stay unique

    def encode(self, value: Any, path: str) -> Any:
        t = type(value)
        if t is str or t is bool or (t is int and -MAX_INT <= value <= MAX_INT) or value is None:
            return value
        if t is float:
            return value if math.isfinite(value) else {"$f": repr(value)}
        if t is SafeString:
            return {"$s": str(value)}
        if t is list:
            return self._items(value, path)
        if t is tuple:
            return {"$t": self._items(value, path)}
        if t is dict:
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise Unsendable(path, value, f"key {k!r} is not a string")
                # Plain strings, booleans and None are themselves: no call, no path string.
                tv = type(v)
                out[k] = v if tv is str or tv is bool or v is None else self.encode(v, f"{path}.{k}")
            return {"$d": out}
        if t is int:
            return {"$i": str(value)}
        if t is decimal.Decimal:
            return {"$dec": str(value)}
        if t is datetime.datetime:
            return {"$dt": value.isoformat(), "tz": _tz_name(value.tzinfo, path)}
        if t is datetime.date:
            return {"$date": value.isoformat()}
        if t is datetime.time:
            return {"$time": value.isoformat(), "tz": _tz_name(value.tzinfo, path)}
        if t is datetime.timedelta:
            return {"$td": [value.days, value.seconds, value.microseconds]}
        if t is uuid.UUID:
            return {"$uuid": str(value)}
        if isinstance(value, Promise):
            # A lazy translation: resolved now, in the language the master renders in.
            return str(value)
        if isinstance(value, LazyObject):
            if value._wrapped is empty:
                value._setup()
            return self.encode(value._wrapped, path)
        if isinstance(value, models.Model):
            return self._model(value, path)
        if isinstance(value, QuerySet):
            return self._queryset(value, path)
        if isinstance(value, HttpRequest):
            return self._request(value, path)
        return self._special(value, path)

    def _items(self, values: list | tuple, path: str) -> list:
        out = []
        for i, v in enumerate(values):
            tv = type(v)
            out.append(v if tv is str or tv is bool or v is None else self.encode(v, f"{path}[{i}]"))
        return out

    def _special(self, value: Any, path: str) -> Any:
        from django.contrib.auth.context_processors import PermWrapper
        from django.contrib.auth.models import AnonymousUser

        if type(value) is AnonymousUser:
            return {"$anon": 1}
        if type(value) is PermWrapper:
            return {"$perms": self.encode(value.user, f"{path}.user")}
        codec = custom_codecs().get(type(value))
        if codec is not None:
            return {"$x": codec.tag, "v": codec.encode(value)}
        if callable(value) and not isinstance(value, type):
            # Django calls a callable it finds in the context (once per reference); the master
            # calls it once here and sends what it returned.
            if getattr(value, "do_not_call_in_templates", False):
                raise Unsendable(path, value, "it is marked do_not_call_in_templates")
            if getattr(value, "alters_data", False):
                raise Unsendable(path, value, "it alters data, so templates do not call it")
            try:
                result = value()
            except TypeError as exc:
                raise Unsendable(path, value, f"calling it without arguments failed: {exc}") from exc
            return self.encode(result, f"{path}()")
        raise Unsendable(path, value)

    def _model(self, obj: models.Model, path: str) -> Any:
        ref = self._seen.get(id(obj))
        if ref is not None:
            return {"$ref": ref}
        ref = self._seen[id(obj)] = len(self._seen)
        self._keep.append(obj)
        meta = obj._meta
        fields = {}
        attnames = set()
        for field in meta.concrete_fields:
            attnames.add(field.attname)
            if field.attname in obj.__dict__:
                fields[field.attname] = self.encode(obj.__dict__[field.attname], f"{path}.{field.attname}")
        extra = {}
        related = {}
        prefetched = {}
        for key, val in obj.__dict__.items():
            if key in attnames or key == "_state":
                continue
            if key == "_prefetched_objects_cache":
                for name, qs in val.items():
                    prefetched[name] = self.encode(qs, f"{path}.{name}")
                continue
            if key.startswith("_"):
                # Private caches (e.g. _django_cleanup) are rebuilt on demand in the worker.
                continue
            extra[key] = self.encode(val, f"{path}.{key}")
        for name, cached in obj._state.fields_cache.items():
            related[name] = None if cached is None else self.encode(cached, f"{path}.{name}")
        out: dict[str, Any] = {"$m": meta.label_lower, "id": ref, "db": obj._state.db, "f": fields}
        if obj._state.adding:
            out["new"] = 1
        if extra:
            out["x"] = extra
        if related:
            out["r"] = related
        if prefetched:
            out["p"] = prefetched
        return out

    def _queryset(self, qs: QuerySet, path: str) -> Any:
        label = qs.model._meta.label_lower
        remote = None
        if qs._result_cache is None and isinstance(qs, RemoteQuerySet):
            remote = qs._remote  # a worker passing on what it was sent (a nested block)
        elif qs._result_cache is None and _can_run_remotely(qs):
            from django.core.exceptions import EmptyResultSet

            try:
                sql, params = qs.query.get_compiler(using=qs.db).as_sql()
            except EmptyResultSet:
                return {"$qs": label, "db": qs.db, "rows": []}
            remote = (sql, params, qs._prefetch_related_lookups)
        if remote is not None:
            sql, params, prefetch = remote
            return {
                "$qs": label,
                "db": qs.db,
                "sql": sql,
                "params": [self.encode(v, f"{path}.query.params") for v in params],
                "prefetch": list(prefetch),
            }
        # Anything else is evaluated here, as serial rendering would when it reads it.
        rows = list(qs)
        return {"$qs": label, "db": qs.db, "rows": [self.encode(r, f"{path}[{i}]") for i, r in enumerate(rows)]}

    def _request(self, request: HttpRequest, path: str) -> Any:
        meta = {k: request.META[k] for k in REQUEST_META_KEYS if isinstance(request.META.get(k), str)}
        out: dict[str, Any] = {
            "$req": 1,
            # What the master's request had, so the rebuilt one can tell "not sent" (fail the
            # block) from "never there" (AttributeError, as on the master).
            "has": sorted(k for k in vars(request) if not k.startswith("_")),
            "method": request.method,
            "path": request.path,
            "path_info": request.path_info,
            "scheme": request.scheme,
            "GET": list(request.GET.lists()),
            "COOKIES": dict(request.COOKIES),
            "META": meta,
        }
        for attr in ("LANGUAGE_CODE", "current_app"):
            if isinstance(getattr(request, attr, None), str):
                out[attr] = getattr(request, attr)
        match = getattr(request, "resolver_match", None)
        if match is not None:
            out["match"] = {
                "url_name": match.url_name,
                "namespace": match.namespace,
                "app_name": match.app_name,
                "route": match.route,
                "kwargs": self.encode(dict(match.kwargs), f"{path}.resolver_match.kwargs"),
                "args": self.encode(tuple(match.args), f"{path}.resolver_match.args"),
            }
        if hasattr(request, "user"):
            out["user"] = self.encode(request.user, f"{path}.user")
        session = getattr(request, "session", None)
        cache = getattr(session, "_session_cache", None)
        if isinstance(cache, dict):
            # Only a session the view already loaded: loading it here would cost a query and
            # mark it accessed (adding Vary: Cookie) where the serial page would not.
            out["session"] = self.encode(dict(cache), f"{path}.session")
        return out


def _can_run_remotely(qs: QuerySet) -> bool:
    """A queryset the worker can run itself from its SQL: plain model rows, nothing joined in."""
    return (
        qs._iterable_class is ModelIterable
        and qs.query.select_related is False
        and not qs._known_related_objects
        and all(isinstance(x, str) for x in qs._prefetch_related_lookups)
        and not qs.query.combinator
        and not qs._fields
    )


def _tz_name(tz: datetime.tzinfo | None, path: str) -> Any:
    if tz is None:
        return None
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    if tz is datetime.timezone.utc:
        return "UTC"
    if isinstance(tz, datetime.timezone):
        offset = tz.utcoffset(None)
        return {"offset": offset.total_seconds(), "name": tz.tzname(None)}
    raise Unsendable(path, tz, "only zoneinfo and fixed-offset time zones can be sent")


# -- decoding (in the worker) --------------------------------------------------------------


# What the encoder leaves as orjson data: everything else decodes to itself.
_CONTAINERS = frozenset((list, dict))


class Decoder:
    def __init__(self) -> None:
        self._refs: dict[int, models.Model] = {}

    def decode(self, data: Any) -> Any:
        t = type(data)
        if t is list:
            return [v if type(v) not in _CONTAINERS else self.decode(v) for v in data]
        if t is not dict or not data:
            return data
        tag, first = next(iter(data.items()))
        if tag == "$d":
            return {k: v if type(v) not in _CONTAINERS else self.decode(v) for k, v in first.items()}
        if tag == "$s":
            return mark_safe(first)
        if tag == "$t":
            return tuple(self.decode(v) for v in first)
        if tag == "$m":
            return self._model(data)
        if tag == "$ref":
            return self._refs[first]
        if tag == "$dec":
            return decimal.Decimal(first)
        if tag == "$dt":
            value = datetime.datetime.fromisoformat(first)
            return value.replace(tzinfo=_tz_from(data["tz"])) if data["tz"] is not None else value
        if tag == "$date":
            return datetime.date.fromisoformat(first)
        if tag == "$time":
            value = datetime.time.fromisoformat(first)
            return value.replace(tzinfo=_tz_from(data["tz"])) if data["tz"] is not None else value
        if tag == "$td":
            return datetime.timedelta(days=first[0], seconds=first[1], microseconds=first[2])
        if tag == "$uuid":
            return uuid.UUID(first)
        if tag == "$i":
            return int(first)
        if tag == "$f":
            return float(first)
        if tag == "$qs":
            return self._queryset(data)
        if tag == "$req":
            return self._request(data)
        if tag == "$proc":
            return ProcessorValue(first)
        if tag == "$x":
            return custom_codecs_by_tag()[first].decode(data["v"])
        if tag == "$anon":
            from django.contrib.auth.models import AnonymousUser

            return AnonymousUser()
        if tag == "$perms":
            from django.contrib.auth.context_processors import PermWrapper

            return PermWrapper(self.decode(first))
        raise ValueError(f"unknown value tag {tag!r}")

    def _model(self, data: dict) -> models.Model:
        model = apps.get_model(data["$m"])
        fields = data["f"]
        names = list(fields)
        obj = model.from_db(data["db"], names, [self.decode(fields[n]) for n in names])
        if data.get("new"):
            obj._state.adding = True
        self._refs[data["id"]] = obj
        for key, value in data.get("x", {}).items():
            obj.__dict__[key] = self.decode(value)
        for name, value in data.get("r", {}).items():
            obj._state.fields_cache[name] = None if value is None else self.decode(value)
        if "p" in data:
            obj._prefetched_objects_cache = {name: self.decode(v) for name, v in data["p"].items()}
        return obj

    def _queryset(self, data: dict) -> QuerySet:
        model = apps.get_model(data["$qs"])
        if "rows" in data:
            qs = model._default_manager.db_manager(data["db"]).all()
            qs._result_cache = [self.decode(r) for r in data["rows"]]
            qs._prefetch_done = True
            return qs
        qs = RemoteQuerySet(model=model, using=data["db"])
        qs._remote = (data["sql"], [self.decode(v) for v in data["params"]], data["prefetch"])
        return qs

    def _request(self, data: dict) -> HttpRequest:
        request = RemoteRequest()
        request._master_attrs = frozenset(data.get("has", ()))
        request.method = data["method"]
        request.path = data["path"]
        request.path_info = data["path_info"]
        request.GET = QueryDict(mutable=True)
        for key, values in data["GET"]:
            request.GET.setlist(key, values)
        request.GET._mutable = False
        request.COOKIES = data["COOKIES"]
        request.META.update(data["META"])
        request._remote_scheme = data["scheme"]
        for attr in ("LANGUAGE_CODE", "current_app"):
            if attr in data:
                setattr(request, attr, data[attr])
        if "match" in data:
            from django.urls import ResolverMatch

            m = data["match"]
            request.resolver_match = ResolverMatch(
                func=_remote_view,
                args=self.decode(m["args"]),
                kwargs=self.decode(m["kwargs"]),
                url_name=m["url_name"],
                app_names=[x for x in (m["app_name"] or "").split(":") if x],
                namespaces=[x for x in (m["namespace"] or "").split(":") if x],
                route=m["route"],
            )
        if "user" in data:
            request.user = self.decode(data["user"])
        if "session" in data:
            request.session = RemoteSession(self.decode(data["session"]))
        return request


def _remote_view(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
    raise RuntimeError("a rebuilt request cannot be dispatched")


def _tz_from(value: Any) -> datetime.tzinfo:
    if isinstance(value, str):
        if value == "UTC":
            return datetime.timezone.utc
        import zoneinfo

        return zoneinfo.ZoneInfo(value)
    return datetime.timezone(datetime.timedelta(seconds=value["offset"]), value["name"])


class ProcessorValue:
    """Stands for a value the worker's own context processors make from the rebuilt request."""

    def __init__(self, name: str) -> None:
        self.name = name


def run_worker_processors(request: HttpRequest, values: dict[str, Any]) -> dict[str, Any]:
    """Replace ProcessorValue placeholders by running PARALLEL_RENDER['WORKER_CONTEXT_PROCESSORS']."""
    from django.utils.module_loading import import_string

    from parallel_render import conf

    made: dict[str, Any] = {}
    for dotted in conf.get_config()["WORKER_CONTEXT_PROCESSORS"]:
        made.update(import_string(dotted)(request))
    out = {}
    for name, value in values.items():
        if isinstance(value, ProcessorValue):
            if name not in made:
                raise RemoteAttributeError(
                    f"{name} comes from a context processor this worker's WORKER_CONTEXT_PROCESSORS do not run"
                )
            value = made[name]
        out[name] = value
    return out


class RemoteSession(dict):
    """The session data the master had loaded, read-only in spirit: a worker never saves it."""

    accessed = True
    modified = False


class ValueCodec:
    """Base for a site's own value types (list subclasses in PARALLEL_RENDER['VALUE_CODECS']).

    `type` is the exact class handled, `tag` a short unique name; `encode` returns data
    orjson can serialize, and `decode` rebuilds the value from it in the worker.
    """

    type: type
    tag: str

    def encode(self, value: Any) -> Any:
        raise NotImplementedError

    def decode(self, data: Any) -> Any:
        raise NotImplementedError


@functools.cache
def custom_codecs() -> dict[type, ValueCodec]:
    from django.core.exceptions import ImproperlyConfigured
    from django.utils.module_loading import import_string

    from parallel_render import conf

    found: dict[type, ValueCodec] = {}
    tags: set[str] = set()
    for dotted in conf.get_config()["VALUE_CODECS"]:
        codec = import_string(dotted)()
        if not isinstance(getattr(codec, "type", None), type) or not isinstance(getattr(codec, "tag", None), str):
            raise ImproperlyConfigured(f"VALUE_CODECS entry {dotted!r} needs a `type` class and a `tag` string")
        if codec.tag in tags:
            raise ImproperlyConfigured(f"VALUE_CODECS entry {dotted!r} repeats the tag {codec.tag!r}")
        tags.add(codec.tag)
        found[codec.type] = codec
    return found


def custom_codecs_by_tag() -> dict[str, ValueCodec]:
    return {codec.tag: codec for codec in custom_codecs().values()}


class RemoteRequest(HttpRequest):
    """The request as the master's template saw it; unknown attributes fail loudly."""

    _remote_scheme = "http"

    def _get_scheme(self) -> str:
        return self._remote_scheme

    _master_attrs: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._master_attrs:
            raise AttributeError(name)
        raise RemoteAttributeError(
            f"request.{name} was not sent to the worker; this block must render in the master"
        )


class RemoteQuerySet(QuerySet):
    """A queryset the worker runs from the master's SQL, so its query runs in parallel.

    Only what a template can call without arguments is supported; anything that would build
    a new query raises, the block fails in the worker and the master renders it inline.
    """

    _remote: tuple[str, list, list[str]]

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            from django.db.models import prefetch_related_objects

            sql, params, prefetch = self._remote
            rows = list(self.model._default_manager.db_manager(self.db).raw(sql, params))
            if prefetch:
                prefetch_related_objects(rows, *prefetch)
            self._result_cache = rows
            self._prefetch_done = True

    def count(self) -> int:
        self._fetch_all()
        return len(self._result_cache)

    def exists(self) -> bool:
        self._fetch_all()
        return bool(self._result_cache)

    def all(self) -> RemoteQuerySet:
        return self

    def _chain(self, **kwargs: Any) -> QuerySet:
        raise RemoteAttributeError(
            "a queryset sent to a worker cannot build a new query; this block must render in the master"
        )
