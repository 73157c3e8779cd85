"""System checks: settings that are wrong, and middleware orders that would break pages."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

MIDDLEWARE_PATH = "parallel_render.middleware.ParallelRenderMiddleware"

# Middleware that read or rewrite the whole body: they must see the stitched page, so they
# have to come before ours in MIDDLEWARE (and so wrap it).
BODY_MIDDLEWARE = (
    "django.middleware.gzip.GZipMiddleware",
    "django.middleware.http.ConditionalGetMiddleware",
)


@checks.register(checks.Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from parallel_render import conf

    errors: list[checks.CheckMessage] = []
    try:
        conf.get_config()
    except ImproperlyConfigured as exc:
        errors.append(checks.Error(str(exc), hint="Fix the PARALLEL_RENDER setting.", id="parallel_render.E001"))
        return errors
    errors += check_sensitive_fields()
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH in middleware:
        ours = middleware.index(MIDDLEWARE_PATH)
        for path in BODY_MIDDLEWARE:
            if path in middleware and middleware.index(path) > ours:
                errors.append(
                    checks.Warning(
                        f"{path} comes after {MIDDLEWARE_PATH} in MIDDLEWARE, so it sees the page "
                        "before the parallel fragments are stitched in.",
                        hint=f"Move {MIDDLEWARE_PATH} after {path}.",
                        id="parallel_render.W001",
                    )
                )
    apps_list = list(settings.INSTALLED_APPS)
    if "parallel_render" in apps_list and "django.contrib.staticfiles" in apps_list:
        if apps_list.index("django.contrib.staticfiles") < apps_list.index("parallel_render"):
            errors.append(
                checks.Warning(
                    "django.contrib.staticfiles comes before parallel_render in INSTALLED_APPS, so "
                    "its runserver is used and no router or workers start.",
                    hint="Put 'parallel_render' before 'django.contrib.staticfiles'.",
                    id="parallel_render.W002",
                )
            )
    return errors


@checks.register(checks.Tags.caches)
def check_fragment_cache(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The fragment cache's client must give up on a server that does not answer."""
    from parallel_render import cache, conf

    try:
        alias = conf.get_config()["CACHE"]
    except ImproperlyConfigured:
        return []  # check_settings reports it
    if alias is None:
        return []
    missing = cache.missing_timeouts((getattr(settings, "CACHES", None) or {}).get(alias) or {})
    if not missing:
        return []
    return [checks.Warning(
        f"The fragment cache (CACHES[{alias!r}], PARALLEL_RENDER['CACHE']) has no {' or '.join(missing)} "
        "OPTIONS: its client waits as long as the operating system lets it for a server that stopped "
        "answering, and so do the pages with cached blocks.",
        hint="Set " + ", ".join(f"OPTIONS[{name!r}]" for name in missing) + " to a fraction of a second "
             "(docs/cache.md shows an example for memcached and Redis).",
        id="parallel_render.W007",
    )]


@checks.register(checks.Tags.compatibility)
def check_fastrouter(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Where this process would start a router (runserver) but none can run here, say why."""
    import sys

    from parallel_render import conf

    try:
        config = conf.get_config()
    except ImproperlyConfigured:
        return []  # check_settings reports it
    if not config["ENABLED"] or config["ROUTER"] or conf.worker_count() == 0:
        return []  # nothing to start: a router elsewhere, or none wanted
    problem = conf.fastrouter_problem()
    if problem is None:
        return []
    if not sys.platform.startswith("linux"):
        hint = ("Pages are still right, rendered as plain Django would. For parallel rendering run the site "
                "on Linux; to silence this, add 'parallel_render.W005' to SILENCED_SYSTEM_CHECKS.")
    else:
        hint = ("Install a C++17 compiler (e.g. `apt install g++`) and reinstall parallel_render from its source "
                "(`pip install --force-reinstall --no-deps PATH`; `pip install -v` shows the build), or set "
                "PARALLEL_RENDER['FASTROUTER_BINARY'] to a router you built (cmake -S fastrouter -B build && "
                "cmake --build build).")
    return [
        checks.Warning(
            f"Every {{% parallel %}} block renders inline: {problem}.",
            hint=hint,
            id="parallel_render.W005",
        )
    ]


@checks.register(checks.Tags.templates)
def check_blocks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """In DEBUG, every {% parallel %} block that will render inline, and why."""
    if not settings.DEBUG:
        return []
    from parallel_render import inspection

    warnings: list[checks.CheckMessage] = []
    try:
        reports = list(inspection.project_blocks())
    except Exception as exc:  # a broken template is Django's own check to report
        return [checks.Warning(f"could not inspect templates: {exc}", id="parallel_render.W004")]
    for report in reports:
        if report.reason is not None:
            warnings.append(
                checks.Warning(
                    f"{{% parallel %}} block at {report.template}:{report.line} renders inline: {report.reason}.",
                    hint="Run `manage.py parallel_check` for every block; the README lists what makes a block inline.",
                    obj=report.template,
                    id="parallel_render.W003",
                )
            )
        if report.cache_warning is not None:
            names = " or ".join(f"key={name}" for name in report.unkeyed)
            warnings.append(
                checks.Warning(
                    f"{{% parallel %}} block at {report.template}:{report.line} is {report.cache_warning}: "
                    "its cached HTML would be shown to other requests.",
                    hint=f"Add {names} (or a key= of the part it reads, e.g. key=user.pk) to its tag, or do not "
                         "cache it; docs/cache.md lists what never goes into a key.",
                    obj=report.template,
                    id="parallel_render.W006",
                )
            )
    return warnings


def check_sensitive_fields() -> list[checks.CheckMessage]:
    """PARALLEL_RENDER['SENSITIVE_FIELDS'] and models' PARALLEL_RENDER_SENSITIVE_FIELDS name real fields.

    A typo would let the field travel to the workers while the site believes it does not.
    """
    from django.apps import apps
    from django.core.exceptions import FieldDoesNotExist

    from parallel_render import conf

    errors: list[checks.CheckMessage] = []
    for entry in conf.get_config()["SENSITIVE_FIELDS"]:
        label, _, field_name = entry.rpartition(".")
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            errors.append(checks.Error(
                f"PARALLEL_RENDER['SENSITIVE_FIELDS'] names {entry!r}, but there is no model {label!r}.",
                hint="Write each entry as \"app_label.ModelName.field\", e.g. \"accounts.Profile.phone\", "
                     "for an installed app.",
                id="parallel_render.E002",
            ))
            continue
        try:
            model._meta.get_field(field_name)
        except FieldDoesNotExist:
            errors.append(checks.Error(
                f"PARALLEL_RENDER['SENSITIVE_FIELDS'] names {entry!r}, but {model._meta.label} has no field "
                f"{field_name!r}.",
                hint=f"Use one of the field names of {model._meta.label}: "
                     + ", ".join(sorted(f.name for f in model._meta.get_fields() if f.concrete)) + ".",
                obj=model,
                id="parallel_render.E002",
            ))
    for model in apps.get_models():
        own = model.__dict__.get("PARALLEL_RENDER_SENSITIVE_FIELDS")
        if own is None:
            continue
        if not isinstance(own, (list, tuple)) or not all(isinstance(name, str) for name in own):
            errors.append(checks.Error(
                f"{model._meta.label}.PARALLEL_RENDER_SENSITIVE_FIELDS must be a list or tuple of field names, "
                f"not {own!r}.",
                hint='For example PARALLEL_RENDER_SENSITIVE_FIELDS = ["email", "phone"].',
                obj=model,
                id="parallel_render.E003",
            ))
            continue
        for name in own:
            try:
                model._meta.get_field(name)
            except FieldDoesNotExist:
                errors.append(checks.Error(
                    f"{model._meta.label}.PARALLEL_RENDER_SENSITIVE_FIELDS names {name!r}, which is not one of its "
                    "fields.",
                    hint="List field names of this model (inherited fields included).",
                    obj=model,
                    id="parallel_render.E003",
                ))
    return errors


@checks.register(checks.Tags.compatibility)
def check_tracing(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """PARALLEL_RENDER['OTEL'] is on: opentelemetry-api must import, and OTEL_WORKER_SETUP too."""
    from django.utils.module_loading import import_string

    from parallel_render import conf, tracing

    try:
        config = conf.get_config()
    except ImproperlyConfigured:
        return []  # check_settings reports it
    if not config["OTEL"]:
        return []
    problem = tracing.missing()
    if problem is not None:
        return [checks.Error(
            f"PARALLEL_RENDER['OTEL'] is on, but {problem.split(';')[0]}: no block is traced.",
            hint=f"{tracing.INSTALL} (it installs opentelemetry-api), or set PARALLEL_RENDER['OTEL'] = False.",
            id="parallel_render.E004",
        )]
    setup = config["OTEL_WORKER_SETUP"]
    if setup:
        try:
            found = import_string(setup)
        except ImportError as exc:
            found, why = None, str(exc)
        else:
            why = f"it is a {type(found).__name__}, not a function"
        if not callable(found):
            return [checks.Error(
                f"PARALLEL_RENDER['OTEL_WORKER_SETUP'] is {setup!r}, which workers cannot call: {why}.",
                hint="Name a function that takes no arguments and sets up the worker's tracer provider "
                     "(docs/tracing.md), or set it to None.",
                id="parallel_render.E005",
            )]
    return []


@checks.register(checks.Tags.urls)
def check_streaming(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Views that stream their blocks, where a middleware that needs the whole body wraps ours."""
    from parallel_render import streaming

    wrapper = streaming.body_middleware_around_ours(tuple(getattr(settings, "MIDDLEWARE", None) or ()))
    if wrapper is None:
        return []
    try:
        views = streaming.streaming_views()
    except Exception:  # a broken URLconf is Django's own check to report
        return []
    if not views:
        return []
    return [checks.Warning(
        f"{wrapper} wraps {MIDDLEWARE_PATH} and needs the whole body, so views that stream their "
        f"blocks are served buffered: {', '.join(views[:5])}{' and more' if len(views) > 5 else ''}.",
        hint=f"To stream, take {wrapper} out of MIDDLEWARE (compress in the proxy in front, which "
             "can compress a chunked response as it passes); to keep it, add 'parallel_render.W008' "
             "to SILENCED_SYSTEM_CHECKS.",
        id="parallel_render.W008",
    )]
