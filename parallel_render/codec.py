"""Context values as orjson-safe data, and back, so a worker sees what the master saw.

The policy (docs/values.md): JSON scalars, strings (safe strings stay safe), lists, tuples,
dicts with string keys, Decimal, date/time/datetime/timedelta, UUID, lazy translations
(resolved in the master's active language), model instances (loaded fields, extra
attributes, select_related and prefetch caches), querysets, the request, the user and
perms. Anything else raises Unsendable naming the value's path and type, and the block
renders inline. Nothing here imports or calls code named by the payload: models are looked up
in the app registry, and that is all.

What travels is only what the block can read (docs/what-a-job-carries.md): the parts of the
request the block reads (cookies and session keys it names, never the session or CSRF cookie,
the CSRF secret or the session's auth hash), model fields minus sensitive ones (a user's
password, the site's SENSITIVE_FIELDS, a model's PARALLEL_RENDER_SENSITIVE_FIELDS), and
querysets as SQL the worker runs read-only, after checking it is one SELECT.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import DatabaseError, models
from django.db.models.query import ModelIterable, QuerySet
from django.http import HttpRequest, QueryDict
from django.http.request import HttpHeaders
from django.utils.functional import LazyObject, Promise, cached_property, empty
from django.utils.safestring import SafeString, mark_safe

from parallel_render import readonly
from parallel_render.analysis import WHOLE, Reads

JSON_SCALARS = (str, int, float, bool, type(None))
MAX_INT = 2**63 - 1

# Request headers a template, a context processor or a request method (get_host(),
# get_full_path(), build_absolute_uri()) commonly reads: sent with every request. Other META
# keys travel only when the block names them (request.META.X, request.headers.X).
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
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
)

# META keys that are credentials: never sent, even when the block names them (it renders
# inline instead). CSRF_COOKIE is the CSRF secret the middleware read from the cookie; a
# block needs the masked token (csrf_token), which the master makes and sends.
PROTECTED_META_KEYS = frozenset(("HTTP_COOKIE", "CSRF_COOKIE", "HTTP_AUTHORIZATION", "HTTP_PROXY_AUTHORIZATION"))

# A value signed by django.core.signing (signed cookies, the messages cookie, the
# signed_cookies session): its signature is derived from SECRET_KEY, so it never travels.
_SIGNED_VALUE = re.compile(r":[A-Za-z0-9_-]{27}$|:[A-Za-z0-9_-]{43}$")


class Unsendable(Exception):
    """A value that cannot travel to a worker; the message names it and its type."""

    def __init__(self, path: str, value: Any, why: str = "") -> None:
        self.path = path
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        detail = f": {why}" if why else ""
        super().__init__(f"{path} is a {self.type_name}, which cannot be sent to a worker{detail}")


class NeverSent(Unsendable):
    """A value the block reads that never travels: a credential, a sensitive field.

    Unlike other unsendable values, a worker's context processor cannot make it again
    either: the block renders in the master.
    """


class RemoteAttributeError(Exception):
    """Raised by a rebuilt request for an attribute the master did not send.

    Deliberately not an AttributeError: a template would silently render it as empty, while
    the master's page would show the value. The worker fails the block and the master
    renders it inline instead.
    """


class RemoteQueryRefused(RemoteAttributeError):
    """A queryset a worker was sent whose SQL is not one read-only SELECT: never run.

    A RemoteAttributeError, so the job fails as "needs the master", and the master renders the
    block from its own queryset (the page is the serial page; the fallback is not shown).
    """


class Encoder:
    """Encodes one job's values.

    analysis (an analysis.Analysis of the block) says what the block reads of each top-level
    value: encode(value, name) with a name it has reads for sends only that part of a
    request or a model instance. Without one, every value is read whole: everything but what
    never travels (docs/what-a-job-carries.md).
    """

    def __init__(self, analysis: Any = None) -> None:
        self._seen: dict[int, int] = {}  # id(instance) -> reference number
        self._keep: list[Any] = []  # keep encoded objects alive so ids stay unique
        self._reads: dict[str, Reads] = analysis.reads if analysis is not None else {}
        self._attrs: set[str] | None = analysis.attrs if analysis is not None else None

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
            return self._model(value, path, self._reads.get(path, WHOLE))
        if isinstance(value, QuerySet):
            return self._queryset(value, path)
        if isinstance(value, HttpRequest):
            return self._request(value, path, self._reads.get(path, WHOLE))
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

    def _model(self, obj: models.Model, path: str, read: Reads = WHOLE) -> Any:
        """Loaded fields (minus sensitive ones), extra attributes, related and prefetch caches.

        When the block reads only fields and extra attributes of this value by name
        ({{ user.username }}), only those travel. A field the master had loaded but did not
        send is named in "w": the worker fails the block if anything reads it, so the master
        renders it, rather than query it.
        """
        model = type(obj)
        sensitive = sensitive_fields(model)
        if sensitive and self._attrs is not None:
            named = sensitive.intersection(self._attrs)
            if named:
                field_name = sorted(named)[0]
                raise NeverSent(
                    f"{path}.{field_name}", obj,
                    f"the block may read {model._meta.label}.{field_name}, a sensitive field, which never "
                    "travels (docs/what-a-job-carries.md)",
                )
        wanted = None if read.whole else _named_fields(obj, read)
        ref = self._seen.get(id(obj))
        if ref is not None:
            return {"$ref": ref}
        meta = obj._meta
        state = obj.__dict__
        fields = {}
        withheld = []
        attnames, attname_set, pk_name = _model_attnames(model)
        for attname in attnames:
            if attname not in state:
                continue
            if attname in sensitive or (wanted is not None and attname not in wanted and attname != pk_name):
                withheld.append(attname)
                continue
            fields[attname] = self.encode(state[attname], f"{path}.{attname}")
        out: dict[str, Any] = {"$m": meta.label_lower, "db": obj._state.db, "f": fields}
        if wanted is None:
            # Read whole: the same instance twice is one object in the worker too.
            ref = self._seen[id(obj)] = len(self._seen)
            self._keep.append(obj)
            out["id"] = ref
        extra = {}
        related = {}
        prefetched = {}
        for key, val in state.items():
            if key in attname_set or key == "_state" or key in sensitive:
                continue
            if key == "_prefetched_objects_cache":
                if wanted is None:
                    for name, qs in val.items():
                        if name not in sensitive:
                            prefetched[name] = self.encode(qs, f"{path}.{name}")
                continue
            if key.startswith("_"):
                # Private caches (e.g. _django_cleanup) are rebuilt on demand in the worker.
                continue
            if type(val) is _Withheld:  # a worker passing on an instance it was sent
                withheld.extend(val.names)
                continue
            if wanted is not None and key not in wanted:
                continue
            extra[key] = self.encode(val, f"{path}.{key}")
        if wanted is None:
            for name, cached in obj._state.fields_cache.items():
                if name not in sensitive:
                    related[name] = None if cached is None else self.encode(cached, f"{path}.{name}")
        if obj._state.adding:
            out["new"] = 1
        if withheld:
            out["w"] = withheld
        if extra:
            out["x"] = extra
        if related:
            out["r"] = related
        if prefetched:
            out["p"] = prefetched
        return out

    def _queryset(self, qs: QuerySet, path: str) -> Any:
        label = qs.model._meta.label_lower
        if self._attrs is not None:
            named = sensitive_fields(qs.model).intersection(self._attrs)
            if named:
                raise NeverSent(
                    path, qs, f"the block may read {qs.model._meta.label}.{sorted(named)[0]}, a sensitive field, "
                    "which never travels (docs/what-a-job-carries.md)",
                )
        remote = None
        if qs._result_cache is None and isinstance(qs, RemoteQuerySet):
            remote = qs._remote  # a worker passing on what it was sent (a nested block)
        elif qs._result_cache is None and _can_run_remotely(qs) and _read_only_vendor(qs.db):
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
        if qs._iterable_class is not ModelIterable:
            field_name = _sensitive_column(qs)
            if field_name is not None:
                raise NeverSent(path, qs, f"its rows hold {field_name}, a sensitive field, which never travels")
        # Anything else is evaluated here, as serial rendering would when it reads it.
        rows = list(qs)
        return {"$qs": label, "db": qs.db, "rows": [self.encode(r, f"{path}[{i}]") for i, r in enumerate(rows)]}

    def _request(self, request: HttpRequest, path: str, read: Reads = WHOLE) -> Any:
        """What a template can see of the request, limited to what the block reads of it.

        Always: method, path, GET, scheme, the common headers of REQUEST_META_KEYS, language,
        current app and resolver match. The user, the cookies and the session only when the
        block reads them (a request read whole, or one sent for WORKER_CONTEXT_PROCESSORS,
        reads them all); named cookies and session keys alone when it names them. Never:
        the session and CSRF cookies, signed cookies, the CSRF secret, the session's auth
        hash, the session key. The worker's request fails the block on a read of anything not
        sent, so the master renders it (never an empty value where the master had one).
        """
        meta_read = read.below("META")
        headers_read = read.below("headers")
        named_meta: list[str] = []
        for below, to_key in ((meta_read, str), (headers_read, _header_meta_key)):
            if below is not None and not below.whole:
                for name in below.children:
                    if hasattr(dict, name):
                        continue  # a method (request.META.items): the guard below answers it
                    key = to_key(name)
                    if key in PROTECTED_META_KEYS or key == _csrf_header():
                        raise NeverSent(f"{path}.META.{key}", request, "it is a credential, which never travels")
                    named_meta.append(key)
        request_meta = request.META
        keys = _meta_keys()
        meta = {k: request_meta[k] for k in keys if type(request_meta.get(k)) is str}
        if isinstance(request_meta, PartialDict):  # a worker passing on what it was sent
            meta_known = request_meta.known_keys(keys)
        else:
            meta_known = list(keys)
        for key in named_meta:
            if type(request_meta.get(key)) is str:
                meta[key] = request_meta[key]
            meta_known.append(key)
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
            "META": {"v": meta, "a": sorted(set(meta_known) - set(meta))},
        }
        storage = getattr(request, "_messages", None)
        if storage is not None:
            # Only whether there is a message storage, and its level: adding or reading a
            # message in the worker makes the block the master's (RemoteMessages).
            level = getattr(storage, "level", None)
            out["msg"] = level if type(level) is int else None
        cookies_read = read.below("COOKIES")
        if cookies_read is not None:
            out["COOKIES"] = _cookies(request.COOKIES, cookies_read, path)
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
        user_read = read.below("user")
        if user_read is not None and hasattr(request, "user"):
            user = request.user
            if isinstance(user, LazyObject):
                if user._wrapped is empty:
                    user._setup()
                user = user._wrapped
            out["user"] = (
                self._model(user, f"{path}.user", user_read) if isinstance(user, models.Model)
                else self.encode(user, f"{path}.user")
            )
        session_read = read.below("session")
        if session_read is not None:
            session = getattr(request, "session", None)
            if isinstance(session, RemoteSession):
                out["session"] = self._session(session, session, session_read, path)
            else:
                cache = getattr(session, "_session_cache", None)
                if isinstance(cache, dict):
                    # Only a session the view already loaded: loading it here would cost a query
                    # and mark it accessed (adding Vary: Cookie) where the serial page would not.
                    out["session"] = self._session(session, cache, session_read, path)
        return out

    def _session(self, session: Any, data: dict, read: Reads, path: str) -> Any:
        from django.contrib.auth import HASH_SESSION_KEY

        withheld = {HASH_SESSION_KEY} & data.keys() if read.whole else set()
        if isinstance(data, PartialDict):
            withheld |= data.withheld
        names = None if read.whole else list(read.children)
        if names is not None:
            for name in names:
                if name == HASH_SESSION_KEY or name in ("session_key", "_session_key", "_SessionBase__session_key"):
                    raise NeverSent(
                        f"{path}.session.{name}", session,
                        "the session id and its auth hash (derived from SECRET_KEY) never travel",
                    )
                if name not in data and _session_attribute(session, name):
                    # A method or attribute of the session (items, get_expiry_age...): anything
                    # may be read; send what may travel and let the worker's guard fail the rest.
                    return self._session(session, data, WHOLE, path)
        if names is None:
            keys = [k for k in (data if not isinstance(data, PartialDict) else dict.keys(data)) if k not in withheld]
            values = {k: self.encode(data[k], f"{path}.session.{k}") for k in keys}
            out: dict[str, Any] = {"v": values}
            if isinstance(data, PartialDict) and data.absent is not None:
                out["a"] = sorted(data.absent)
            if withheld:
                out["w"] = sorted(withheld)
            return out
        values = {}
        absent = []
        for name in names:
            if dict.__contains__(data, name):
                values[name] = self.encode(data[name], f"{path}.session.{name}")
            elif not isinstance(data, PartialDict) or data.knows_absent(name):
                absent.append(name)
        return {"v": values, "a": sorted(absent)}


def _cookies(cookies: dict[str, str], read: Reads, path: str) -> dict[str, Any]:
    """The cookies the block reads, without the session and CSRF cookies or signed ones."""
    protected = _protected_cookies()
    if isinstance(cookies, PartialDict):
        withheld = set(cookies.withheld)
        absent = cookies.absent
    else:
        withheld = set()
        absent = None
    if not read.whole and not any(hasattr(dict, name) for name in read.children):
        values = {}
        known_absent = []
        for name in read.children:
            value = cookies.get(name) if not isinstance(cookies, PartialDict) else dict.get(cookies, name)
            if name in protected or name in withheld or (value is not None and _SIGNED_VALUE.search(value)):
                raise NeverSent(
                    f"{path}.COOKIES.{name}", value,
                    "the session and CSRF cookies and signed cookies never travel",
                )
            if value is not None:
                values[name] = value
            elif absent is None or name in absent:
                known_absent.append(name)
        return {"v": values, "a": sorted(known_absent)}
    values = {}
    for name, value in (cookies.items() if not isinstance(cookies, PartialDict) else dict.items(cookies)):
        if name in protected or _SIGNED_VALUE.search(value):
            withheld.add(name)
        else:
            values[name] = value
    out: dict[str, Any] = {"v": values}
    if absent is not None:
        out["a"] = sorted(absent)
    if withheld:
        out["w"] = sorted(withheld)
    return out


def _meta_keys() -> tuple[str, ...]:
    """REQUEST_META_KEYS, and the header SECURE_PROXY_SSL_HEADER names (request.is_secure())."""
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy and proxy[0] not in REQUEST_META_KEYS and proxy[0] not in PROTECTED_META_KEYS:
        return (*REQUEST_META_KEYS, proxy[0])
    return REQUEST_META_KEYS


def _protected_cookies() -> tuple[str, ...]:
    return (settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME, "messages")


def _csrf_header() -> str:
    return settings.CSRF_HEADER_NAME


def _header_meta_key(name: str) -> str:
    return HttpHeaders.to_wsgi_name(name.replace("_", "-"))


def _session_attribute(session: Any, name: str) -> bool:
    """Whether a template lookup of `name` on the master's session can find an attribute."""
    if isinstance(session, RemoteSession):
        return True  # the worker does not know the master's session class: assume it may
    return hasattr(type(session), name) or name in vars(session)


_attnames: dict[type, tuple[tuple[str, ...], frozenset[str], str | None]] = {}


def _model_attnames(model: type) -> tuple[tuple[str, ...], frozenset[str], str | None]:
    """A model's concrete attnames (in order, and as a set) and its primary key's attname."""
    found = _attnames.get(model)
    if found is None:
        meta = model._meta
        names = tuple(f.attname for f in meta.concrete_fields)
        found = _attnames[model] = (names, frozenset(names), meta.pk.attname if meta.pk is not None else None)
    return found


def _named_fields(obj: models.Model, read: Reads) -> set[str] | None:
    """The attnames and extra attributes a block reads of an instance, when it reads nothing
    else (no method, property or relation); None when only the whole instance will do."""
    meta = obj._meta
    state = obj.__dict__
    wanted = set()
    for name in read.children:
        if name == "pk":
            continue
        try:
            field = meta.get_field(name)
        except Exception:
            field = None
        if field is not None:
            if not field.concrete or field.is_relation or field.attname != name:
                return None
            wanted.add(name)
        elif name in state and not name.startswith("_") and not isinstance(getattr(type(obj), name, None), property):
            wanted.add(name)  # an attribute the view set (an annotation, say)
        elif name in ("is_authenticated", "is_anonymous") and _base_user_attribute(type(obj), name):
            continue
        else:
            return None
    return wanted


def _base_user_attribute(model: type, name: str) -> bool:
    try:
        from django.contrib.auth.base_user import AbstractBaseUser
    except Exception:  # pragma: no cover - auth not importable
        return False
    return issubclass(model, AbstractBaseUser) and getattr(model, name) is getattr(AbstractBaseUser, name)


# -- sensitive fields ---------------------------------------------------------------------

_sensitive: dict[type, frozenset[str]] = {}
_sensitive_source: list[Any] = [None]


def sensitive_fields(model: type) -> frozenset[str]:
    """The names (field names and attnames) of a model's fields that never travel.

    password of every AbstractBaseUser; session_key and session_data of every session model;
    PARALLEL_RENDER["SENSITIVE_FIELDS"] ("app_label.ModelName.field"); the names in the
    model's own PARALLEL_RENDER_SENSITIVE_FIELDS (inherited, like any class attribute).
    """
    from parallel_render import conf

    source = conf.get_config()["SENSITIVE_FIELDS"]
    if source is not _sensitive_source[0]:
        _sensitive.clear()
        _sensitive_source[0] = source
    found = _sensitive.get(model)
    if found is None:
        found = _sensitive[model] = _sensitive_for(model, source)
    return found


def clear_sensitive_cache() -> None:
    _sensitive.clear()
    _sensitive_source[0] = None


def _sensitive_for(model: type, source: list[str]) -> frozenset[str]:
    names: set[str] = set()
    try:
        from django.contrib.auth.base_user import AbstractBaseUser
        from django.contrib.sessions.base_session import AbstractBaseSession
    except Exception:  # pragma: no cover - contrib not importable
        pass
    else:
        if issubclass(model, AbstractBaseUser):
            names.add("password")
        if issubclass(model, AbstractBaseSession):
            names.update(("session_key", "session_data"))
    own = getattr(model, "PARALLEL_RENDER_SENSITIVE_FIELDS", ())
    if isinstance(own, str):
        own = (own,)
    names.update(own)
    labels = {m._meta.label_lower for m in model._meta.get_parent_list()} | {model._meta.label_lower}
    for entry in source:
        label, _, field_name = entry.rpartition(".")
        if label.lower() in labels:
            names.add(field_name)
    out = set()
    for name in names:
        try:
            field = model._meta.get_field(name)
        except Exception:
            out.add(name)  # checks.py reports it; withhold the attribute anyway
            continue
        out.add(field.name)
        attname = getattr(field, "attname", None)
        if attname:
            out.add(attname)
    return frozenset(out)


def _sensitive_column(qs: QuerySet) -> str | None:
    """A sensitive field among the columns of a values()/values_list() queryset, or None."""
    model = qs.model
    query = qs.query
    selected = list(query.values_select) or [f.attname for f in model._meta.concrete_fields]
    for lookup in selected:
        current = model
        for part in lookup.split("__"):
            if part in sensitive_fields(current):
                return f"{current._meta.label}.{part}"
            try:
                field = current._meta.get_field(part)
            except Exception:
                break
            if not field.is_relation or field.related_model is None:
                break
            current = field.related_model
    return None


def _read_only_vendor(alias: str) -> bool:
    """Whether a worker can run a queryset on this database read-only (else the master runs it)."""
    from django.db import connections

    return connections[alias].vendor in readonly.VENDORS


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
        if "id" in data:
            self._refs[data["id"]] = obj
        if "w" in data:
            obj.__dict__["refresh_from_db"] = _Withheld(obj, frozenset(data["w"]))
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
        if "msg" in data:
            request._messages = RemoteMessages(data["msg"])
        request.method = data["method"]
        request.path = data["path"]
        request.path_info = data["path_info"]
        request.GET = QueryDict(mutable=True)
        for key, values in data["GET"]:
            request.GET.setlist(key, values)
        request.GET._mutable = False
        request.META = _partial(data["META"], "request.META")
        request.COOKIES = _partial(data["COOKIES"], "request.COOKIES") if "COOKIES" in data else PartialDict(
            {}, "request.COOKIES", absent=frozenset()
        )
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
            sent = data["session"]
            request.session = RemoteSession(
                {k: v if type(v) not in _CONTAINERS else self.decode(v) for k, v in sent["v"].items()},
                "request.session", absent=_maybe_set(sent.get("a")), withheld=frozenset(sent.get("w", ())),
            )
        return request


def _maybe_set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def _partial(sent: dict[str, Any], label: str) -> dict[str, Any]:
    """A dict sent as {"v": values, "a": keys known absent, "w": keys withheld}: a plain dict when
    it is all the master had, else a PartialDict that fails the block on what it lacks."""
    absent = sent.get("a")
    withheld = sent.get("w")
    if absent is None and not withheld:
        return dict(sent["v"])
    return PartialDict(sent["v"], label, absent=_maybe_set(absent), withheld=frozenset(withheld or ()))


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


class PartialDict(dict):
    """Part of a dict the master had: the worker fails the block on a read of the rest.

    absent: None when every key the master had is here or withheld; else the keys known to be
    missing on the master too (a lookup of any other key is unknown). withheld: keys the master
    had that never travel. A lookup of a key here, or of one known absent, behaves as on the
    master; anything else, and anything that would show every key (iteration, len, repr),
    raises RemoteAttributeError, so the master renders the block. Template lookups find keys
    with [] first (__missing__), then attributes, as on any dict.
    """

    __slots__ = ("absent", "label", "withheld")

    def __init__(
        self, values: dict[str, Any], label: str, absent: frozenset[str] | None = None,
        withheld: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(values)
        self.label = label
        self.absent = absent
        self.withheld = withheld

    def knows_absent(self, key: Any) -> bool:
        return key not in self.withheld and (self.absent is None or key in self.absent)

    def known_keys(self, keys: Any) -> list[str]:
        """Which of these keys a lookup answers (present or known absent), to pass on."""
        return [k for k in keys if dict.__contains__(self, k) or self.knows_absent(k)]

    def _unknown(self, key: Any) -> None:
        if not self.knows_absent(key):
            raise RemoteAttributeError(
                f"{self.label}[{key!r}] was not sent to the worker; this block must render in the master"
            )

    def _all(self) -> None:
        if self.absent is not None or self.withheld:
            raise RemoteAttributeError(
                f"only part of {self.label} was sent to the worker; this block must render in the master"
            )

    def __missing__(self, key: Any) -> Any:
        self._unknown(key)
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        self._unknown(key)
        return default

    def __contains__(self, key: Any) -> bool:
        if dict.__contains__(self, key):
            return True
        self._unknown(key)
        return False

    def __iter__(self) -> Iterator[Any]:
        self._all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._all()
        return dict.__len__(self)

    def __repr__(self) -> str:
        self._all()
        return dict.__repr__(self)

    def __eq__(self, other: object) -> bool:
        self._all()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def keys(self) -> Any:
        self._all()
        return dict.keys(self)

    def values(self) -> Any:
        self._all()
        return dict.values(self)

    def items(self) -> Any:
        self._all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self._all()
        return dict(dict.items(self))

    def __reduce__(self) -> Any:
        raise TypeError(f"{self.label} is part of what the master had, and cannot be pickled")


class RemoteSession(PartialDict):
    """The session data the master had loaded, as much as the block reads: never saved.

    Its other attributes (session_key, get_expiry_age, ...) were not sent: reading one fails
    the block, except a key known absent on the master, which its session had no attribute
    for either (so a template finds nothing there, as on the master).
    """

    __slots__ = ()

    accessed = True
    modified = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or (self.absent is not None and name in self.absent):
            raise AttributeError(name)
        raise RemoteAttributeError(
            f"request.session.{name} was not sent to the worker; this block must render in the master"
        )

    def _changes(self, *args: Any, **kwargs: Any) -> Any:
        # A change here would be lost with this copy: the master renders the block, on the
        # session that is saved with its response.
        raise SideEffect("the block changes request.session; it renders in the master, whose session is saved")

    __setitem__ = __delitem__ = pop = popitem = setdefault = update = clear = _changes


class SideEffect(RemoteAttributeError):
    """The block changes the request it was given (its session, its messages). Only the
    master's request lives on after the page, so the master renders the block, and keeps it
    from then on (ParallelNode.learned_reason)."""


class RemoteMessages:
    """Stands for the master's message storage (django.contrib.messages) in a rebuilt request.

    Adding a message, or reading them (which marks them shown), changes the master's storage:
    either makes the block one the master renders. The level may be read, as on the master.
    """

    __slots__ = ("level",)

    def __init__(self, level: int | None) -> None:
        self.level = level

    def add(self, level: int, message: Any, extra_tags: str = "") -> None:
        raise SideEffect("the block adds a message; it renders in the master, whose messages are kept")

    def _reads(self, *args: Any) -> Any:
        raise SideEffect("the block reads the messages, which marks them shown; it renders in the master")

    __iter__ = __len__ = __contains__ = __getitem__ = _reads


class _Withheld:
    """Stands in for refresh_from_db on a rebuilt instance whose master had fields it did not
    send (sensitive, or not read by the block): reading one fails the block, so the master
    renders it, instead of a query that could see other data than the master's instance had."""

    __slots__ = ("instance", "names")

    def __init__(self, instance: models.Model, names: frozenset[str]) -> None:
        self.instance = instance
        self.names = names

    def __call__(self, using: str | None = None, fields: Any = None, from_queryset: Any = None) -> None:
        instance = self.instance
        label = instance._meta.label
        if fields is None or self.names.intersection(fields):
            name = sorted(self.names.intersection(fields or self.names))[0]
            raise RemoteAttributeError(
                f"{label}.{name} was not sent to the worker; this block must render in the master"
            )
        type(instance).refresh_from_db(instance, using=using, fields=fields, from_queryset=from_queryset)


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

    def __init__(self) -> None:
        super().__init__()
        # Never sent (a block reading them renders in the master): see __getattr__.
        del self.POST, self.FILES

    def _get_scheme(self) -> str:
        return self._remote_scheme

    @property
    def scheme(self) -> str:
        # The master's answer, SECURE_PROXY_SSL_HEADER included.
        return self._remote_scheme

    @cached_property
    def headers(self) -> Any:
        return RemoteHeaders(self.META)

    _master_attrs: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or (name not in self._master_attrs and name not in _NEVER_SENT):
            raise AttributeError(name)
        raise RemoteAttributeError(
            f"request.{name} was not sent to the worker; this block must render in the master"
        )


_NEVER_SENT = frozenset(("POST", "FILES", "body"))


class RemoteHeaders(HttpHeaders):
    """request.headers from the META keys sent: a header whose key was not sent fails."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self._meta = meta
        super().__init__(dict(dict.items(meta)))

    def _all(self) -> None:
        if isinstance(self._meta, PartialDict):
            self._meta._all()

    def __getitem__(self, key: str) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            if isinstance(self._meta, PartialDict):
                self._meta._unknown(self.to_wsgi_name(key.replace("_", "-")))
            raise

    def __iter__(self) -> Iterator[str]:
        self._all()
        return super().__iter__()

    def __len__(self) -> int:
        self._all()
        return super().__len__()

    def __repr__(self) -> str:
        self._all()
        return super().__repr__()


class RemoteQuerySet(QuerySet):
    """A queryset the worker runs from the master's SQL, so its query runs in parallel.

    Only what a template can call without arguments is supported; anything that would build
    a new query raises, the block fails in the worker and the master renders it inline.
    """

    _remote: tuple[str, list, list[str]]

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            from django.db import connections
            from django.db.models import prefetch_related_objects

            sql, params, prefetch = self._remote
            connection = connections[self.db]
            # The SQL came in a job: run it only if it is one SELECT, and only read-only.
            try:
                readonly.check_select(sql, connection.vendor)
                with readonly.read_only(connection):
                    rows = list(self.model._default_manager.db_manager(self.db).raw(sql, params))
                    if prefetch:
                        prefetch_related_objects(rows, *prefetch)
            except readonly.QueryRefused as exc:
                raise RemoteQueryRefused(f"the queryset sent to this worker was refused: {exc}") from exc
            except DatabaseError as exc:
                if not readonly.is_refusal(exc):
                    raise
                raise RemoteQueryRefused(f"the database refused the queryset sent to this worker: {exc}") from exc
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

    def iterator(self, chunk_size: int | None = None) -> Iterator[Any]:
        # QuerySet.iterator() would run this queryset's own (empty) query: all rows.
        self._fetch_all()
        return iter(self._result_cache)

    def _chain(self, **kwargs: Any) -> QuerySet:
        raise RemoteAttributeError(
            "a queryset sent to a worker cannot build a new query; this block must render in the master"
        )
