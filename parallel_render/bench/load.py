"""A real node under closed-loop load: the same pages rendered serially and in parallel, interleaved.

The bench starts `manage.py runparallel` on a free port (or uses `--url`), then for each page
(I/O-bound, CPU-bound, mixed) and each concurrency level keeps that many connections busy,
each sending its next request as soon as the previous one is answered, with `wrk` when it is
installed or with a built-in generator (a thread per connection). Serial requests carry the
serial header, so the same node renders them without workers.

By default every request comes on a new connection (`Connection: close`), as from a proxy
that opens one per request (nginx's default towards its upstream): the kernel then hands each
request to whichever master accepts first. Kept alive (`--connections keep-alive`), each
connection stays on the master that accepted it for the whole slice; with two masters whose
threads share one interpreter lock each, a slice whose connections happened to land 3 to 1
served a fifth fewer pages in either mode than one that landed 2 to 2, which is more than the
difference between the modes this bench is for.

Per page and level: a plain GET in each mode checks the page (200, parallel and serial bodies
equal once pids are blanked, the blocks present and sent to workers); a warm-up slice in each
mode; then `--slices` slices per mode of `--duration / --slices` seconds, alternating which
mode goes first, so drift on the machine hits both alike, each after an uncounted lead-in of
its own mode (`--lead-in`); where a mode finished fewer than
`--min-requests`, more slices of both. Throughput counts the 200s; the latency percentiles are
over every request of the mode's slices together. `--same-mode` sends both modes' slices
without the serial header: an A/A run, whose ratios are the machine's noise alone.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from parallel_render.bench import need_psutil
from parallel_render.bench.capacity import _Fetcher
from parallel_render.bench.stats import ratio_interval, summary, table
from parallel_render.cpus import this_process
from parallel_render.process import die_with_parent

HELP = "a real node under load: throughput and p50/p99, serial vs parallel interleaved, per concurrency level"

MODES = ("serial", "parallel")
LEVELS = (1, 2, 4, 8, 16, 32)
# Parallel must serve at least this share of serial's requests/s, within this much of its p99.
TARGET_THROUGHPUT = 0.95
TARGET_P99 = 1.05
# Closed loop: when a slice ends every connection has a request in flight, which is not counted.
# Slices long enough for each connection to finish this many requests keep the slow ones in the
# percentiles; the bench lengthens a level's slices to that, up to --max-slice.
MIN_ROUNDS = 4
# And long enough for each mode to finish this many requests per level (--min-requests), up to
# --max-slice: a p99 over fewer rests on its slowest two or three.
MIN_REQUESTS = 600
WRK_MARK = "PARALLEL_BENCH_LOAD "
PID = re.compile(rb"pid \d+")
# Seconds of a slice's mode run, not counted, right before it (LoadBench.measured_slice): wrk's
# shortest run.
LEAD_IN = 1.0
# What the machine did beside the node, per slice (machine_mark, machine_since): the table
# warns where the hypervisor gave the CPUs to others (steal) for more than this share of one
# CPU's time, where the wall clock, by which wrk times each request, stepped by more than this
# many ms, and where a slice's latencies add up to more than this times the time its
# connections had (closed loop: they cannot, unless requests were timed longer than they ran).
STEAL_WARN = 0.05
CLOCK_STEP_WARN_MS = 50.0
OVERTIMED_WARN = 1.05
WORKERS_WAIT = 45.0  # seconds from the node's start for its workers to render a block of the first page
WORKER_BLOCK = re.compile(r'pid \d+ render ([\d.]+)ms')
RESCUED_BLOCK = re.compile(r"master render [\d.]+ms")


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    marker: str = ""  # counted in the body: one per block
    blocks: int | None = None  # expected markers; None: as many as the serial page has
    speedup_target: float | None = None  # p50 serial/parallel wanted at concurrency 1


def _known(name: str, path: str | None = None) -> Page:
    if name == "io":
        path = path or "/bench/io/?blocks=6&ms=20"
        return Page("io", path, 'data-bench-block="', _query_int(path, "blocks", 6), 2.5)
    if name == "cpu":
        path = path or "/bench/cpu/?blocks=4&ms=10"
        return Page("cpu", path, 'data-bench-block="', _query_int(path, "blocks", 4), 1.5)
    if name == "mixed":
        return Page("mixed", path or "/q/1/blocks/?latency=10", 'data-block="')
    if path is None:
        raise ValueError(f"unknown page {name!r}: use io, cpu, mixed or NAME=/path")
    return Page(name, path)


def _query_int(path: str, name: str, default: int) -> int:
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get(name)
    try:
        return int(values[0]) if values else default
    except ValueError:
        return default


def parse_pages(spec: str) -> list[Page]:
    """`io,cpu,mixed`; an entry NAME=/path measures another page (io/cpu/mixed keep their checks)."""
    pages = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, path = entry.partition("=")
        if path and not path.startswith("/"):
            raise ValueError(f"page {name!r}: the path must start with /, not {path!r}")
        pages.append(_known(name.strip(), path or None))
    if not pages:
        raise ValueError("no pages to measure")
    return pages


def parse_levels(spec: str) -> list[int]:
    try:
        levels = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels takes numbers separated by commas, not {spec!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError("--levels needs at least one concurrency, each at least 1")
    return levels


# -- load generators -----------------------------------------------------------------------


@dataclass
class Slice:
    """One timed run of one mode: what was answered, and how fast."""

    mode: str
    seconds: float
    ok: int = 0
    non200: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""
    # Set by LoadBench.measured_slice (machine_since): CPU seconds the hypervisor gave to others
    # while the slice ran (None where /proc/stat has no steal), and how far the wall clock
    # moved beyond the monotonic one (a step, ms).
    steal_seconds: float | None = None
    clock_step_ms: float = 0.0
    # CPU seconds the node's processes used while the slice ran, all of them (masters, workers,
    # router); None where the bench did not start the node.
    node_cpu_seconds: float | None = None

    def overtimed(self, concurrency: int) -> float:
        """The slice's latencies added up, over the time its connections had (concurrency x
        seconds): at most 1 in a closed loop, where each connection waits for its answer."""
        room = concurrency * self.seconds
        return sum(self.latencies_ms) / 1000 / room if room > 0 else 0.0


def _steal_seconds() -> float | None:
    """CPU seconds the hypervisor has given to other guests while this machine's CPUs wanted
    to run, since boot, all CPUs together (the steal column of /proc/stat); None without it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_mark() -> tuple[float, float, float | None]:
    """The wall clock, the monotonic clock and the steal counter now, for machine_since()."""
    return time.time(), time.monotonic(), _steal_seconds()


def machine_since(mark: tuple[float, float, float | None]) -> tuple[float | None, float]:
    """Steal seconds since mark (None where there is no counter), and how many ms the wall
    clock moved beyond the monotonic one (an NTP or hypervisor step; 0 when it did not)."""
    wall, mono, steal = mark
    now_wall, now_mono, now_steal = machine_mark()
    stolen = now_steal - steal if now_steal is not None and steal is not None else None
    return stolen, ((now_wall - wall) - (now_mono - mono)) * 1000


def _run_clients(client: Callable[[], None], concurrency: int) -> float:
    """Run `client` in `concurrency` threads at once; the seconds until the last returned."""
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def builtin_slice(url: str, concurrency: int, seconds: float, headers: dict[str, str], mode: str) -> Slice:
    """Closed loop: `concurrency` threads, each on its own keep-alive connection, for `seconds`."""
    result = Slice(mode, 0.0)
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client() -> None:
        fetcher = _Fetcher(url, headers)
        mine: list[float] = []
        ok = non200 = errors = 0
        first = ""
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                status = fetcher.fetch()
            except Exception as exc:
                errors += 1
                first = first or f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)  # a refused connection must not spin
                continue
            if status == 200:
                ok += 1
                mine.append((time.perf_counter() - started) * 1000)
            else:
                non200 += 1
                first = first or f"HTTP {status}"
        if fetcher.conn is not None:
            fetcher.conn.close()
        with lock:
            result.latencies_ms.extend(mine)
            result.ok += ok
            result.non200 += non200
            result.errors += errors
            result.first_error = result.first_error or first

    result.seconds = _run_clients(client, concurrency)
    return result


def burst_slice(url: str, concurrency: int, headers: dict[str, str], mode: str) -> Slice:
    """One burst: `concurrency` requests sent at once, each on a new connection (the bench has
    let the node settle before it), and over when the last is answered."""
    result = Slice(mode, 0.0)
    lock = threading.Lock()
    ready = threading.Barrier(concurrency)

    def client() -> None:
        fetcher = _Fetcher(url, {**headers, "Connection": "close"})
        ready.wait()
        started = time.perf_counter()
        try:
            status = fetcher.fetch()
        except Exception as exc:
            with lock:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            return
        ms = (time.perf_counter() - started) * 1000
        with lock:
            if status == 200:
                result.ok += 1
                result.latencies_ms.append(ms)
            else:
                result.non200 += 1
                result.first_error = result.first_error or f"HTTP {status}"

    result.seconds = _run_clients(client, concurrency)
    return result


# `wrk ... -s SCRIPT URL -- MODE HEADER CONNECTIONS`: the serial mode sends HEADER: serial;
# CONNECTIONS "close" sends Connection: close (a connection per request). done() prints
# one JSON line with the counts and every distinct latency (µs) with how often it was seen,
# so slices can be merged exactly.
# What both scripts share: the mode's headers from wrk's arguments, and report(), which prints
# the JSON line parse_wrk() reads.
_WRK_COMMON = """\
-- written by parallel_render.bench.load
local function use_args(args)
  if args[1] == "serial" then wrk.headers[args[2]] = "serial" end
  if args[3] == "close" then wrk.headers["Connection"] = "close" end
end

local function report(requests, duration, summary, status, p50, p90, p99, seen)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"latency_us":[%s]}\\n',
    "MARK", requests, duration, summary.bytes, e.connect, e.read, e.write, status, e.timeout,
    p50, p90, p99, table.concat(seen, ",")))
end

""".replace("MARK", WRK_MARK)

WRK_SCRIPT = _WRK_COMMON + """\
function init(args)
  use_args(args)
end

function done(summary, latency, requests)
  local seen = {}
  for i = 1, #latency do
    local value, count = latency(i)
    seen[#seen + 1] = string.format("[%d,%d]", value, count)
  end
  report(summary.requests, summary.duration, summary, summary.errors.status,
         latency:percentile(50), latency:percentile(90), latency:percentile(99), seen)
end
"""


# The same, with a lead-in inside the run: `... -- MODE HEADER CONNECTIONS LEAD`, one connection
# per wrk thread, so the connections that brought the node to its steady state go on into the
# measured part without a break. (Two wrk runs, a lead-in and then the slice, left the
# lead-in's requests running in the node when the slice began with as many again: its first
# requests waited behind them, and they set its p99.) Each thread times its own requests (the
# monotonic clock, through LuaJIT's FFI). The measured part counts the answers that arrived in
# it ("requests", for req/s: as many requests cross its start, begun earlier, as cross its
# end, unanswered, so these match the node's work in it) and times the requests sent in it
# ("latency_us": none of the lead-in's). duration_us is the measured part.
WRK_LEAD_SCRIPT = _WRK_COMMON + """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } parallel_bench_timespec;
int clock_gettime(int clock, parallel_bench_timespec *now);
]]
local now_buf = ffi.new("parallel_bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, now_buf)  -- CLOCK_MONOTONIC
  return tonumber(now_buf.tv_sec) * 1000000 + math.floor(tonumber(now_buf.tv_nsec) / 1000)
end

local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  use_args(args)
  lead_us = math.floor(tonumber(args[4]) * 1000000)
  started = now_us()
  sent = nil
  timed = {}
  answered = 0
  failed = 0
end

function request()
  sent = now_us()
  return wrk.format()
end

function response(status, headers, body)
  local now = now_us()
  if now - started >= lead_us then
    answered = answered + 1
    if status > 399 then failed = failed + 1 end
  end
  if sent ~= nil and sent - started >= lead_us then
    timed[#timed + 1] = now - sent
  end
  sent = nil
end

function done(summary, latency, requests)
  local all, answers, failures, lead = {}, 0, 0, 0
  for _, thread in ipairs(threads) do
    for _, us in ipairs(thread:get("timed")) do all[#all + 1] = us end
    answers = answers + thread:get("answered")
    failures = failures + thread:get("failed")
    lead = thread:get("lead_us")
  end
  table.sort(all)
  local seen = {}
  for _, us in ipairs(all) do seen[#seen + 1] = string.format("[%d,1]", us) end
  local function pct(p)
    if #all == 0 then return 0 end
    return all[math.max(1, math.ceil(#all * p / 100))]
  end
  report(answers, math.max(0, summary.duration - lead), summary, failures, pct(50), pct(90), pct(99), seen)
end
"""


def parse_wrk(output: str) -> dict[str, Any]:
    """The JSON line our script's done() printed among wrk's own output."""
    import orjson

    for line in output.splitlines():
        if line.startswith(WRK_MARK):
            return orjson.loads(line[len(WRK_MARK):])
    raise ValueError("wrk printed no result line (was the script's done() run?):\n" + output[-2000:])


def wrk_result_slice(data: dict[str, Any], mode: str) -> Slice:
    errors = data["errors"]
    status_errors = errors["status"]  # wrk counts answers with a status above 399
    ms = [value / 1000 for value, count in data["latency_us"] for _ in range(count)]
    return Slice(
        mode, data["duration_us"] / 1e6, ok=max(0, data["requests"] - status_errors), non200=status_errors,
        errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        latencies_ms=ms,
        first_error=", ".join(f"{k} {v}" for k, v in errors.items() if v),
    )


class Wrk:
    """Runs wrk with our Lua script, one process per slice."""

    def __init__(self, binary: str, workdir: str, header: str, timeout: float, connections: str = "close") -> None:
        self.binary = binary
        self.connections = connections
        self.script = os.path.join(workdir, "load.lua")
        self.lead_script = os.path.join(workdir, "load_lead.lua")
        for path, text in ((self.script, WRK_SCRIPT), (self.lead_script, WRK_LEAD_SCRIPT)):
            with open(path, "w") as f:
                f.write(text)
        self.header = header
        self.timeout = timeout
        self.threads_cap = max(1, min(4, this_process().cores // 2))  # leave the cores to the node

    def threads(self, concurrency: int) -> int:
        return min(concurrency, self.threads_cap)

    def slice(
        self, url: str, concurrency: int, seconds: float, mode: str, lead_in: float = 0.0,
        counting: Callable[[], None] | None = None,
    ) -> Slice:
        """One wrk run of `seconds` (whole ones). With lead_in, the run is lead_in longer and its
        first lead_in seconds are not counted (WRK_LEAD_SCRIPT); counting() is called when the
        counted part begins, to take the readings that go with it."""
        if lead_in > 0:
            threads, script, extra = concurrency, self.lead_script, [f"{lead_in:g}"]
            total = max(1, math.ceil(lead_in + seconds - 1e-6))
        else:
            threads, script, extra = self.threads(concurrency), self.script, []
            total = max(1, math.ceil(seconds - 1e-6))
        cmd = [self.binary, "-t", str(threads), "-c", str(concurrency),
               "-d", f"{total}s", "--timeout", f"{max(1, round(self.timeout))}s", "--latency",
               "-s", script, url, "--", mode, self.header, self.connections, *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if lead_in > 0 and counting is not None:
                time.sleep(lead_in)
                counting()
            out, err = proc.communicate(timeout=total + self.timeout + 30)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited with {proc.returncode}: {err.strip() or out[-500:]}")
        return wrk_result_slice(parse_wrk(out), mode)


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True)
    match = re.search(r"wrk (\S+)", done.stdout + done.stderr)
    return match.group(1) if match else "?"


# -- the node --------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """`manage.py runparallel` on a free loopback port, as a child process, with its process tree."""

    def __init__(self, args: Sequence[str], workdir: str) -> None:
        from parallel_render import conf
        from parallel_render.cluster import child_env

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.log_path = os.path.join(workdir, "node.log")
        env = child_env()
        env.pop(conf.ENV_ROUTER, None)  # the node starts its own router
        self._log = open(self.log_path, "wb")
        # The node drains and stops (SIGTERM) if the bench dies, even by SIGKILL: no orphans.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runparallel", "--bind", f"127.0.0.1:{self.port}", *self.args],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        self.seen: set[int] = set()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def tree(self) -> dict[str, list[int]]:
        """Pids of the node's router, workers and masters (gunicorn's workers, not its arbiter), as running now."""
        import psutil

        kinds: dict[str, list[int]] = {"router": [], "workers": [], "masters": []}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return kinds
        for child in children:
            self.seen.add(child.pid)
            try:  # a child may exit between the listing and these reads
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = child.cmdline()
                parent = child.ppid()
            except psutil.Error:
                continue
            if cmd and "fastrouter" in os.path.basename(cmd[0]):
                kinds["router"].append(child.pid)
            elif "parallel_worker" in cmd:
                kinds["workers"].append(child.pid)
            elif parent != self.proc.pid:  # gunicorn's workers; not its arbiter, our child
                kinds["masters"].append(child.pid)
        return kinds

    def cpu_seconds(self) -> float:
        """CPU time the node's processes have used so far, all of them together, to the
        nanosecond (overhead.process_cpu): a burst of one I/O page uses a few ms, less than
        one of /proc/PID/stat's 10 ms ticks."""
        import psutil

        from parallel_render.bench.overhead import process_cpu

        total = 0.0
        try:
            processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for process in processes:
            try:
                total += process_cpu(process.pid)
            except psutil.Error:
                continue
        return total

    def wait_serving(self, probe: Callable[[], bool], timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runparallel exited with {self.proc.returncode}:\n{self.log_tail()}")
            self.tree()
            try:
                if probe():
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the node at {self.url} did not serve pages rendered by its workers "
                           f"within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 60.0) -> list[int]:
        """SIGTERM (the node drains), then SIGKILL past `grace`; return processes that outlived it."""
        import psutil

        from parallel_render.process import send, wait_all

        self.tree()
        send(self.proc, signal.SIGTERM)
        wait_all([self.proc], grace)
        self._log.close()
        end = time.monotonic() + 5.0
        while True:
            alive = [pid for pid in self.seen if _running(pid)]
            if not alive or time.monotonic() > end:
                break
            time.sleep(0.1)
        for pid in alive:  # ours, and they should be gone: do not leave them behind
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        return alive


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- checking the pages ----------------------------------------------------------------------


def _get(url: str, headers: dict[str, str], timeout: float = 60.0) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get("Server-Timing", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Server-Timing", "")


def check_page(base: str, page: Page, serial_headers: dict[str, str], attempts: int = 2) -> dict[str, Any]:
    """One GET in each mode: both 200, the same body once pids are blanked, the blocks there and offloaded."""
    url = base + page.path
    for attempt in range(attempts):
        started = time.perf_counter()
        p_status, p_body, timing = _get(url, {})
        p_ms = (time.perf_counter() - started) * 1000
        s_status, s_body, _ = _get(url, serial_headers)
        s_ms = (time.perf_counter() - started) * 1000 - p_ms
        problems = []
        if p_status != 200 or s_status != 200:
            problems.append(f"HTTP {p_status} parallel, {s_status} serial")
        same = PID.sub(b"pid N", p_body) == PID.sub(b"pid N", s_body)
        if not same:
            problems.append("parallel and serial bodies differ")
        markers = p_body.count(page.marker.encode()) if page.marker else None
        expected = page.blocks if page.blocks is not None else (s_body.count(page.marker.encode()) if page.marker else None)
        if markers is not None and (markers != expected or markers == 0):
            problems.append(f"{markers} blocks in the parallel page, expected {expected}")
        rendered = [float(ms) for ms in WORKER_BLOCK.findall(timing)]
        check = {
            "ok": not problems, "problems": problems, "status": [s_status, p_status], "same_body": same,
            "blocks": markers, "offloaded": len(rendered), "rescued": len(RESCUED_BLOCK.findall(timing)),
            "block_ms_p50": summary(rendered)["p50"] if rendered else None, "server_timing": bool(timing),
            "ms": {"serial": s_ms, "parallel": p_ms},
        }
        if check["ok"] or attempt == attempts - 1:
            return check
        time.sleep(0.2)  # e.g. a "3 minutes ago" that turned over between the two GETs
    raise AssertionError("unreachable")


# -- the run ---------------------------------------------------------------------------------


def latencies(slices: list[Slice]) -> list[float]:
    """Every request's latency in these slices, in ms."""
    return [ms for s in slices for ms in s.latencies_ms]


def combine(slices: list[Slice], concurrency: int = 0) -> dict[str, Any]:
    seconds = sum(s.seconds for s in slices)
    ok = sum(s.ok for s in slices)
    cpu = [s.node_cpu_seconds for s in slices]
    known = bool(slices) and all(c is not None for c in cpu)
    node_cpu = sum(c for c in cpu if c is not None)
    return {
        # The node's CPU per page answered, all its processes, and how many CPUs it kept busy.
        "node_cpu_ms_per_page": node_cpu * 1000 / ok if known and ok else None,
        "node_cpus": node_cpu / seconds if known and seconds > 0 else None,
        "requests": ok, "seconds": seconds, "rps": ok / seconds if seconds > 0 else 0.0,
        "non200": sum(s.non200 for s in slices), "errors": sum(s.errors for s in slices),
        "first_error": next((s.first_error for s in slices if s.first_error), ""),
        **{k: v for k, v in summary(latencies(slices)).items() if k != "n"},
        "slices": [{"seconds": s.seconds, "rps": s.ok / s.seconds if s.seconds > 0 else 0.0,
                    **{k: v for k, v in summary(s.latencies_ms).items() if k in ("p50", "p99")},
                    "errors": s.errors + s.non200, "steal_seconds": s.steal_seconds,
                    "clock_step_ms": s.clock_step_ms, "node_cpu_seconds": s.node_cpu_seconds,
                    **({"overtimed": s.overtimed(concurrency)} if concurrency else {})} for s in slices],
    }


def judge(page: Page, concurrency: int, serial: dict[str, Any], parallel: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The ratios, and which targets this level misses."""

    def ratio(a: float, b: float) -> float:
        return a / b if b and a == a and b == b else float("nan")

    ratios = {
        "throughput": ratio(parallel["rps"], serial["rps"]),
        "speedup_p50": ratio(serial["p50"], parallel["p50"]),
        "p99": ratio(parallel["p99"], serial["p99"]),
    }
    if serial.get("node_cpu_ms_per_page") and parallel.get("node_cpu_ms_per_page"):
        ratios["node_cpu_per_page"] = ratio(parallel["node_cpu_ms_per_page"], serial["node_cpu_ms_per_page"])
    missed = []
    idle = [mode for mode, m in (("serial", serial), ("parallel", parallel)) if not m["rps"] > 0]
    if idle:
        return ratios, [f"no {' or '.join(idle)} request completed"]
    if not ratios["throughput"] >= TARGET_THROUGHPUT:
        missed.append(f"req/s {ratios['throughput']:.2f}x < {TARGET_THROUGHPUT}x")
    if not ratios["p99"] <= TARGET_P99:
        missed.append(f"p99 {ratios['p99']:.2f}x > {TARGET_P99}x")
    if concurrency == 1 and page.speedup_target and not ratios["speedup_p50"] >= page.speedup_target:
        missed.append(f"speed-up {ratios['speedup_p50']:.2f}x < {page.speedup_target}x")
    if serial["errors"] + serial["non200"] + parallel["errors"] + parallel["non200"]:
        missed.append("errors")
    return ratios, missed


class LoadBench:
    """Drives a node at `base` through every page and level; `run()` returns the results."""

    def __init__(
        self, base: str, pages: list[Page], levels: list[int], duration: float, slices: int, warmup: float,
        slice_fn: Callable[..., Slice], serial_header: str, log: Callable[[str], None] | None = None,
        max_slice: float = 20.0, whole_seconds: bool = False, settle: Callable[[Slice], float] | None = None,
        min_requests: int = 0, bursts: bool = False, lead_in: float = 0.0,
        node_cpu: Callable[[], float] | None = None, lead_within: bool = False,
    ) -> None:
        self.base = base.rstrip("/")
        self.pages = pages
        self.levels = levels
        self.duration = duration
        self.slices = slices
        self.warmup = warmup
        self.slice_fn = slice_fn
        self.serial_headers = {serial_header: "serial"}
        self.log = log or (lambda line: None)
        self.max_slice = max_slice
        self.min_requests = min_requests
        self.whole_seconds = whole_seconds  # wrk takes whole seconds
        self.bursts = bursts  # a slice is one burst (burst_slice), whatever its seconds
        # Seconds of the same mode, not counted, right before each slice: it starts on a node
        # in that mode's steady state, not on one the settling left idle.
        self.lead_in = 0.0 if bursts else lead_in
        # Whether slice_fn runs the lead-in and the slice as one run (slice_fn(..., lead_in=,
        # counting=): Wrk.slice). Otherwise the lead-in is a run of its own, which suits a
        # generator whose clients finish their requests before it returns (builtin_slice).
        self.lead_within = lead_within
        # Called after each slice: waits for the requests the slice left in flight (see settle_after).
        self.settle = settle or (lambda _slice: 0.0)
        self.settled = 0.0  # seconds spent waiting for them, over the run
        # The node's processes' CPU time so far (Node.cpu_seconds), read around each slice.
        self.node_cpu = node_cpu

    def preflight(self) -> None:
        """Every page answers 200 in both modes before any time is spent measuring."""
        for page in self.pages:
            check = check_page(self.base, page, self.serial_headers)
            if check["status"] != [200, 200]:
                hint = (" The mixed page is the demo's question page: prepare the demo database with "
                        "`python manage.py migrate && python manage.py seed_demo` (as scripts/demo.sh does)."
                        if page.name == "mixed" else "")
                raise RuntimeError(f"page {page.name} ({self.base}{page.path}) answered HTTP {check['status'][0]} "
                                   f"serially and {check['status'][1]} in parallel.{hint}")

    def run(self) -> list[dict[str, Any]]:
        self.preflight()
        out = []
        for page in self.pages:
            levels: list[dict[str, Any]] = []
            for n, concurrency in enumerate(self.levels):
                levels.append(self.level(page, concurrency, n, levels[-1] if levels else None))
            out.append({"name": page.name, "path": page.path, "blocks": page.blocks,
                        "speedup_target": page.speedup_target, "levels": levels})
        return out

    def slice_seconds(self, concurrency: int, check: dict[str, Any], previous: dict[str, Any] | None) -> float:
        """--duration / --slices, or longer: MIN_ROUNDS times the slowest mode's expected latency,
        and long enough for the slower mode to finish min_requests in its slices.

        The latency is expected from the idle GETs and, by Little's law, from the previous
        level's throughput (concurrency / requests per second, right once the node is saturated).
        """
        expected = max(check["ms"].values()) / 1000
        if previous is not None:
            for mode in MODES:
                rps = previous[mode]["rps"]
                expected = max(expected, concurrency / rps if rps > 0 else 2 * previous["slice_seconds"])
        # Requests per second of the slower mode: no more than the previous level's (a node
        # that is saturated serves no more with more connections), nor than Little's law allows.
        rps = concurrency / expected if expected > 0 else 0.0
        if previous is not None:
            rps = min([rps] + [previous[mode]["rps"] for mode in MODES if previous[mode]["rps"] > 0])
        enough = self.min_requests / (self.slices * rps) if rps > 0 else 0.0
        seconds = min(self.max_slice, max(self.duration / self.slices, MIN_ROUNDS * expected, enough))
        return float(math.ceil(seconds - 1e-6)) if self.whole_seconds else seconds

    def one_round(self, url: str, concurrency: int, seconds: float, k: int, taken: dict[str, list[Slice]]) -> None:
        """A slice of each mode, serial first when k is even: alternating from round to round and
        from level to level."""
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            taken[mode].append(self.measured_slice(url, concurrency, seconds, mode))
            # The next slice starts on a node that has finished this one's requests: else the
            # first requests of a parallel slice would queue behind the serial requests still
            # running (heavier than parallel ones), and its p99 would be the serial mode's.
            self.settled += self.settle(taken[mode][-1])

    def measured_slice(self, url: str, concurrency: int, seconds: float, mode: str) -> Slice:
        """One slice of `mode`, after the lead-in (uncounted) that brings the node to its steady state."""
        readings: dict[str, Any] = {}

        def counting() -> None:
            readings["mark"] = machine_mark()
            readings["cpu"] = self.node_cpu() if self.node_cpu is not None else None

        if self.lead_in > 0 and self.lead_within:
            # The same connections go on from the lead-in into the slice: one run.
            done = self.slice_fn(url, concurrency, seconds, mode, lead_in=self.lead_in, counting=counting)
        else:
            if self.lead_in > 0:
                self.slice_fn(url, concurrency, self.lead_in, mode)
            counting()
            done = self.slice_fn(url, concurrency, seconds, mode)
        if "mark" not in readings:  # a generator that never began counting: read from now
            counting()
        if readings["cpu"] is not None and self.node_cpu is not None:
            done.node_cpu_seconds = self.node_cpu() - readings["cpu"]
        done.steal_seconds, done.clock_step_ms = machine_since(readings["mark"])
        return done

    def top_up_seconds(self, taken: dict[str, list[Slice]]) -> float | None:
        """How long one more slice per mode must run for the mode furthest from min_requests to
        reach them at the rate it has served so far (up to --max-slice); None when every mode
        has them (or the slices are bursts, or no minimum was asked for)."""
        if self.bursts or not self.min_requests:
            return None
        needed = []
        for mode in MODES:
            done = sum(s.ok for s in taken[mode])
            if done < self.min_requests:
                seconds = sum(s.seconds for s in taken[mode])
                if done and seconds > 0:  # a mode that finished nothing is flagged, not waited for
                    needed.append((self.min_requests - done) * seconds / done)
        if not needed:
            return None
        more = min(self.max_slice, max(needed))
        return float(max(1, math.ceil(more - 1e-6))) if self.whole_seconds else more

    def level(self, page: Page, concurrency: int, n: int, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base + page.path
        check = check_page(self.base, page, self.serial_headers)
        seconds = self.slice_seconds(concurrency, check, previous)
        if self.warmup > 0:
            for mode in ("parallel", "serial"):
                self.settled += self.settle(self.slice_fn(url, concurrency, self.warmup / 2, mode))
        taken: dict[str, list[Slice]] = {mode: [] for mode in MODES}
        for k in range(self.slices):
            self.one_round(url, concurrency, seconds, k + n, taken)
        # The slices' length came from an estimate of the node's throughput (the idle GETs, the
        # previous level's): where a mode finished fewer than min_requests, one more slice per
        # mode, as long as the measured rate says it takes, up to `slices` more rounds.
        extra = 0
        while extra < self.slices and (more := self.top_up_seconds(taken)) is not None:
            self.one_round(url, concurrency, more, self.slices + extra + n, taken)
            extra += 1
        serial, parallel = combine(taken["serial"], concurrency), combine(taken["parallel"], concurrency)
        ratios, missed = judge(page, concurrency, serial, parallel)
        ratios["p99_interval"] = list(ratio_interval(latencies(taken["parallel"]), latencies(taken["serial"])))
        if not check["ok"]:
            missed.append("check: " + "; ".join(check["problems"]))
        # Requests each connection finished in its slice: few means slow requests were cut off.
        rounds = min(s.ok + s.non200 for slices in taken.values() for s in slices) / concurrency
        each = (f"{self.slices} bursts" if self.bursts else f"{self.slices} x {seconds:.1f} s"
                + "".join(f" + {s.seconds:.1f} s" for s in taken["serial"][self.slices:]))
        machine = machine_noise([s for slices in taken.values() for s in slices], concurrency)
        noted = machine_notes(machine)
        self.log(f"  {page.name} c={concurrency}: {each} per mode: serial {serial['rps']:.1f} req/s "
                 f"p99 {serial['p99']:.0f} ms, parallel {parallel['rps']:.1f} req/s p99 {parallel['p99']:.0f} ms"
                 + (f"  [{'; '.join(missed)}]" if missed else "") + (f"  [machine: {'; '.join(noted)}]" if noted else ""))
        return {"concurrency": concurrency, "slice_seconds": seconds, "extra_rounds": extra, "rounds": rounds, "serial": serial,
                "parallel": parallel, "ratios": ratios, "missed": missed, "check": check, "machine": machine}


def machine_noise(slices: list[Slice], concurrency: int) -> dict[str, Any]:
    """The worst any of a level's slices met beside the node: the largest share of one CPU's
    time the hypervisor took (steal seconds per slice second; None without a counter), the
    largest step of the wall clock (ms, either way) and the largest overtimed() ratio, each
    with the mode of the slice it was seen in."""

    def worst(value: Callable[[Slice], float | None]) -> tuple[float | None, str]:
        seen = [(v, s.mode) for s in slices if (v := value(s)) is not None]
        return max(seen, key=lambda vm: abs(vm[0]), default=(None, ""))

    steal, steal_mode = worst(lambda s: s.steal_seconds / s.seconds if s.steal_seconds is not None and s.seconds > 0 else None)
    step, step_mode = worst(lambda s: s.clock_step_ms)
    over, over_mode = worst(lambda s: s.overtimed(concurrency))
    return {"steal_share": steal, "steal_mode": steal_mode, "clock_step_ms": step or 0.0, "clock_step_mode": step_mode,
            "overtimed": over or 0.0, "overtimed_mode": over_mode}


def machine_notes(machine: dict[str, Any] | None) -> list[str]:
    """What in machine_noise() makes a level's numbers the machine's as much as the node's."""
    if not machine:
        return []
    notes = []
    if (machine.get("steal_share") or 0.0) > STEAL_WARN:
        notes.append(f"steal {machine['steal_share']:.0%} of a CPU in a {machine['steal_mode']} slice")
    if abs(machine.get("clock_step_ms") or 0.0) > CLOCK_STEP_WARN_MS:
        notes.append(f"wall clock stepped {machine['clock_step_ms']:+.0f} ms in a {machine['clock_step_mode']} slice")
    if (machine.get("overtimed") or 0.0) > OVERTIMED_WARN:
        notes.append(f"latencies of a {machine['overtimed_mode']} slice add up to {machine['overtimed']:.2f}x "
                     "its connections' time")
    return notes


# -- output ----------------------------------------------------------------------------------


def format_result(result: dict[str, Any]) -> str:
    node, gen = result["node"], result["generator"]
    out = [f"node: {node['description']}"]
    if node.get("layout"):
        out.append(f"layout: {node['layout']}")
    per_request = gen.get("connections", "close") == "close"
    bursts = gen.get("name") == "burst"
    if bursts:
        out.append(f"generator: {gen['description']}; per level and mode {gen['slices']} bursts, interleaved"
                   + (", after one burst per mode of warm-up" if gen["warmup"] else ""))
    else:
        out.append(f"generator: {gen['description']}; closed loop, "
                   f"{'a new connection per request' if per_request else 'connections kept alive'}; per level and mode {gen['slices']} slices of "
                   f"{gen['slice_seconds']:.1f} s, interleaved, after a {gen['warmup']:g} s warm-up"
                   + (f"; each slice after a {gen['lead_in']:g} s lead-in of its own mode, not counted"
                      + (", on the same connections in the same run" if gen.get("lead_within") else "") if gen.get("lead_in") else ""))
    if gen.get("same_mode"):
        out.append("A/A (--same-mode): the serial slices went out without the serial header, so both modes rendered in "
                   "parallel; each ratio below compares parallel with parallel, and a MISS is the machine's noise alone")
    if node.get("settled_seconds") is not None:
        waited = ("before each burst the bench waited for the node to settle" if bursts else
                  "after each slice the bench waited for the node to finish the requests it left in flight")
        out.append(f"{waited} ({node['settled_seconds']:g} s in all)")
    if result.get("debug"):
        out.append("warning: the node runs with DEBUG on (for the demo site: DEMO_DEBUG=0)")
    for page in result["pages"]:
        first = page["levels"][0]["check"] if page["levels"] else {}
        block_ms = first.get("block_ms_p50")
        out += ["", f"page {page['name']}: {page['path']} ({first.get('blocks')} blocks, {first.get('offloaded')} sent to "
                    f"workers at idle" + (f", {block_ms:.1f} ms each" if block_ms else "") + ")"]
        rows = []
        for lv in page["levels"]:
            s, p, r = lv["serial"], lv["parallel"], lv["ratios"]
            rows.append([lv["concurrency"], s["rps"], p["rps"], _x(r["throughput"]), s["p50"], p["p50"],
                         _x(r["speedup_p50"]), s["p99"], p["p99"], _x(r["p99"]), _interval(r.get("p99_interval")),
                         f"{s['errors'] + s['non200']}/{p['errors'] + p['non200']}",
                         "MISS: " + "; ".join(lv["missed"]) if lv["missed"] else "ok"])
        out.append(table(["conc", "serial req/s", "parallel req/s", "par/ser req/s", "serial p50 ms", "parallel p50 ms",
                          "speed-up p50", "serial p99 ms", "parallel p99 ms", "par/ser p99", "p99 90% interval", "errors s/p",
                          "targets"], rows))
        met = sum(1 for lv in page["levels"] if not lv["missed"])
        out.append(f"targets met at {met} of {len(page['levels'])} levels")
        longer = [f"{lv['concurrency']} ({lv['slice_seconds']:.1f} s)" for lv in page["levels"]
                  if lv["slice_seconds"] > result["generator"]["slice_seconds"] and not bursts]
        if longer:
            out.append(f"slices lengthened at concurrency {', '.join(longer)}, for {MIN_ROUNDS} requests per connection each"
                       + (f" and {result['generator']['min_requests']} per mode" if result["generator"].get("min_requests") else ""))
        topped = [f"{lv['concurrency']} ({lv['extra_rounds']})" for lv in page["levels"] if lv.get("extra_rounds")]
        if topped:
            out.append(f"more slices per mode at concurrency {', '.join(topped)}: a mode had not finished "
                       f"{result['generator'].get('min_requests')} requests in the planned ones")
        least = result["generator"].get("min_requests") or 0
        short = [str(lv["concurrency"]) for lv in page["levels"] if not bursts
                 and min(lv[mode].get("requests", least) for mode in MODES) < least]
        if short:
            out.append(f"warning: at concurrency {', '.join(short)} a mode finished fewer than "
                       f"{result['generator']['min_requests']} requests even so: raise --max-slice for a surer p99")
        cpu = [lv for lv in page["levels"]
               if lv["serial"].get("node_cpu_ms_per_page") and lv["parallel"].get("node_cpu_ms_per_page")]
        if cpu:
            out.append("node CPU per page, all its processes, serial / parallel ms (CPUs kept busy): " + ", ".join(
                f"c={lv['concurrency']} {lv['serial']['node_cpu_ms_per_page']:.1f} / "
                f"{lv['parallel']['node_cpu_ms_per_page']:.1f} ({lv['serial']['node_cpus']:.2f} / "
                f"{lv['parallel']['node_cpus']:.2f})" for lv in cpu))
        noisy = [f"{lv['concurrency']} ({'; '.join(notes)})" for lv in page["levels"] if (notes := machine_notes(lv.get("machine")))]
        if noisy:
            out.append(f"warning: the machine, not the node, disturbed slices at concurrency {', '.join(noisy)}: steal "
                       "is CPU time the hypervisor gave to other guests; wrk times requests by the wall clock, so a "
                       "step of it or latencies adding up to more than the connections' time mean requests timed "
                       "wrong; run again before reading those levels")
        few = [str(lv["concurrency"]) for lv in page["levels"] if lv["rounds"] < MIN_ROUNDS / 2 and not bursts]
        if few:
            out.append(f"warning: at concurrency {', '.join(few)} a connection finished fewer than {MIN_ROUNDS // 2} "
                       "requests in some slice: too short for a steady state (and wrk drops the requests still "
                       "running at a slice's end, the slowest ones): raise --max-slice")
    speedups = ", ".join(f"{p['name']} {p['speedup_target']}x" for p in result["pages"] if p["speedup_target"])
    out += ["", f"targets: parallel req/s >= {TARGET_THROUGHPUT}x serial and p99 <= {TARGET_P99}x serial at every level"
                + (f"; p50 speed-up at concurrency 1 >= {speedups}" if speedups else "") + "; no errors"]
    if result.get("plot"):
        out.append(f"plot: {result['plot']}")
    out.append(f"reproduce: {result['reproduce']}")
    return "\n".join(out)


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio == ratio else "n/a"


def _interval(bounds: Sequence[float] | None) -> str:
    if not bounds or bounds[0] != bounds[0]:
        return "n/a"
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}x"


PLOT_COLORS = {"serial": "#f58518", "parallel": "#4c78a8"}


def line_chart(x: float, y: float, w: float, h: float, title: str, labels: Sequence[str],
               series: dict[str, Sequence[float]], colors: dict[str, str], marked: Sequence[bool] = ()) -> list[str]:
    """SVG elements of one line chart at (x, y): evenly spaced categories, y from 0, 5 grid lines.

    `marked[i]` rings the last series' point i in red (a missed target).
    """
    left, bottom, top = 48, 28, 22
    plot_w, plot_h = w - left - 12, h - bottom - top
    finite = [v for values in series.values() for v in values if v == v]
    tick = _nice_step((max(finite) if finite else 0.0) * 1.05 / 5)
    peak = tick * 5
    step = plot_w / max(1, len(labels) - 1) if len(labels) > 1 else 0.0

    def px(i: int) -> float:
        return x + left + (i * step if len(labels) > 1 else plot_w / 2)

    def py(v: float) -> float:
        return y + top + plot_h - plot_h * v / peak

    parts = [f'<text x="{x + left + plot_w / 2:.1f}" y="{y + 14:.1f}" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for i in range(6):
        value = tick * i
        gy = py(value)
        parts.append(f'<line x1="{x + left}" y1="{gy:.1f}" x2="{x + left + plot_w:.1f}" y2="{gy:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{x + left - 5}" y="{gy + 4:.1f}" text-anchor="end" font-size="10">{value:g}</text>')
    for i, label in enumerate(labels):
        parts.append(f'<text x="{px(i):.1f}" y="{y + top + plot_h + 14:.1f}" text-anchor="middle" font-size="10">{escape(label)}</text>')
    names = list(series)
    for name in names:
        points = [(px(i), py(v)) for i, v in enumerate(series[name]) if v == v]
        color = colors[name]
        if len(points) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in points]
    if names:
        for i, v in enumerate(series[names[-1]]):
            if i < len(marked) and marked[i] and v == v:
                parts.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="6" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    return parts


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least `raw`."""
    if not raw > 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def svg_plot(result: dict[str, Any]) -> str:
    """One column per page: requests/s on top, p99 below, against concurrency, both modes."""
    pages = result["pages"]
    col_w, chart_h, head = 330, 210, 56
    width, height = max(1, len(pages)) * col_w + 20, head + 2 * chart_h + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">{escape(result["title"])}</text>',
    ]
    for k, mode in enumerate(MODES):
        lx = 20 + k * 110
        parts.append(f'<line x1="{lx}" y1="38" x2="{lx + 22}" y2="38" stroke="{PLOT_COLORS[mode]}" stroke-width="2"/>')
        parts.append(f'<text x="{lx + 28}" y="42">{mode}</text>')
    parts.append('<circle cx="250" cy="38" r="6" fill="none" stroke="#d62728" stroke-width="1.5"/>'
                 '<text x="262" y="42">target missed</text>')
    for c, page in enumerate(pages):
        labels = [str(lv["concurrency"]) for lv in page["levels"]]
        marked = [bool(lv["missed"]) for lv in page["levels"]]
        for row, (metric, unit) in enumerate((("rps", "req/s"), ("p99", "p99 ms"))):
            series = {mode: [lv[mode][metric] for lv in page["levels"]] for mode in MODES}
            parts += line_chart(10 + c * col_w, head + row * chart_h, col_w, chart_h,
                                f"{page['name']}: {unit}", labels, series, PLOT_COLORS, marked)
        parts.append(f'<text x="{10 + c * col_w + col_w / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="11">'
                     f'concurrency ({escape(page["path"])})</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def default_plot_path() -> str:
    """docs/load.svg when run from the repository, else a file in the temp directory."""
    cwd = Path.cwd()
    if (cwd / "docs").is_dir() and (cwd / "parallel_render").is_dir():
        return str(cwd / "docs" / "load.svg")
    return os.path.join(tempfile.gettempdir(), f"parallel_bench_load_{os.getpid()}.svg")


# -- the command -----------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--url", default=None, help="base http:// URL of a running node (default: start one on a free port)")
    parser.add_argument("--pages", default="io,cpu,mixed", help="io, cpu, mixed or NAME=/path, comma-separated (default io,cpu,mixed)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels (default 1,2,4,8,16,32)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds each mode is measured per page and level (default 6)")
    parser.add_argument("--slices", type=int, default=3, help="slices per mode the duration is cut into, interleaved (default 3)")
    parser.add_argument("--max-slice", type=float, default=20.0,
                        help=f"longest slice, in seconds, when slow requests make the bench lengthen a level's slices "
                             f"(for {MIN_ROUNDS} requests per connection; default 20)")
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS,
                        help=f"lengthen a level's slices (up to --max-slice) until each mode is expected to finish this many "
                             f"requests, and add slices where one did not, for a p99 that rests on more than its slowest "
                             f"few (default {MIN_REQUESTS}; 0: off)")
    parser.add_argument("--lead-in", type=float, default=LEAD_IN,
                        help=f"seconds of each slice's own mode, not counted, right before it, so it starts on a node "
                             f"in that mode's steady state rather than one the settling left idle (default {LEAD_IN:g}; "
                             f"0: none; not for bursts)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per page and level, both modes (default 1)")
    parser.add_argument("--connections", choices=("close", "keep-alive"), default="close",
                        help="a new connection per request (close, as from a proxy), or one kept alive per client")
    parser.add_argument("--generator", choices=("auto", "wrk", "builtin", "burst"), default="auto",
                        help="wrk when installed (auto), or built-in threads; burst: each slice is one burst of "
                             "`concurrency` requests at once on a node that has settled (use --slices 30 or so)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take before it counts as an error (default 10)")
    parser.add_argument("--masters", type=int, default=None, help="passed to runparallel")
    parser.add_argument("--workers", type=int, default=None, help="passed to runparallel")
    parser.add_argument("--threads", type=int, default=None, help="passed to runparallel")
    parser.add_argument("--no-affinity", action="store_true", help="passed to runparallel")
    parser.add_argument("--plot", default=None, help="write the SVG here (default docs/load.svg in the repository, else a temp file)")
    parser.add_argument("--same-mode", action="store_true",
                        help="A/A: send the serial slices without the serial header too, so each ratio compares parallel "
                             "with parallel: how far two samples of one mode differ on this machine")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _reproduce(options: dict[str, Any], generator: str, plot: str) -> str:
    parts = ["python manage.py parallel_bench load", f"--pages {options['pages']}", f"--levels {options['levels']}",
             f"--duration {options['duration']:g}", f"--slices {options['slices']}", f"--warmup {options['warmup']:g}", f"--max-slice {options['max_slice']:g}",
             f"--min-requests {options['min_requests']}", f"--lead-in {options['lead_in']:g}",
             f"--generator {generator}", f"--connections {options['connections']}"]
    if options["url"]:
        parts.append(f"--url {options['url']}")
    if options["same_mode"]:
        parts.append("--same-mode")
    for name in ("masters", "workers", "threads"):
        if options[name]:
            parts.append(f"--{name} {options[name]}")
    if options["no_affinity"]:
        parts.append("--no-affinity")
    parts.append(f"--plot {plot}")
    return " ".join(parts)


def handle(options: dict[str, Any], stdout: Any) -> None:
    import orjson
    from django.conf import settings
    from django.core.management.base import CommandError


    try:
        pages, levels = parse_pages(options["pages"]), parse_levels(options["levels"])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    need_psutil("load")
    if (min(options["duration"], options["timeout"], options["max_slice"]) <= 0 or options["slices"] < 1
            or options["warmup"] < 0 or options["min_requests"] < 0 or options["lead_in"] < 0):
        raise CommandError("--duration, --timeout and --max-slice must be positive, --slices at least 1, --warmup, "
                           "--lead-in and --min-requests not negative")
    for name in ("masters", "workers", "threads"):
        if options[name] is not None and options[name] < 1:
            raise CommandError(f"--{name} must be at least 1")
    url = options["url"]
    if url and not url.startswith("http://"):
        raise CommandError("--url takes the http:// base URL of a running node, e.g. http://127.0.0.1:8000")
    if url and (options["masters"] or options["workers"] or options["threads"] or options["no_affinity"]):
        raise CommandError("--masters, --workers, --threads and --no-affinity shape the node the bench starts; "
                           "with --url the running node keeps its own")

    generator = options["generator"]
    wrk_binary = shutil.which("wrk")
    if generator == "wrk" and not wrk_binary:
        raise CommandError("wrk is not installed: `apt-get install -y wrk`, or use --generator builtin")
    if generator == "auto":
        generator = "wrk" if wrk_binary else "builtin"

    from parallel_render.testing import serial_request_headers

    (header,) = serial_request_headers()
    plot = options["plot"] or default_plot_path()
    json_out = options["json"]

    def log(line: str) -> None:
        (sys.stderr if json_out else stdout).write(line + ("\n" if json_out else ""))

    workdir = tempfile.mkdtemp(prefix="parallel-bench-load-")
    node: Node | None = None
    orphans: list[int] = []
    failed = True
    try:
        if generator == "wrk":
            assert wrk_binary is not None
            wrk = Wrk(wrk_binary, workdir, header, options["timeout"], options["connections"])
            slice_fn = wrk.slice
            threads = "a thread per connection" if options["lead_in"] > 0 else f"up to {wrk.threads_cap} threads"
            gen_desc = f"wrk {wrk_version(wrk_binary)} ({threads}, --timeout {options['timeout']:g}s)"
            slice_seconds = float(max(1, math.ceil(options["duration"] / options["slices"] - 1e-6)))
        elif generator == "burst":
            burst_headers: dict[str, dict[str, str]] = {"serial": {header: "serial"}, "parallel": {}}

            def slice_fn(u: str, c: int, s: float, mode: str) -> Slice:
                return burst_slice(u, c, burst_headers[mode], mode)

            gen_desc = "bursts (each slice: `concurrency` requests sent at once, a new connection each, to a node that has settled)"
            slice_seconds = 0.0
        else:
            headers = {"serial": {header: "serial"}, "parallel": {}}
            if options["connections"] == "close":
                headers = {mode: {**sent, "Connection": "close"} for mode, sent in headers.items()}

            def slice_fn(u: str, c: int, s: float, mode: str) -> Slice:
                return builtin_slice(u, c, s, headers[mode], mode)

            gen_desc = "built-in (a thread per connection)"
            slice_seconds = options["duration"] / options["slices"]
        if options["same_mode"]:
            # A/A: the "serial" slices go out as parallel ones too, so every ratio compares two
            # samples of one mode, measured as the bench measures the two.
            send = slice_fn

            def slice_fn(u: str, c: int, s: float, mode: str, **lead: Any) -> Slice:
                taken = send(u, c, s, "parallel", **lead)
                taken.mode = mode
                return taken

        node_info: dict[str, Any] = {"started": False}
        if url:
            base = url.rstrip("/")
            node_info.update(url=base, description=f"{base} (already running; its layout is its own)")
        else:
            args = []
            for name in ("masters", "workers", "threads"):
                if options[name]:
                    args += [f"--{name}", str(options[name])]
            if options["no_affinity"]:
                args.append("--no-affinity")
            if generator == "burst":  # a burst lasts as long as its slowest page, then the node settles
                log(f"starting a node (runparallel {' '.join(args)}); the run sends "
                    f"{len(pages) * len(levels) * 2 * options['slices']} bursts, each followed by a wait for the node to settle")
            else:
                lead = max(1.0, options["lead_in"]) if options["lead_in"] and generator == "wrk" else options["lead_in"]
                total = len(pages) * len(levels) * (2 * (slice_seconds + lead) * options["slices"] + options["warmup"])
                longest = len(pages) * len(levels) * (2 * (options["max_slice"] + lead) * options["slices"] + options["warmup"])
                log(f"starting a node (runparallel {' '.join(args)}); the run takes {total / 60:.1f} min or more"
                    + (f", up to {longest / 60:.0f} min where slow pages lengthen slices" if longest > total else ""))
            node = Node(args, workdir)
            base = node.url
            workers_by = time.monotonic() + WORKERS_WAIT

            def serving() -> bool:
                ok, worker_rendered = _serves(base + pages[0].path)
                if not ok or worker_rendered:
                    return True  # up; a page that fails is the preflight's to explain
                if time.monotonic() > workers_by:
                    log(f"warning: no block of {pages[0].path} came from a worker within {WORKERS_WAIT:.0f} s "
                        "(Server-Timing off, or the node renders them inline); measuring anyway")
                    return True
                return False

            node.wait_serving(serving)
            node_info = _describe_node(node, options)
        max_slice = max(options["max_slice"], slice_seconds)
        settle = settle_after(node.cpu_seconds if node is not None else None, max_slice)
        bench = LoadBench(base, pages, levels, options["duration"], options["slices"], options["warmup"], slice_fn, header, log,
                          max_slice=max_slice, whole_seconds=generator == "wrk", lead_within=generator == "wrk", settle=settle,
                          min_requests=options["min_requests"], bursts=generator == "burst", lead_in=options["lead_in"],
                          node_cpu=node.cpu_seconds if node is not None else None)
        results = bench.run()
        node_info["settled_seconds"] = round(bench.settled, 1)
        if node is not None:
            node_info["tree_at_end"] = {k: len(v) for k, v in node.tree().items()}
        failed = False
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if node is not None:
            orphans = node.stop()
            if failed:
                log(f"node log: {node.log_path}")
        if not failed or node is None:
            shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "title": f"{'/'.join(p.name for p in pages)} pages under load: {node_info.get('short', base)}, {generator}"
                 + (", A/A (both modes parallel)" if options["same_mode"] else ""),
        "node": {**node_info, "orphans": orphans, "pids": sorted(node.seen) if node else []},
        "generator": {"name": generator, "description": gen_desc, "slices": options["slices"],
                      "connections": options["connections"],
                      "slice_seconds": slice_seconds, "warmup": options["warmup"],
                      "min_requests": options["min_requests"], "same_mode": bool(options["same_mode"]),
                      "lead_in": 0.0 if generator == "burst" else options["lead_in"],
                      "lead_within": generator == "wrk"},
        "debug": bool(settings.DEBUG), "levels": levels, "pages": results, "plot": plot,
        "reproduce": _reproduce(options, generator, plot),
    }
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    with open(plot, "w") as f:
        f.write(svg_plot(result))
    if orphans:
        log(f"warning: {len(orphans)} processes of the node outlived it and were killed: {orphans}")
    if json_out:
        stdout.write(orjson.dumps(result).decode())
    else:
        stdout.write(format_result(result))


def settle_after(cpu_seconds: Callable[[], float] | None, max_wait: float,
                 window: float = 0.1, quiet_windows: int = 3, share: float = 0.03) -> Callable[[Slice], float]:
    """What the bench does after a slice: wait for the requests it left in flight.

    wrk stops at the end of its slice with a request in flight on every connection, and the node
    still serves them (those queued in gunicorn too): up to a whole round of the slowest
    requests. The wait ends when the node's processes (cpu_seconds: their CPU time so far) have
    used under `share` of a CPU in each of `quiet_windows` windows in a row, or after the
    slice's slowest request (plus a second, at most max_wait) has had time to run again. For a
    node the bench did not start (--url) it waits that long. Returns the seconds waited."""

    def settle(done: Slice) -> float:
        started = time.monotonic()
        longest = min(max(done.latencies_ms, default=0.0) / 1000 + 1.0, max_wait)
        if cpu_seconds is None:
            time.sleep(longest)
            return time.monotonic() - started
        quiet, before = 0, cpu_seconds()
        while quiet < quiet_windows and time.monotonic() - started < longest:
            time.sleep(window)
            now = cpu_seconds()
            quiet = quiet + 1 if now - before < share * window else 0
            before = now
        return time.monotonic() - started

    return settle


def _serves(url: str) -> tuple[bool, bool]:
    """Whether the page answers 200, and whether Server-Timing shows a block rendered by a worker."""
    status, _body, timing = _get(url, {}, timeout=10)
    return status == 200, bool(WORKER_BLOCK.search(timing))


def _describe_node(node: Node, options: dict[str, Any]) -> dict[str, Any]:
    from parallel_render import gunicorn_conf
    from parallel_render.node import NodeOptions, node_layout

    tree = node.tree()
    threads = options["threads"] or gunicorn_conf.threads
    layout = node_layout(options["masters"], NodeOptions(workers=options["workers"], affinity=not options["no_affinity"]))
    short = f"{len(tree['masters'])} masters x {threads} threads, {len(tree['workers'])} workers"
    return {
        "started": True, "url": node.url, "masters": len(tree["masters"]), "threads": threads,
        "workers": len(tree["workers"]), "routers": len(tree["router"]), "pinned": layout.pinned, "short": short,
        "description": f"runparallel at {node.url}: {short}, {len(tree['router'])} router (gthread masters)",
        "layout": " / ".join(layout.describe().splitlines()),
    }
