"""The PARALLEL_RENDER settings dict, merged with defaults and read lazily."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, Any] = {
    # False renders every {% parallel %} block inline, as plain Django would.
    "ENABLED": True,
    # Workers that `runserver` starts; None means one per core.
    "WORKERS": None,
    # Default seconds a fragment may take before the master renders it itself.
    "TIMEOUT": 10.0,
    # A block whose renders have averaged less than this many ms renders inline: sending it
    # would cost more than it saves. Its cost is still measured, so a block that grows
    # slower goes back to the workers. 0 sends every block.
    "MIN_BLOCK_MS": 1.0,
    # Send a block only when a worker would start it soon (the router's status page says so),
    # and take back, before waiting, the blocks no worker has started: a busy node renders
    # like plain Django instead of queueing (docs/dispatch.md). False sends every block that
    # can be sent and waits for the workers: for test suites that check where blocks render.
    "ADAPTIVE": True,
    # Threads of each master that render the blocks the dispatch policy keeps in it, when a
    # block mostly waits (on a database, memcached, HTTP): their waits overlap instead of
    # adding up (docs/dispatch.md). 0 renders every kept block in place, one after another.
    "MASTER_THREADS": 4,
    # unix:///path or tcp://host:port; None lets runserver start its own router.
    "ROUTER": None,
    # A query parameter that makes a request render serially (e.g. "serial"); None disables.
    "SERIAL_QUERY_PARAM": None,
    # A request header (as in request.headers) that makes a request render serially.
    "SERIAL_HEADER": "X-Parallel-Render",
    # A Server-Timing entry per block (its template and line, the worker's pid, times).
    # None: only when DEBUG is on, since it tells clients about the site's internals.
    "SERVER_TIMING": None,
    # Largest job or result the master will send, in bytes.
    "MAX_PAYLOAD": 8 * 1024 * 1024,
    # Jobs a worker renders before it exits so its supervisor starts a fresh one.
    "WORKER_MAX_JOBS": None,
    # Dotted paths of custom template Node classes that only read the variables they
    # were given (FilterExpressions on the node), so blocks containing them can be sent.
    "TRANSPARENT_TAGS": [],
    # Context processors a worker may run again on the rebuilt request, for values they make
    # that cannot be sent (e.g. an object of the site's own). Only list processors whose
    # output depends on nothing but what the request carries.
    "WORKER_CONTEXT_PROCESSORS": [],
    # Dotted paths of parallel_render.codec.ValueCodec subclasses for the site's own types.
    "VALUE_CODECS": [],
    # Model fields that never travel to a worker, as "app_label.ModelName.field" (a user's
    # password and a session's key and data never do; a model can also list its own in a
    # PARALLEL_RENDER_SENSITIVE_FIELDS class attribute). A block that reads one renders inline.
    "SENSITIVE_FIELDS": [],
    # Where a node (runparallel) serves Prometheus metrics: a port on 127.0.0.1, or "host:port";
    # None serves none (parallel_render.metrics.views.metrics still can). Needs the [metrics] extra.
    "METRICS_PORT": None,
    # Path of the fastrouter binary; None finds the one installed with the package.
    "FASTROUTER_BINARY": None,
    # OpenTelemetry: a span per block, and its context carried to the worker's span (the
    # [otel] extra, docs/tracing.md). Off, nothing imports opentelemetry.
    "OTEL": False,
    # Dotted path of a function each worker calls once at start, to set up its tracer provider.
    "OTEL_WORKER_SETUP": None,
    # The alias in CACHES of the fragment cache ({% parallel cache=S %}, docs/cache.md); None
    # turns it off (cached blocks render as uncached ones).
    "CACHE": "default",
}

# Environment overrides set by the processes we start (runserver, runparallel, tests).
ENV_ROUTER = "PARALLEL_RENDER_ROUTER"
ENV_BINARY = "PARALLEL_RENDER_FASTROUTER"


@functools.cache
def get_config() -> dict[str, Any]:
    user = getattr(settings, "PARALLEL_RENDER", None)
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER must be a dict, not {type(user).__name__}."
        )
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER has unknown keys {unknown}; known keys are {sorted(DEFAULTS)}."
        )
    config = {**DEFAULTS, **user}
    timeout = config["TIMEOUT"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER['TIMEOUT'] must be a positive number of seconds, not {timeout!r}."
        )
    threshold = config["MIN_BLOCK_MS"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER['MIN_BLOCK_MS'] must be a number of milliseconds >= 0, not {threshold!r}."
        )
    if not isinstance(config["ADAPTIVE"], bool):
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER['ADAPTIVE'] must be True or False, not {config['ADAPTIVE']!r}."
        )
    workers = config["WORKERS"]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER['WORKERS'] must be a whole number >= 0 or None, not {workers!r}."
        )
    threads = config["MASTER_THREADS"]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ImproperlyConfigured(
            f"PARALLEL_RENDER['MASTER_THREADS'] must be a whole number >= 0, not {threads!r}."
        )
    sensitive = config["SENSITIVE_FIELDS"]
    if not isinstance(sensitive, (list, tuple)) or not all(
        isinstance(entry, str) and entry.count(".") == 2 and all(entry.split(".")) for entry in sensitive
    ):
        raise ImproperlyConfigured(
            "PARALLEL_RENDER['SENSITIVE_FIELDS'] must be a list of \"app_label.ModelName.field\" strings, "
            f"not {sensitive!r}."
        )
    if not isinstance(config["OTEL"], bool):
        raise ImproperlyConfigured(f"PARALLEL_RENDER['OTEL'] must be True or False, not {config['OTEL']!r}.")
    setup = config["OTEL_WORKER_SETUP"]
    if setup is not None and not (isinstance(setup, str) and "." in setup.strip(".")):
        raise ImproperlyConfigured(
            "PARALLEL_RENDER['OTEL_WORKER_SETUP'] must be the dotted path of a function (e.g. "
            f"\"myproject.tracing.setup\") or None, not {setup!r}."
        )
    cache = config["CACHE"]
    if cache is not None:
        aliases = sorted(getattr(settings, "CACHES", None) or {"default": None})
        if not isinstance(cache, str) or cache not in aliases:
            raise ImproperlyConfigured(
                f"PARALLEL_RENDER['CACHE'] must name a cache in CACHES ({', '.join(map(repr, aliases))}) or be None "
                f"(no fragment cache), not {cache!r}."
            )
    router = config["ROUTER"] or os.environ.get(ENV_ROUTER)
    if router is not None:
        from parallel_render.protocol import parse_address

        parse_address(router)  # raises ImproperlyConfigured with the reason
    config["ROUTER"] = router
    return config


def clear_config(**kwargs: Any) -> None:
    """setting_changed receiver, so override_settings(PARALLEL_RENDER=...) works."""
    if kwargs.get("setting") in (None, "PARALLEL_RENDER", "SECRET_KEY", "DEBUG", "CACHES"):
        get_config.cache_clear()
        from parallel_render import cache, codec, keys, sealing

        cache.reset()
        keys.clear_cache()
        sealing.clear_cache()
        codec.custom_codecs.cache_clear()


def worker_count() -> int:
    workers = get_config()["WORKERS"]
    if workers is None:
        from parallel_render.cpus import this_process

        return this_process().cores
    return workers


# What the package's build installs beside the router's place when it could not build it: the
# reason, in one line (CMakeLists.txt writes it).
NOT_BUILT_FILE = "fastrouter-not-built.txt"


def _installed_bin_dirs() -> list[Path]:
    """Where the package's build puts the router: the package's bin/, then site-packages'."""
    dirs = [Path(__file__).resolve().parent / "bin"]
    # An editable install keeps the package here but what CMake installed in site-packages.
    dirs += [Path(entry) / "parallel_render" / "bin" for entry in sys.path if entry]
    return dirs


def fastrouter_binary() -> str:
    """The fastrouter executable: env var, setting, installed copy, then a source build."""
    candidates = [os.environ.get(ENV_BINARY), get_config()["FASTROUTER_BINARY"]]
    candidates += [str(directory / "fastrouter") for directory in _installed_bin_dirs()]
    candidates.append(str(Path(__file__).resolve().parent.parent / "fastrouter" / "build" / "fastrouter"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    not_built = fastrouter_not_built_reason()
    why = f" It was not built when parallel_render was installed: {not_built}." if not_built else ""
    raise ImproperlyConfigured(
        f"The fastrouter binary was not found.{why} Install the package with `pip install .` where a C++17 "
        f"compiler is available (it builds the router), or build it with CMake and set {ENV_BINARY} to its "
        "path. Looked in: " + ", ".join(p for p in candidates if p)
    )


def fastrouter_not_built_reason() -> str | None:
    """Why the installed package has no router, as its build wrote down; None if it did not say."""
    for directory in _installed_bin_dirs():
        try:
            return (directory / NOT_BUILT_FILE).read_text().strip() or None
        except OSError:
            continue
    return None


def fastrouter_problem() -> str | None:
    """Why no router can run here, so every block renders inline; None if the router runs."""
    import platform
    import subprocess

    if not sys.platform.startswith("linux"):
        return f"the fastrouter runs on Linux only (it uses epoll and prctl), and this is {platform.system()}"
    try:
        binary = fastrouter_binary()
    except ImproperlyConfigured:
        not_built = fastrouter_not_built_reason()
        if not_built:
            return f"the fastrouter was not built when parallel_render was installed: {not_built}"
        return ("no fastrouter binary is installed with parallel_render (its build failed or was skipped; "
                "`pip install -v` shows why)")
    try:
        subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=True)
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip() or f"exit code {exc.returncode}"
        return f"the fastrouter at {binary} does not run: {detail}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the fastrouter at {binary} does not run: {exc}"
    return None
