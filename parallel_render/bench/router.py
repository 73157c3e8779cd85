"""The fastrouter measured against its floor, Redis lists and the plugin's own Python client.

One run starts a private router and, in turn: C++ echo workers with the C++ load generator
(`fastrouter_bench`, built with the router: round trips, then 8 submitters / 4 workers at 1 KB
and 64 KB, unbatched and batched, with the router's CPU time read from /proc), Python echo
workers with `parallel_render.client.RouterClient`, the same round trip on Redis lists
(LPUSH/BRPOP with a reply key) against a redis-server started on a free port, and the direct
Unix-socket ping-pong floor (C++ and Python). `fastrouter_bench` is looked for next to the
router binary, then in fastrouter/build; failing both, it is built from the source tree with
cmake into build/fastrouter-bench.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from parallel_render.bench import BenchError
from parallel_render.bench.stats import summary, table

HELP = "the fastrouter against the socket floor, Redis lists and the Python client"

SOURCE_DIR = Path(__file__).resolve().parents[2] / "fastrouter"
BENCH_BUILD_DIR = SOURCE_DIR.parent / "build" / "fastrouter-bench"

# (masters, size, batch) of the throughput runs; the first two are the headline numbers.
LOADS = (("1k", 1024, 1), ("1k_batched", 1024, 16), ("64k", 65536, 1), ("64k_batched", 65536, 16))
MASTERS = 8
WORKERS = 4


# -- binaries -------------------------------------------------------------------------------


def router_binary() -> str:
    from parallel_render import conf

    return conf.fastrouter_binary()


def bench_binary(router: str) -> str:
    """fastrouter_bench next to the router, in fastrouter/build, or built here on demand."""
    for candidate in (Path(router).with_name("fastrouter_bench"), SOURCE_DIR / "build" / "fastrouter_bench",
                      BENCH_BUILD_DIR / "fastrouter_bench"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    if not (SOURCE_DIR / "CMakeLists.txt").exists() or not shutil.which("cmake"):
        raise BenchError(
            f"fastrouter_bench was not found next to {router} and cannot be built here (needs the "
            "source tree and cmake); build it with `cmake -S fastrouter -B fastrouter/build && "
            "cmake --build fastrouter/build`"
        )
    for cmd in (
        ["cmake", "-S", str(SOURCE_DIR), "-B", str(BENCH_BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF"],
        ["cmake", "--build", str(BENCH_BUILD_DIR), "-j2", "--target", "fastrouter_bench"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"building fastrouter_bench failed ({' '.join(cmd)}):\n{done.stdout}{done.stderr}")
    return str(BENCH_BUILD_DIR / "fastrouter_bench")


# -- processes ------------------------------------------------------------------------------


def _pin(cpus: set[int] | None):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    import select

    end = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise BenchError(f"{what} did not start within {timeout}s")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise BenchError(f"{what} exited before it was ready (rc={proc.wait(5)})")
        line += chunk
    return line.decode().strip()


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(5)


@contextmanager
def running_router(binary: str, cpus: set[int] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A private router with this site's key, in its directory for the bench's peers too (key_args)."""
    from parallel_render import keys

    with tempfile.TemporaryDirectory(prefix="prbench-") as d:
        os.chmod(d, 0o700)
        key = keys.write_router_key_file(d)
        proc = subprocess.Popen(
            [binary, "--listen", f"unix://{d}/router.sock", "--quiet", "--parent-pid", str(os.getpid()),
             "--auth-key-file", key],
            stdout=subprocess.PIPE,
            preexec_fn=_pin(cpus),
        )
        try:
            line = _read_line(proc, 10, "fastrouter")
            yield proc, line.split(" ", 1)[1]
        finally:
            _stop(proc)


def key_args(address: str) -> list[str]:
    """fastrouter_bench's option for the key of a router running_router started."""
    return ["--key-file", os.path.join(os.path.dirname(address[len("unix://"):]), "router.key")]


@contextmanager
def native_workers(bench: str, address: str, n: int, cpus: set[int] | None = None) -> Iterator[None]:
    proc = subprocess.Popen([bench, "echo", address, *key_args(address), "--workers", str(n)], stdout=subprocess.PIPE,
                            preexec_fn=_pin(cpus))
    try:
        _read_line(proc, 10, "fastrouter_bench echo")
        yield
    finally:
        _stop(proc)


def run_bench(bench: str, *args: str, cpus: set[int] | None = None) -> dict[str, Any]:
    if args[0] != "pingpong":  # MODE ADDRESS ...: the router wants the handshake
        args = (args[0], args[1], *key_args(args[1]), *args[2:])
    done = subprocess.run([bench, *args], capture_output=True, text=True, timeout=300, preexec_fn=_pin(cpus))
    if done.returncode:
        raise BenchError(f"fastrouter_bench {' '.join(args)} failed (rc={done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def _python_child(target: str, *args: str) -> subprocess.Popen:
    code = f"import sys; from parallel_render.bench.router import {target}; {target}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env)


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- Python echo workers and round trips ------------------------------------------------------


def python_echo_worker(address: str) -> None:
    """A worker in plain Python: RESULT echoes the JOB body, sent with READY in one write."""
    from parallel_render import protocol as p
    from parallel_render.client import open_connection

    sock = open_connection(p.parse_address(address), p.ROLE_WORKER, p.encode(p.READY))
    sock.settimeout(None)
    print("READY", flush=True)
    reader = p.FrameReader()
    ready = p.encode(p.READY)
    while data := sock.recv(1 << 20):
        for frame in reader.feed(data):
            if frame.type == p.JOB:
                sock.sendall(p.encode(p.RESULT, frame.job_id, frame.payload) + ready)


def python_rtt(address: str, count: int, size: int) -> dict[str, float]:
    from parallel_render.client import RouterClient

    client = RouterClient(address)
    payload = b"x" * size
    times = []
    try:
        for i in range(count + count // 10 + 1):
            started = time.perf_counter()
            job = client.submit(payload, timeout=5.0)
            answer = client.collect([job], time.monotonic() + 5.0)[job]
            elapsed = time.perf_counter() - started
            if answer.kind != "result":
                raise BenchError(f"python round trip got {answer.kind}")
            if i > count // 10:
                times.append(elapsed * 1e6)
    finally:
        client.close()
    return summary(times)


def redis_echo_worker(port: str) -> None:
    """The Redis-list equivalent of an echo worker: BRPOP a job, LPUSH the body to its reply key."""
    import redis

    r = redis.Redis(port=int(port))
    print("READY", flush=True)
    while True:
        _key, job = r.brpop(["prbench:jobs"])
        reply_key, _, body = job.partition(b"|")
        r.lpush(reply_key, body)


def redis_rtt(port: int, count: int, size: int) -> dict[str, float]:
    import redis

    r = redis.Redis(port=port)
    job = b"prbench:reply:1|" + b"x" * size
    times = []
    for i in range(count + count // 10 + 1):
        started = time.perf_counter()
        r.lpush("prbench:jobs", job)
        if r.brpop(["prbench:reply:1"], timeout=5) is None:
            raise BenchError("no answer through Redis within 5 s")
        if i > count // 10:
            times.append((time.perf_counter() - started) * 1e6)
    r.close()
    return summary(times)


@contextmanager
def running_redis() -> Iterator[int]:
    server = shutil.which("redis-server")
    if not server:
        raise BenchError("redis-server is not installed (apt install redis-server); it is the comparison baseline")
    if importlib.util.find_spec("redis") is None:
        raise BenchError(
            "the redis Python package is not installed (pip install redis, or pip install 'parallel_render[test]'); "
            "the Redis baseline needs it"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > end or proc.poll() is not None:
                    raise BenchError("redis-server did not start") from None
                time.sleep(0.02)
        yield port
    finally:
        _stop(proc)


def python_direct_rtt(count: int, size: int) -> dict[str, float]:
    """Python's own floor: one frame bounced through a Unix socket pair to a forked child."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frame = b"x" * (24 + size)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        a.close()
        try:
            while data := b.recv(len(frame)):
                b.sendall(data)
        finally:
            os._exit(0)
    b.close()
    times = []
    for i in range(count + count // 10 + 1):
        started = time.perf_counter()
        a.sendall(frame)
        got = 0
        while got < len(frame):
            got += len(a.recv(len(frame) - got))
        if i > count // 10:
            times.append((time.perf_counter() - started) * 1e6)
    a.close()
    os.waitpid(pid, 0)
    return summary(times)


# -- one run --------------------------------------------------------------------------------


def measure(quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    router = router_binary()
    bench = bench_binary(router)
    rtt_n = 500 if quick else 20000
    py_n = 300 if quick else 5000
    secs = seconds if seconds is not None else (0.3 if quick else 2.0)
    out: dict[str, Any] = {"router_binary": router, "masters": MASTERS, "workers": WORKERS}

    with running_router(router) as (proc, address):
        time.sleep(0.05)
        out["router_rss_mb"] = rss_mb(proc.pid)
        with native_workers(bench, address, WORKERS):
            rtt = run_bench(bench, "rtt", address, "--count", str(rtt_n), "--size", "0")
            out["native_rtt_p50_us"], out["native_rtt_p99_us"] = rtt["p50_us"], rtt["p99_us"]
            rtt_1k = run_bench(bench, "rtt", address, "--count", str(rtt_n), "--size", "1024")
            out["native_rtt_1k_p50_us"], out["native_rtt_1k_p99_us"] = rtt_1k["p50_us"], rtt_1k["p99_us"]
            for name, size, batch in LOADS:
                cpu0 = cpu_seconds(proc.pid)
                load = run_bench(bench, "load", address, "--masters", str(MASTERS), "--size", str(size),
                                 "--batch", str(batch), "--seconds", str(secs if size <= 1024 else secs / 2))
                cpu = cpu_seconds(proc.pid) - cpu0
                out[f"load_{name}"] = load
                out[f"router_cpu_us_per_job_{name}"] = cpu * 1e6 / max(1, load["jobs"])
        out["throughput_jobs_s"] = out["load_1k"]["jobs_s"]
        out["throughput_batched_jobs_s"] = out["load_1k_batched"]["jobs_s"]
        out["throughput_64k_jobs_s"] = out["load_64k"]["jobs_s"]
        out["throughput_64k_batched_jobs_s"] = out["load_64k_batched"]["jobs_s"]
        out["router_cpu_us_per_job"] = out["router_cpu_us_per_job_1k"]
        out["router_rss_after_load_mb"] = rss_mb(proc.pid)

        worker = _python_child("python_echo_worker", address)
        try:
            _read_line(worker, 20, "python echo worker")
            py = python_rtt(address, py_n, 0)
        finally:
            _stop(worker)
        out["python_rtt_p50_us"], out["python_rtt_p99_us"] = py["p50"], py["p99"]
        from parallel_render.client import RouterClient

        out["router_stats"] = RouterClient(address).stats()

    with running_redis() as port:
        worker = _python_child("redis_echo_worker", str(port))
        try:
            _read_line(worker, 20, "redis echo worker")
            rd = redis_rtt(port, py_n, 0)
        finally:
            _stop(worker)
    out["redis_rtt_p50_us"], out["redis_rtt_p99_us"] = rd["p50"], rd["p99"]
    out["redis_over_python_rtt"] = rd["p50"] / py["p50"]

    direct = run_bench(bench, "pingpong", "--count", str(rtt_n), "--size", "0")
    out["direct_rtt_p50_us"], out["direct_rtt_p99_us"] = direct["p50_us"], direct["p99_us"]
    pyd = python_direct_rtt(py_n, 0)
    out["python_direct_rtt_p50_us"], out["python_direct_rtt_p99_us"] = pyd["p50"], pyd["p99"]

    # The same native round trip with the router, the workers and the prober sharing CPU 0:
    # on a small VM a wake-up across cores costs more than the router's own work.
    with running_router(router, cpus={0}) as (_proc, address), native_workers(bench, address, WORKERS, cpus={0}):
        one = run_bench(bench, "rtt", address, "--count", str(rtt_n), "--size", "0", cpus={0})
    out["native_rtt_one_core_p50_us"], out["native_rtt_one_core_p99_us"] = one["p50_us"], one["p99_us"]
    one_direct = run_bench(bench, "pingpong", "--count", str(rtt_n), "--size", "0", cpus={0})
    out["direct_rtt_one_core_p50_us"] = one_direct["p50_us"]
    return out


NUMERIC_KEYS = (
    "native_rtt_p50_us", "native_rtt_p99_us", "native_rtt_1k_p50_us", "native_rtt_1k_p99_us",
    "native_rtt_one_core_p50_us", "native_rtt_one_core_p99_us", "python_rtt_p50_us", "python_rtt_p99_us",
    "redis_rtt_p50_us", "redis_rtt_p99_us", "redis_over_python_rtt", "direct_rtt_p50_us", "direct_rtt_p99_us",
    "direct_rtt_one_core_p50_us", "python_direct_rtt_p50_us", "python_direct_rtt_p99_us",
    "throughput_jobs_s", "throughput_batched_jobs_s", "throughput_64k_jobs_s", "throughput_64k_batched_jobs_s",
    "router_cpu_us_per_job", "router_cpu_us_per_job_1k_batched", "router_cpu_us_per_job_64k",
    "router_cpu_us_per_job_64k_batched", "router_rss_mb", "router_rss_after_load_mb",
)


def run(repeat: int = 1, quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    """`repeat` independent runs; each number reported is the median over the runs."""
    runs = [measure(quick, seconds) for _ in range(repeat)]
    result = dict(runs[-1])
    for key in NUMERIC_KEYS:
        result[key] = statistics.median(r[key] for r in runs)
    result["runs"] = repeat
    result["quick"] = quick
    return result


# -- output -----------------------------------------------------------------------------------

def _row(what: str, p50: float | str, p99: float | str, rate: float | str = "", target: str = "") -> list[object]:
    return [what, p50, p99, rate if isinstance(rate, str) else f"{rate:,.0f}", target]


def format_result(r: dict[str, Any]) -> str:
    loads = [r[f"load_{name}"] for name, _, _ in LOADS]
    rows: Sequence[list[object]] = [
        _row("direct Unix-socket ping-pong, C++ (floor)", r["direct_rtt_p50_us"], r["direct_rtt_p99_us"]),
        _row("router round trip, C++ prober + C++ echo, empty", r["native_rtt_p50_us"], r["native_rtt_p99_us"], "", "p50 ≤ 35, p99 ≤ 100"),
        _row("router round trip, C++, 1 KB", r["native_rtt_1k_p50_us"], r["native_rtt_1k_p99_us"]),
        _row("router round trip, C++, all on CPU 0", r["native_rtt_one_core_p50_us"], r["native_rtt_one_core_p99_us"]),
        _row("direct ping-pong, C++, both on CPU 0", r["direct_rtt_one_core_p50_us"], ""),
        _row("direct Unix-socket ping-pong, Python", r["python_direct_rtt_p50_us"], r["python_direct_rtt_p99_us"]),
        _row("router round trip, RouterClient + Python echo", r["python_rtt_p50_us"], r["python_rtt_p99_us"], "", "p50 ≤ 60"),
        _row("Redis lists LPUSH/BRPOP, redis-py + Python echo", r["redis_rtt_p50_us"], r["redis_rtt_p99_us"]),
    ]
    for (name, size, batch), load in zip(LOADS, loads, strict=True):
        target = {"1k": "≥ 60,000 jobs/s", "1k_batched": "≥ 90,000 jobs/s"}.get(name, "")
        rows.append(_row(f"throughput {MASTERS} masters / {WORKERS} workers, {size // 1024} KB, "
                         f"{'batches of ' + str(batch) if batch > 1 else 'unbatched'} (batch p50/p99)",
                         load["batch_p50_us"], load["batch_p99_us"], load["jobs_s"], target))
    summary_rows = [
        ["Redis / Python round trip (p50)", f"{r['redis_over_python_rtt']:.2f}x", "≥ 5x"],
        ["router CPU per job, 1 KB unbatched", f"{r['router_cpu_us_per_job']:.2f} µs", "≤ 5 µs"],
        ["router CPU per job, 1 KB batched", f"{r['router_cpu_us_per_job_1k_batched']:.2f} µs", ""],
        ["router CPU per job, 64 KB unbatched", f"{r['router_cpu_us_per_job_64k']:.2f} µs", ""],
        ["router RSS idle / after load", f"{r['router_rss_mb']:.2f} / {r['router_rss_after_load_mb']:.2f} MB", "≤ 10 MB idle"],
    ]
    head = (f"fastrouter benchmark ({r['runs']} run{'s' if r['runs'] > 1 else ''}, medians; "
            f"{'quick' if r['quick'] else 'full'}), router {r['router_binary']}\n"
            f"reproduce: python manage.py parallel_bench router --repeat {r['runs']}\n")
    return (head + table(["round trip / load", "p50 µs", "p99 µs", "jobs/s", "target"], rows) + "\n\n"
            + table(["derived", "value", "target"], summary_rows) + "\n")


def add_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a few hundred round trips and 0.3 s loads (for tests)")
    parser.add_argument("--repeat", type=int, default=1, help="independent runs; numbers are their medians")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per 1 KB load run (64 KB runs take half)")


def handle(options: dict[str, Any], stdout: Any) -> None:
    from django.core.management.base import CommandError

    if options["repeat"] < 1:
        raise CommandError("--repeat must be at least 1")
    try:
        result = run(options["repeat"], options["quick"], options["seconds"])
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    stdout.write(json.dumps(result) if options["json"] else format_result(result))
