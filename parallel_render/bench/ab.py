"""Quora's A/B, on one machine: workers across a network ("Webpara") vs co-located ("Ultralisk") vs serial.

Webpara: the router and its workers run in another network namespace, a "worker machine"
joined to ours by a veth pair, and the master reaches the router over TCP (with a netem
delay on both ends of the link where the kernel has sch_netem). Ultralisk: router and
workers beside the master, over a Unix socket. Serial: the page rendered by the master
alone. The master is this process; the three modes are interleaved request by request so
drift hits them alike. Needs root for `ip netns`; without it, Webpara falls back to TCP on
loopback and the table says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from parallel_render.bench.stats import summary, table

HELP = "workers over the network (Webpara) vs co-located on a Unix socket (Ultralisk) vs serial"

MODES = ("serial", "webpara", "ultralisk")

# Runs inside the namespace: a LocalCluster on a TCP address, until our stdin closes.
REMOTE = """
import sys, django
django.setup()
from parallel_render.cluster import LocalCluster
from parallel_render.process import die_with_parent
die_with_parent(int(sys.argv[3]))
with LocalCluster(int(sys.argv[2]), address=sys.argv[1]) as cluster:
    cluster.wait_ready()
    print("READY", cluster.address, flush=True)
    sys.stdin.read()
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class WorkerMachine:
    """A network namespace joined by veth, with the router and workers inside it."""

    def __init__(self, workers: int, delay_ms: float) -> None:
        self.workers = workers
        self.delay_ms = delay_ms
        tag = f"{os.getpid() % 100000}"
        self.ns = f"pr_ab_{tag}"
        self.host_if, self.ns_if = f"prab{tag}a", f"prab{tag}b"
        octet = os.getpid() % 250 + 1
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.link = ""  # what the table reports about the link
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._made_ns = False

    def start(self) -> WorkerMachine:
        try:
            self._make_namespace()
        except (OSError, subprocess.CalledProcessError) as exc:
            reason = (getattr(exc, "stderr", "") or str(exc)).strip()
            return self._start_loopback(f"no network namespace here: {reason}")
        try:
            return self._launch(f"tcp://{self.ns_ip}:0", ["ip", "netns", "exec", self.ns])
        except RuntimeError as exc:
            # e.g. a namespace without routing to it: measure what can be measured, and say so
            self._remove_namespace()
            return self._start_loopback(str(exc).splitlines()[-1])

    def _start_loopback(self, why: str) -> WorkerMachine:
        self.link = f"TCP on loopback, no namespace ({why})"
        return self._launch("tcp://127.0.0.1:0", [])

    def _launch(self, listen: str, prefix: list[str]) -> WorkerMachine:
        from parallel_render.cluster import child_env

        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", REMOTE, listen, str(self.workers), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.proc.wait(15)
            err = self.proc.stderr.read().decode(errors="replace").strip()
            self.proc = None
            first = next((ln for ln in err.splitlines() if ln.startswith("fastrouter:")), err[-300:])
            raise RuntimeError(f"the worker machine did not start:\n{first}")
        # The cluster's own log lines would otherwise fill the pipe: let a thread drain it.
        import threading

        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.address = line.split()[1]
        return self

    def _make_namespace(self) -> None:
        _ip("netns", "add", self.ns)
        self._made_ns = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip("-n", self.ns, "link", "set", self.ns_if, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        self.link = f"TCP over veth into network namespace {self.ns}"
        if self.delay_ms > 0:
            netem = ["qdisc", "add", "dev", "{}", "root", "netem", "delay", f"{self.delay_ms}ms"]
            host = subprocess.run(["tc", *[a.format(self.host_if) for a in netem]], capture_output=True, text=True)
            far = subprocess.run(["ip", "netns", "exec", self.ns, "tc", *[a.format(self.ns_if) for a in netem]],
                                 capture_output=True, text=True)
            if host.returncode == 0 and far.returncode == 0:
                self.link += f", netem {self.delay_ms:g} ms each way"
            else:
                self.link += f", no added delay (netem unavailable: {(host.stderr or far.stderr).strip()})"

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._remove_namespace()

    def _remove_namespace(self) -> None:
        if self._made_ns:
            _ip("netns", "del", self.ns, check=False)  # takes the veth pair with it
            _ip("link", "del", self.host_if, check=False)
            self._made_ns = False


def run(path: str, requests: int, webpara: str, ultralisk: str, warmup: int = 3) -> dict[str, list[float]]:
    from django.test import Client

    from parallel_render import conf

    client = Client()
    routers = {"webpara": webpara, "ultralisk": ultralisk, "serial": ultralisk}

    def fetch(mode: str) -> float:
        os.environ[conf.ENV_ROUTER] = routers[mode]
        conf.get_config.cache_clear()
        headers = {"HTTP_X_PARALLEL_RENDER": "serial"} if mode == "serial" else {}
        started = time.perf_counter()
        response = client.get(path, **headers)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code} in {mode} mode")
        return elapsed

    for _ in range(warmup):
        for mode in MODES:
            fetch(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(requests):
        order = MODES[i % 3:] + MODES[:i % 3]  # rotate which mode goes first
        for mode in order:
            times[mode].append(fetch(mode))
    return times


def results(times: dict[str, list[float]]) -> dict[str, Any]:
    stats = {mode: summary(values) for mode, values in times.items()}
    w, u, s = stats["webpara"], stats["ultralisk"], stats["serial"]
    return {
        "ms": stats,
        "webpara_over_ultralisk": {q: w[q] / u[q] for q in ("p50", "p90", "p99")},
        "serial_over_ultralisk": {q: s[q] / u[q] for q in ("p50", "p90", "p99")},
    }


def format_result(result: dict[str, Any], path: str, requests: int, link: str) -> str:
    ms = result["ms"]
    rows = [[mode, ms[mode]["p50"], ms[mode]["p90"], ms[mode]["p99"], ms[mode]["mean"]] for mode in ("serial", "webpara", "ultralisk")]
    ratio_rows = [
        ["Webpara / Ultralisk", *(result["webpara_over_ultralisk"][q] for q in ("p50", "p90", "p99"))],
        ["serial / Ultralisk", *(result["serial_over_ultralisk"][q] for q in ("p50", "p90", "p99"))],
    ]
    return "\n".join([
        f"A/B of {path}, {requests} requests per mode, interleaved; Webpara link: {link}",
        table(["mode", "p50 ms", "p90 ms", "p99 ms", "mean ms"], rows),
        "",
        table(["ratio", "p50", "p90", "p99"], ratio_rows),
    ])


def svg_chart(result: dict[str, Any], title: str) -> str:
    """Grouped bars (p50/p90/p99 per mode), drawn by hand so no plotting library is needed."""
    ms = result["ms"]
    modes = ("serial", "webpara", "ultralisk")
    qs = ("p50", "p90", "p99")
    colors = {"p50": "#4c78a8", "p90": "#f58518", "p99": "#e45756"}
    width, height, left, bottom, top = 640, 360, 60, 40, 50
    plot_h = height - bottom - top
    peak = max(ms[m][q] for m in modes for q in qs) * 1.1 or 1.0
    group_w = (width - left - 20) / len(modes)
    bar_w = group_w / (len(qs) + 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{_esc(title)}</text>',
    ]
    for i in range(6):
        value = peak * i / 5
        y = height - bottom - plot_h * i / 5
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.0f}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle">ms</text>')
    for g, mode in enumerate(modes):
        x0 = left + g * group_w + bar_w / 2
        for k, q in enumerate(qs):
            h = plot_h * ms[mode][q] / peak
            x = x0 + k * bar_w
            y = height - bottom - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" fill="{colors[q]}"/>')
            parts.append(f'<text x="{x + bar_w * 0.45:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">{ms[mode][q]:.0f}</text>')
        parts.append(f'<text x="{x0 + bar_w * 1.5:.1f}" y="{height - bottom + 16}" text-anchor="middle">{mode}</text>')
    for k, q in enumerate(qs):
        parts.append(f'<rect x="{width - 200 + k * 60}" y="30" width="10" height="10" fill="{colors[q]}"/>')
        parts.append(f'<text x="{width - 186 + k * 60}" y="39">{q}</text>')
    ratio = result["webpara_over_ultralisk"]
    parts.append(f'<text x="{left}" y="{height - 8}">Webpara / Ultralisk: p50 {ratio["p50"]:.2f}x, p90 {ratio["p90"]:.2f}x, p99 {ratio["p99"]:.2f}x</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def add_arguments(parser: Any) -> None:
    parser.add_argument("url", help="a path of this project, rendered in this process (the master), e.g. /q/1/?latency=20")
    parser.add_argument("--requests", type=int, default=40, help="requests per mode")
    parser.add_argument("--workers", type=int, default=None, help="workers in each layout (default: PARALLEL_RENDER['WORKERS'])")
    parser.add_argument("--delay-ms", type=float, default=0.25, help="netem delay each way on the Webpara link (default 0.25)")
    parser.add_argument("--chart", default=None, help="write the chart here (.svg)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson
    from django.core.management.base import CommandError

    from parallel_render import conf
    from parallel_render.cluster import LocalCluster

    path = options["url"]
    if path.startswith(("http://", "https://")):
        raise CommandError("ab renders in this process, which plays the master: pass a path such as /q/1/?latency=20")
    if options["requests"] < 1:
        raise CommandError("--requests must be at least 1")
    workers = options["workers"] or conf.worker_count()
    saved = os.environ.get(conf.ENV_ROUTER)
    remote = WorkerMachine(workers, options["delay_ms"]).start()
    try:
        with LocalCluster(workers) as local:
            local.wait_ready()
            times = run(path, options["requests"], remote.address, local.address)
    finally:
        remote.stop()
        if saved is None:
            os.environ.pop(conf.ENV_ROUTER, None)
        else:
            os.environ[conf.ENV_ROUTER] = saved
        conf.get_config.cache_clear()
    result = results(times)
    result.update(url=path, requests=options["requests"], workers=workers, link=remote.link)
    if options["chart"]:
        with open(options["chart"], "w") as f:
            f.write(svg_chart(result, f"{path}: {workers} workers, {options['requests']} requests per mode"))
    if options["json"]:
        stdout.write(orjson.dumps(result).decode())
        return
    stdout.write(format_result(result, path, options["requests"], remote.link))
    stdout.write(f"\nreproduce: python manage.py parallel_bench ab {path!r} --requests {options['requests']} "
                 f"--workers {workers} --delay-ms {options['delay_ms']:g}"
                 + (f" --chart {options['chart']}" if options["chart"] else ""))
