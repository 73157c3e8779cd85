"""Time to first byte and full-page time of a streamed page against the same page buffered.

The bench starts `manage.py runparallel` on a free port (or uses `--url`) and requests the
two pages one at a time over a fresh connection each, alternating which mode goes first, so
drift on the machine hits both alike. Time to first byte runs from the request written to
the first byte of the answer (the status line; a streamed page sends it with its first
part), the full page to the last byte. Before it measures, it checks that both pages answer
200, that the streamed one is chunked and the buffered one is not, and that their bodies
are equal once the pids and the path a page prints are blanked.

The defaults measure the demo site's question page (`/q/1/stream/` against `/q/1/blocks/`,
the same template and context), whose blocks each wait `--latency` ms on simulated I/O.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from parallel_render.bench import BenchError
from parallel_render.bench.stats import summary, table

HELP = "time to first byte and full-page time, streamed vs buffered, interleaved"

MODES = ("buffered", "streamed")
PID = re.compile(rb"pid \d+")


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb: float  # seconds
    total: float


def fetch(base: str, path: str, timeout: float = 30.0) -> Fetched:
    """GET base+path over a new connection (Connection: close) and time its first and last byte."""
    parts = urllib.parse.urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
        started = time.perf_counter()
        sock.sendall(request)
        data = sock.recv(1 << 16)
        ttfb = time.perf_counter() - started
        received = [data]
        while data:
            data = sock.recv(1 << 16)
            received.append(data)
        total = time.perf_counter() - started
    finally:
        sock.close()
    raw = b"".join(received)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields if ":" in f)}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Fetched(int(status_line.split()[1]), headers, body, ttfb, total)


def _dechunk(data: bytes) -> bytes:
    out, at = [], 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def check(base: str, buffered: str, streamed: str) -> None:
    """Both pages answer 200, only the streamed one is chunked, and their bodies are equal."""
    pages = {mode: fetch(base, path) for mode, path in zip(MODES, (buffered, streamed), strict=True)}
    for mode, page in pages.items():
        if page.status != 200:
            raise BenchError(f"the {mode} page {base}{page_path(mode, buffered, streamed)} answered {page.status}")
    if pages["streamed"].headers.get("transfer-encoding") != "chunked":
        raise BenchError(
            f"{base}{streamed} was not streamed (no chunked body): does its view return a "
            "StreamingTemplateResponse, and does a middleware that needs the whole body (GZip, "
            "ConditionalGet) wrap ParallelRenderMiddleware? The log says why it was declined."
        )
    if "content-length" not in pages["buffered"].headers:
        raise BenchError(f"{base}{buffered} came without Content-Length: is it streamed too?")
    # A page may print its own path (links that keep the mode) and the pids that rendered it.
    a, b = (
        PID.sub(b"pid N", pages[mode].body.replace(urllib.parse.urlsplit(path).path.encode(), b"PATH"))
        for mode, path in zip(MODES, (buffered, streamed), strict=True)
    )
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        raise BenchError(
            f"the streamed and buffered pages differ at byte {at}:\n  buffered: {a[max(0, at - 60) : at + 60]!r}\n"
            f"  streamed: {b[max(0, at - 60) : at + 60]!r}"
        )


def page_path(mode: str, buffered: str, streamed: str) -> str:
    return streamed if mode == "streamed" else buffered


def run(base: str, buffered: str, streamed: str, requests: int, warmup: int) -> dict[str, Any]:
    check(base, buffered, streamed)
    for _ in range(warmup):
        for mode in MODES:
            fetch(base, page_path(mode, buffered, streamed))
    ttfb: dict[str, list[float]] = {mode: [] for mode in MODES}
    total: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(requests):
        for mode in MODES if i % 2 else MODES[::-1]:
            got = fetch(base, page_path(mode, buffered, streamed))
            if got.status != 200:
                raise BenchError(f"{base}{page_path(mode, buffered, streamed)} answered {got.status} during the run")
            ttfb[mode].append(got.ttfb * 1000)
            total[mode].append(got.total * 1000)
    result: dict[str, Any] = {mode: {"ttfb": summary(ttfb[mode]), "total": summary(total[mode])} for mode in MODES}
    result["ratio"] = {
        "ttfb_p50": result["streamed"]["ttfb"]["p50"] / result["buffered"]["ttfb"]["p50"],
        "total_p50": result["streamed"]["total"]["p50"] / result["buffered"]["total"]["p50"],
    }
    return result


def format_results(runs: list[dict[str, Any]], header: str) -> str:
    rows = []
    for one in runs:
        for mode in MODES:
            t, f = one["result"][mode]["ttfb"], one["result"][mode]["total"]
            rows.append([one["latency"], mode, t["n"], t["p50"], t["p90"], t["p99"], f["p50"], f["p90"], f["p99"]])
        ratio = one["result"]["ratio"]
        rows.append(
            [
                one["latency"],
                "streamed / buffered",
                "",
                f"{ratio['ttfb_p50']:.2f}x",
                "",
                "",
                f"{ratio['total_p50']:.2f}x",
                "",
                "",
            ]
        )
    headers = ["latency ms", "mode", "n", "TTFB p50", "p90", "p99", "full page p50", "p90", "p99"]
    return header + "\n\n" + table(headers, rows) + "\n\n(times in ms; ratios of medians)\n"


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--url", default=None, help="base http:// URL of a running node (default: start one on a free port)"
    )
    parser.add_argument(
        "--buffered",
        default="/q/1/blocks/?latency={latency}",
        help="path of the buffered page; {latency} is replaced (default /q/1/blocks/?latency={latency})",
    )
    parser.add_argument(
        "--streamed",
        default="/q/1/stream/?latency={latency}",
        help="path of the same page streamed (default /q/1/stream/?latency={latency})",
    )
    parser.add_argument(
        "--latency", default="20,100", help="simulated I/O per block in ms, comma-separated (default 20,100)"
    )
    parser.add_argument("--requests", type=int, default=40, help="requests per mode and latency (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="requests per mode before measuring (default 5)")
    parser.add_argument("--workers", type=int, default=None, help="passed to runparallel")
    parser.add_argument("--masters", type=int, default=None, help="passed to runparallel")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _reproduce(options: dict[str, Any]) -> str:
    parts = [
        "python manage.py parallel_bench stream",
        f"--latency {options['latency']}",
        f"--requests {options['requests']}",
        f"--warmup {options['warmup']}",
    ]
    for name in ("url", "workers", "masters"):
        if options[name]:
            parts.append(f"--{name} {options[name]}")
    for name in ("buffered", "streamed"):
        if options[name] != f"/q/1/{'blocks' if name == 'buffered' else 'stream'}/?latency={{latency}}":
            parts.append(f"--{name} '{options[name]}'")
    return " ".join(parts)


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson
    from django.core.management.base import CommandError

    from parallel_render.bench.load import Node

    try:
        latencies = [int(x) for x in options["latency"].split(",") if x.strip()]
    except ValueError:
        raise CommandError("--latency takes whole milliseconds, comma-separated, e.g. 20,100") from None
    if not latencies or min(latencies) < 0 or options["requests"] < 1 or options["warmup"] < 0:
        raise CommandError("--latency needs values of 0 or more, --requests at least 1, --warmup not negative")
    url = options["url"]
    if url and not url.startswith("http://"):
        raise CommandError("--url takes the http:// base URL of a running node, e.g. http://127.0.0.1:8000")
    workdir = tempfile.mkdtemp(prefix="parallel-bench-stream-")
    node = None
    runs = []
    try:
        if url:
            base, described = url.rstrip("/"), f"{url} (already running)"
        else:
            args = []
            for name in ("masters", "workers"):
                if options[name]:
                    args += [f"--{name}", str(options[name])]
            node = Node(args, workdir)
            base = node.url
            probe = options["buffered"].format(latency=0)
            node.wait_serving(lambda: fetch(base, probe).status == 200)
            tree = node.tree()
            described = f"runparallel at {base}: {len(tree['workers'])} workers"
        for latency in latencies:
            buffered, streamed = (options[name].format(latency=latency) for name in ("buffered", "streamed"))
            runs.append(
                {
                    "latency": latency,
                    "buffered": buffered,
                    "streamed": streamed,
                    "result": run(base, buffered, streamed, options["requests"], options["warmup"]),
                }
            )
    except (BenchError, RuntimeError, OSError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    header = f"Streamed vs buffered, one request at a time, interleaved: {described}\nreproduce: {_reproduce(options)}"
    if options["json"]:
        stdout.write(orjson.dumps({"node": described, "runs": runs, "reproduce": _reproduce(options)}).decode())
    else:
        stdout.write(format_results(runs, header))
