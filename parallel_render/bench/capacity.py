"""How many requests per second a running node sustains while its p99 stays under a target.

Open-loop load: requests are sent on a fixed schedule whatever the server does, and each
latency is counted from the moment its request was *due*, so a server that falls behind
shows it (no coordinated omission). Each step runs for --duration seconds; the rate doubles
until a step misses the target, then a few bisection steps narrow the answer.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
import urllib.parse
from typing import Any

from parallel_render.bench.stats import summary, table

HELP = "find the requests/s a running node sustains under a p99 target"



class _Fetcher:
    """One keep-alive connection per thread; reconnects after an error."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = headers
        self.conn: http.client.HTTPConnection | None = None

    def fetch(self) -> int:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request("GET", self.path, headers=self.headers)
                response = self.conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return response.status
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def run_step(url: str, rate: float, duration: float, concurrency: int = 32, serial: bool = False) -> dict[str, Any]:
    """Offer `rate` requests/s for `duration` s; latencies (ms) count from each request's due time."""
    from parallel_render.testing import serial_request_headers

    headers = serial_request_headers() if serial else {}
    due: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        fetcher = _Fetcher(url, headers)
        while True:
            at = due.get()
            if at is None:
                return
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                status = fetcher.fetch()
                error = None if status == 200 else f"HTTP {status}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            elapsed = (time.perf_counter() - at) * 1000
            with lock:
                if error:
                    errors.append(error)
                else:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start = time.perf_counter() + 0.05
    count = max(1, int(rate * duration))
    for i in range(count):
        due.put(start + i / rate)
    for _ in threads:
        due.put(None)
    for t in threads:
        t.join(duration + 120)
    wall = time.perf_counter() - start
    result = {"rate": rate, "requests": count, "achieved": len(latencies) / wall if wall > 0 else 0.0,
              "errors": len(errors), "first_error": errors[0] if errors else "", **summary(latencies)}
    return result


def passes(step: dict[str, Any], p99_ms: float) -> bool:
    return step["errors"] == 0 and step["p99"] <= p99_ms and step["achieved"] >= 0.9 * step["rate"]


def find_capacity(
    url: str, p99_ms: float, duration: float = 5.0, start: float = 2.0, max_rate: float = 2000.0,
    bisect: int = 3, concurrency: int = 32, serial: bool = False, log: Any = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []

    def step(rate: float) -> bool:
        result = run_step(url, rate, duration, concurrency, serial)
        result["ok"] = passes(result, p99_ms)
        steps.append(result)
        if log:
            log(f"  {'serial' if serial else 'parallel'} {rate:.1f} req/s: p99 {result['p99']:.1f} ms, "
                f"{result['errors']} errors -> {'ok' if result['ok'] else 'over'}")
        return result["ok"]

    good, bad = 0.0, None
    rate = start
    while rate <= max_rate:
        if step(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
            break
    for _ in range(bisect if bad is not None and good > 0 else 0):
        mid = (good + bad) / 2
        if step(mid):
            good = mid
        else:
            bad = mid
    return {"url": url, "p99_target_ms": p99_ms, "mode": "serial" if serial else "parallel",
            "capacity": good, "first_over": bad, "steps": steps}


def format_result(results: list[dict[str, Any]], duration: float) -> str:
    rows = []
    for result in results:
        for s in sorted(result["steps"], key=lambda s: s["rate"]):
            rows.append([result["mode"], s["rate"], s["achieved"], s["p50"], s["p90"], s["p99"], s["errors"],
                         "yes" if s["ok"] else "no"])
    first = results[0]
    out = [f"capacity of {first['url']}: p99 target {first['p99_target_ms']:.0f} ms, {duration:.0f} s per step, open loop",
           table(["mode", "offered req/s", "served req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "within target"], rows),
           ""]
    out.append(table(["mode", "sustained req/s (p99 within target)"], [[r["mode"], r["capacity"]] for r in results]))
    if len(results) == 2 and results[1]["capacity"]:
        out.append(f"parallel / serial capacity: {results[0]['capacity'] / results[1]['capacity']:.2f}")
    return "\n".join(out)


def add_arguments(parser: Any) -> None:
    parser.add_argument("url", help="an http:// URL served by a running node (manage.py runparallel)")
    parser.add_argument("--p99", type=float, default=250.0, help="p99 target in ms (default 250)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step (default 5)")
    parser.add_argument("--start", type=float, default=2.0, help="first rate in requests/s (default 2)")
    parser.add_argument("--max-rate", type=float, default=2000.0, help="stop doubling here")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after the first miss (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads (default 32)")
    parser.add_argument("--serial", action="store_true", help="also measure the same page rendered serially")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson
    from django.core.management.base import CommandError

    url = options["url"]
    if not url.startswith("http://"):
        raise CommandError("capacity needs the http:// URL of a running node (start one with manage.py runparallel)")
    if options["p99"] <= 0 or options["duration"] <= 0 or options["start"] <= 0:
        raise CommandError("--p99, --duration and --start must be positive")
    log = None if options["json"] else (lambda line: stdout.write(line))
    kwargs = {k: options[k] for k in ("duration", "start", "max_rate", "bisect", "concurrency")}
    results = [find_capacity(url, options["p99"], log=log, **kwargs)]
    if options["serial"]:
        results.append(find_capacity(url, options["p99"], serial=True, log=log, **kwargs))
    if options["json"]:
        stdout.write(orjson.dumps(results).decode())
    else:
        stdout.write(format_result(results, options["duration"]))
        stdout.write(f"\nreproduce: python manage.py parallel_bench capacity {url} --p99 {options['p99']:g} "
                     f"--duration {options['duration']:g}{' --serial' if options['serial'] else ''}")
