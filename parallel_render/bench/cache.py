"""The fragment cache on one page: no cache, a cold cache and a warm one, on memcached and Redis.

For each backend it starts a real server (memcached, redis-server) on a free port, a router and
workers whose settings name that server as the fragment cache, and renders the page in this
process through Django's test client, the three modes interleaved: "no cache" with
PARALLEL_RENDER['CACHE'] = None (cache= blocks render as uncached ones), "cold" after a
bump() (every cached block misses: its worker renders and stores it), "warm" with every block
in the cache. Per page it counts the fragment cache's round trips made by this process (the
master) and what became of the blocks (block_finished).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from parallel_render.bench import BenchError
from parallel_render.bench.stats import summary, table

HELP = "a page with no fragment cache, a cold one and a warm one, on memcached and Redis"

ALIAS = "parallel_render_bench"
MODES = ("no cache", "cold", "warm")
# Short socket timeouts, as docs/cache.md advises.
OPTIONS = {
    "memcached": {"connect_timeout": 0.5, "timeout": 0.5},
    "redis": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
}


def cache_settings(kind: str, url: str) -> dict[str, Any]:
    if kind == "memcached":
        return {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": url[len("memcached://") :],
            "OPTIONS": OPTIONS[kind],
        }
    return {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "OPTIONS": OPTIONS[kind]}


def _worker_settings(directory: str, kind: str, url: str) -> str:
    """A settings module for the workers: the site's, with the bench's cache as the fragment cache."""
    name = f"parallel_render_bench_{kind}_settings"
    site = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not site:
        raise BenchError("DJANGO_SETTINGS_MODULE is not set: run the bench through manage.py")
    with open(os.path.join(directory, name + ".py"), "w") as f:
        f.write(
            f"from {site} import *  # noqa: F403\n"
            f"CACHES = {{**(globals().get('CACHES') or {{}}), {ALIAS!r}: {cache_settings(kind, url)!r}}}\n"
            f"PARALLEL_RENDER = {{**(globals().get('PARALLEL_RENDER') or {{}}), 'CACHE': {ALIAS!r}}}\n"
        )
    return name


def run_backend(kind: str, path: str, requests: int, workers: int) -> dict[str, Any]:
    from django.conf import settings
    from django.test import Client, override_settings

    from parallel_render import cache
    from parallel_render.bench.servers import server
    from parallel_render.cluster import LocalCluster
    from parallel_render.testing import capture_blocks, routed_to, test_host_allowed

    directory = tempfile.mkdtemp(prefix="pr-bench-cache-")
    sys.path.insert(0, directory)  # the workers' PYTHONPATH is this process's sys.path
    try:
        with server(kind) as url:
            module = _worker_settings(directory, kind, url)
            caches = {**settings.CACHES, ALIAS: cache_settings(kind, url)}
            base = dict(getattr(settings, "PARALLEL_RENDER", None) or {})
            with (
                LocalCluster(workers, env={"DJANGO_SETTINGS_MODULE": module}) as cluster,
                override_settings(CACHES=caches),
                test_host_allowed(),
            ):
                cluster.wait_ready()
                client = Client()
                modes = {
                    "no cache": {**base, "CACHE": None},
                    "cold": {**base, "CACHE": ALIAS},
                    "warm": {**base, "CACHE": ALIAS},
                }
                times: dict[str, list[float]] = {m: [] for m in MODES}
                trips: dict[str, list[int]] = {m: [] for m in MODES}
                outcomes: dict[str, Counter] = {m: Counter() for m in MODES}
                bodies: dict[str, set[bytes]] = {m: set() for m in MODES}
                # From a sent block's tag to its job going out: a miss waits for the page's lookup.
                submits: dict[str, list[float]] = {m: [] for m in MODES}

                def page(mode: str, record: bool) -> None:
                    with override_settings(PARALLEL_RENDER=modes[mode]):
                        if mode == "cold":
                            cache.bump()
                        before = cache.round_trips()
                        with capture_blocks() as blocks:
                            started = time.perf_counter()
                            response = client.get(path)
                            ms = (time.perf_counter() - started) * 1000
                    if response.status_code != 200:
                        raise BenchError(f"{path} answered {response.status_code} ({mode}, {kind})")
                    if record:
                        times[mode].append(ms)
                        trips[mode].append(cache.round_trips() - before)
                        outcomes[mode].update(b.outcome for b in blocks)
                        submits[mode] += [
                            b.submit_ms for b in blocks if b.outcome == "sent" and b.submit_ms is not None
                        ]
                        bodies[mode].add(response.content)

                with routed_to(cluster.address):
                    for _ in range(3):  # warm-up: templates, connections, the cost model
                        for mode in MODES:
                            page(mode, record=False)
                    for i in range(requests):
                        order = MODES[i % 3 :] + MODES[: i % 3]  # drift hits every mode alike
                        for mode in order:
                            if mode == "warm" and order.index("warm") > order.index("cold"):
                                time.sleep(0.02)  # the cold page's workers store after they answer
                            page(mode, record=True)
    finally:
        sys.path.remove(directory)
    return {
        mode: {
            "ms": summary(times[mode]),
            "round_trips": sum(trips[mode]) / len(trips[mode]),
            "submit_ms": sum(submits[mode]) / len(submits[mode]) if submits[mode] else None,
            "blocks": {k: v / requests for k, v in outcomes[mode].items()},
        }
        for mode in MODES
    }


def run(path: str, requests: int, workers: int, backends: list[str]) -> dict[str, Any]:
    return {
        "path": path,
        "requests": requests,
        "workers": workers,
        "backends": {kind: run_backend(kind, path, requests, workers) for kind in backends},
    }


def format_result(result: dict[str, Any]) -> str:
    rows = []
    for kind, modes in result["backends"].items():
        none_p50 = modes["no cache"]["ms"]["p50"]
        for mode, m in modes.items():
            blocks = m["blocks"]
            rows.append(
                [
                    kind,
                    mode,
                    m["ms"]["p50"],
                    m["ms"]["p90"],
                    m["ms"]["mean"],
                    none_p50 / m["ms"]["p50"],
                    m["round_trips"],
                    blocks.get("cached", 0.0),
                    blocks.get("sent", 0.0),
                    sum((v for k, v in blocks.items() if k not in ("cached", "sent")), 0.0),
                    "-" if m["submit_ms"] is None else m["submit_ms"],
                ]
            )
    return (
        f"page {result['path']}, {result['requests']} requests per mode, interleaved, {result['workers']} workers\n"
        + table(
            [
                "cache",
                "mode",
                "p50 ms",
                "p90 ms",
                "mean ms",
                "speed-up p50",
                "cache round trips/page",
                "blocks cached/page",
                "blocks sent/page",
                "blocks in master/page",
                "tag to job ms",
            ],
            rows,
        )
        + "\ncache round trips: the fragment cache's operations made by the master per page (a warm page's "
        "one get_many;\na cold one's get_many and one lock per block); the workers store each miss "
        "after they answer (a set and a delete).\ntag to job: the mean time from a sent block's tag to its job "
        "going out (a cached block's miss goes out after the page's lookup, once the skeleton is rendered)."
    )


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        default="/q/1/blocks/?latency=20&cache=300",
        help="a path rendered in-process, whose blocks say cache= (default: the demo's question page)",
    )
    parser.add_argument("--requests", type=int, default=30, help="requests per mode and backend")
    parser.add_argument("--workers", type=int, default=None, help="workers (default: one per core)")
    parser.add_argument(
        "--backend", action="append", choices=["memcached", "redis"], help="memcached, redis (repeatable; default both)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson

    from parallel_render import conf

    if options["requests"] < 1:
        raise BenchError("--requests must be at least 1")
    if options["path"].startswith(("http://", "https://")):
        raise BenchError("the cache bench renders a path in-process (e.g. /q/1/blocks/?cache=300), not a URL")
    result = run(
        options["path"],
        options["requests"],
        options["workers"] or conf.worker_count(),
        options["backend"] or ["memcached", "redis"],
    )
    stdout.write(orjson.dumps(result).decode() if options["json"] else format_result(result))
