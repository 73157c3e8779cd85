"""Render one page serially and in parallel, interleaved in one run, and compare."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from parallel_render.bench import BenchError
from parallel_render.bench.stats import summary, table

HELP = "render a page serially and in parallel, interleaved, and compare"


def _http_fetch(url: str, serial: bool) -> tuple[int, bytes]:
    from parallel_render.testing import serial_request_headers

    request = urllib.request.Request(url, headers=serial_request_headers() if serial else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _client_fetch(path: str) -> Callable[[bool], tuple[int, bytes]]:
    from django.test import Client

    from parallel_render.testing import serially, test_host_allowed

    client = Client()

    def fetch(serial: bool) -> tuple[int, bytes]:
        with test_host_allowed():
            if serial:
                with serially():
                    response = client.get(path)
            else:
                response = client.get(path)
        return response.status_code, response.content

    return fetch


class PageError(BenchError):
    """The page cannot be benchmarked (it does not answer 200)."""


def run(url: str, requests: int, warmup: int = 3) -> dict[str, Any]:
    fetch = (lambda serial: _http_fetch(url, serial)) if url.startswith(("http://", "https://")) else _client_fetch(url)
    for _ in range(warmup):
        fetch(False)
        fetch(True)
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    for i in range(requests):
        # Alternate the order so drift on the machine hits both modes alike.
        for mode in (("serial", "parallel") if i % 2 else ("parallel", "serial")):
            started = time.perf_counter()
            status, _body = fetch(mode == "serial")
            times[mode].append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise PageError(f"{url} answered {status} in {mode} mode; the page must answer 200 in both modes")
    serial, parallel = summary(times["serial"]), summary(times["parallel"])
    return {
        "url": url,
        "requests": requests,
        "serial_ms": serial,
        "parallel_ms": parallel,
        "speedup_p50": serial["p50"] / parallel["p50"],
        "speedup_p90": serial["p90"] / parallel["p90"],
        "speedup_p99": serial["p99"] / parallel["p99"],
    }


def format_result(result: dict[str, Any]) -> str:
    s, p = result["serial_ms"], result["parallel_ms"]
    rows = [
        ["serial", s["p50"], s["p90"], s["p99"], s["mean"]],
        ["parallel", p["p50"], p["p90"], p["p99"], p["mean"]],
        ["speed-up (serial/parallel)", result["speedup_p50"], result["speedup_p90"], result["speedup_p99"], s["mean"] / p["mean"]],
    ]
    return (
        f"page {result['url']}, {result['requests']} requests per mode, interleaved\n"
        + table(["mode", "p50 ms", "p90 ms", "p99 ms", "mean ms"], rows)
    )


def add_arguments(parser: Any) -> None:
    parser.add_argument("url", help="an http:// URL of a running server, or a path rendered in-process")
    parser.add_argument("--requests", type=int, default=50, help="requests per mode")
    parser.add_argument("--workers", type=int, default=None, help="workers for an in-process run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def handle(options: dict[str, Any], stdout: Any) -> None:
    import os

    import orjson
    from django.core.management.base import CommandError

    from parallel_render import conf

    if options["requests"] < 1:
        raise CommandError("--requests must be at least 1")
    url = options["url"]
    cluster = None
    if not url.startswith(("http://", "https://")) and not conf.get_config()["ROUTER"]:
        from parallel_render.cluster import LocalCluster

        cluster = LocalCluster(options["workers"] or conf.worker_count()).start()
        cluster.wait_ready()
        os.environ[conf.ENV_ROUTER] = cluster.address
        conf.get_config.cache_clear()
    try:
        result = run(url, options["requests"])
    finally:
        if cluster is not None:
            cluster.stop()
            os.environ.pop(conf.ENV_ROUTER, None)
            conf.get_config.cache_clear()
    stdout.write(orjson.dumps(result).decode() if options["json"] else format_result(result))
