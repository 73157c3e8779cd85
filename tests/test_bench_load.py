"""`manage.py parallel_bench load`: a real node under load, both modes, the table's flags and the plot."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import psutil
import pytest

from parallel_render.bench import load
from parallel_render.bench.stats import ratio_interval

ROOT = Path(__file__).resolve().parent.parent
CLOCK_STEP_TOLERANCE_MS = 20.0  # how far the wall and monotonic clocks may part in 50 ms here

# wrk 4.1.0 against the demo's I/O page (serial mode, 2 connections, 1 s), with our script's done() line.
WRK_SAMPLE = """\
Running 1s test @ http://127.0.0.1:41047/bench/io/?blocks=6&ms=20
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   126.70ms    5.61ms 146.17ms   92.86%
    Req/Sec    16.25      5.18    20.00     62.50%
  Latency Distribution
     50%  125.26ms
     75%  125.42ms
     90%  125.76ms
     99%  146.17ms
  14 requests in 1.00s, 79.62KB read
Requests/sec:     13.98
Transfer/sec:     79.50KB
PARALLEL_BENCH_LOAD {"requests":14,"duration_us":1001595,"bytes":81536,"errors":{"connect":0,"read":0,"write":0,"status":0,"timeout":0},"p50_us":125258,"p90_us":125756,"p99_us":146167,"latency_us":[[124611,1],[124811,1],[124846,1],[125083,1],[125143,1],[125236,1],[125239,1],[125258,1],[125278,1],[125383,1],[125417,1],[125524,1],[125756,1],[146167,1]]}
"""


def test_wrk_output_is_parsed_into_a_slice():
    data = load.parse_wrk(WRK_SAMPLE)
    assert data["requests"] == 14
    got = load.wrk_result_slice(data, "serial")
    assert got.mode == "serial"
    assert got.ok == 14 and got.errors == 0 and got.non200 == 0
    assert got.seconds == pytest.approx(1.001595)
    assert len(got.latencies_ms) == 14
    assert min(got.latencies_ms) == pytest.approx(124.611)
    assert max(got.latencies_ms) == pytest.approx(146.167)
    # The merged histogram gives back wrk's own percentiles.
    stats = load.combine([got])
    assert stats["p50"] == pytest.approx(data["p50_us"] / 1000, abs=0.2)
    assert stats["p99"] == pytest.approx(data["p99_us"] / 1000)
    assert stats["rps"] == pytest.approx(13.98, abs=0.01)
    # Two connections for 1.0 s: 14 requests of ~127 ms fit in the 2 s they had.
    assert 0.85 < got.overtimed(2) < 1.0


def test_wrk_errors_and_repeated_latencies_are_counted():
    data = {"requests": 10, "duration_us": 2_000_000, "bytes": 0,
            "errors": {"connect": 1, "read": 0, "write": 0, "status": 3, "timeout": 2},
            "latency_us": [[1000, 4], [3000, 6]]}
    got = load.wrk_result_slice(data, "parallel")
    assert (got.ok, got.non200, got.errors) == (7, 3, 3)
    assert sorted(got.latencies_ms) == [1.0] * 4 + [3.0] * 6
    assert "status 3" in got.first_error


def test_wrk_output_without_our_line_is_an_error():
    with pytest.raises(ValueError, match="no result line"):
        load.parse_wrk(WRK_SAMPLE.split("PARALLEL_BENCH_LOAD")[0])


def test_pages_and_levels_are_parsed():
    io, custom = load.parse_pages("io=/bench/io/?blocks=8&ms=20, home=/")
    assert (io.name, io.blocks, io.speedup_target) == ("io", 8, 2.5)
    assert (custom.name, custom.path, custom.marker) == ("home", "/", "")
    assert [p.name for p in load.parse_pages("io,cpu,mixed")] == ["io", "cpu", "mixed"]
    with pytest.raises(ValueError, match="unknown page"):
        load.parse_pages("nope")
    assert load.parse_levels("1,2,4") == [1, 2, 4]
    with pytest.raises(ValueError):
        load.parse_levels("0,2")


def _mode(rps: float, p50: float, p99: float) -> dict:
    return {"rps": rps, "p50": p50, "p99": p99, "errors": 0, "non200": 0}


def test_missed_targets_are_flagged():
    io = load.parse_pages("io")[0]
    ratios, missed = load.judge(io, 1, _mode(10, 100, 120), _mode(40, 25, 30))
    assert missed == [] and ratios["speedup_p50"] == pytest.approx(4.0)
    _, missed = load.judge(io, 1, _mode(10, 100, 120), _mode(12, 50, 60))
    assert missed == ["speed-up 2.00x < 2.5x"]
    # Above concurrency 1 only throughput and p99 count.
    _, missed = load.judge(io, 8, _mode(50, 150, 200), _mode(45, 150, 220))
    assert missed == ["req/s 0.90x < 0.95x", "p99 1.10x > 1.05x"]
    _, missed = load.judge(io, 8, _mode(50, 150, 200), {**_mode(50, 150, 200), "non200": 1})
    assert missed == ["errors"]


def test_slices_grow_with_the_expected_latency():
    bench = load.LoadBench("http://127.0.0.1:1", [], [1], duration=6, slices=3, warmup=0, slice_fn=None,
                           serial_header="X-Parallel-Render", max_slice=10)
    idle = {"ms": {"serial": 200.0, "parallel": 50.0}}
    assert bench.slice_seconds(1, idle, None) == 2.0  # 4 x 0.2 s is less than 6 s / 3
    previous = {"serial": {"rps": 20.0}, "parallel": {"rps": 40.0}, "slice_seconds": 2.0}
    # Little's law: 16 connections at 20 req/s wait 0.8 s each; 4 rounds of that.
    assert bench.slice_seconds(16, idle, previous) == pytest.approx(3.2)
    assert bench.slice_seconds(64, idle, previous) == 10  # capped by --max-slice
    bench.whole_seconds = True  # wrk
    assert bench.slice_seconds(16, idle, previous) == 4.0
    stalled = {**previous, "serial": {"rps": 0.0}}
    assert bench.slice_seconds(2, idle, stalled) == 10  # nothing finished: as long as allowed


def test_slices_grow_until_the_slower_mode_finishes_min_requests():
    bench = load.LoadBench("http://127.0.0.1:1", [], [1], duration=6, slices=3, warmup=0, slice_fn=None,
                           serial_header="X-Parallel-Render", max_slice=100, min_requests=600)
    idle = {"ms": {"serial": 200.0, "parallel": 50.0}}
    # One connection, 200 ms a request: 5 req/s in the slower mode, so 600 take 120 s in 3 slices.
    assert bench.slice_seconds(1, idle, None) == pytest.approx(40.0)
    # The node served 20 req/s serially at the previous level: no more with more connections.
    previous = {"serial": {"rps": 20.0}, "parallel": {"rps": 40.0}, "slice_seconds": 2.0}
    assert bench.slice_seconds(16, idle, previous) == pytest.approx(10.0)
    bench.max_slice = 8
    assert bench.slice_seconds(16, idle, previous) == 8  # still capped by --max-slice
    bench.min_requests = 0
    assert bench.slice_seconds(16, idle, previous) == pytest.approx(3.2)  # as without it


def test_a_mode_short_of_min_requests_gets_more_slices_interleaved(monkeypatch):
    # The first level has no previous one: its slices were planned from the idle GETs, and the
    # node served fewer pages than they promised. More slices, one per mode, until both modes
    # have min_requests at the rate they served, no more than `slices` more rounds.
    rate = {"serial": 36.0, "parallel": 30.0}  # requests per second at this level
    ran: list[tuple[str, float]] = []

    def slice_fn(url, concurrency, seconds, mode):
        ran.append((mode, seconds))
        n = int(rate[mode] * seconds)
        return load.Slice(mode, seconds, ok=n, latencies_ms=[100.0] * n)

    check = {"ok": True, "problems": [], "ms": {"serial": 30.0, "parallel": 30.0}}
    monkeypatch.setattr(load, "check_page", lambda *a, **k: check)
    bench = load.LoadBench("http://127.0.0.1:1", [], [4], duration=6, slices=3, warmup=0, slice_fn=slice_fn,
                           serial_header="X-Parallel-Render", max_slice=20, whole_seconds=True, min_requests=600)
    io = load.parse_pages("io")[0]
    level = bench.level(io, 4, 0)
    planned = level["slice_seconds"]
    assert planned == 2.0  # 4 connections at 30 ms each promised 133 req/s: 600 in 4.5 s
    assert level["extra_rounds"] >= 1
    assert level["serial"]["requests"] >= 600 and level["parallel"]["requests"] >= 600
    modes = [mode for mode, _ in ran]
    assert modes.count("serial") == modes.count("parallel") == 3 + level["extra_rounds"]
    # Each round is a serial and a parallel slice of one length, the order alternating.
    rounds = [ran[k:k + 2] for k in range(0, len(ran), 2)]
    assert all({a[0], b[0]} == {"serial", "parallel"} and a[1] == b[1] for a, b in rounds)
    assert [r[0][0] for r in rounds[:4]] == ["serial", "parallel", "serial", "parallel"]
    assert all(seconds == int(seconds) for _, seconds in ran)  # wrk takes whole seconds

    ran.clear()
    bench.max_slice = 2  # capped: at most `slices` more rounds, and the table says it fell short
    level = bench.level(io, 4, 1)
    assert level["extra_rounds"] == 3 and len(ran) == 12
    assert level["parallel"]["requests"] < 600
    result = {"node": {"description": "a node"}, "pages": [{"name": "io", "path": io.path, "speedup_target": None,
                                                           "levels": [{**level, "ratios": {**level["ratios"]}}]}],
              "generator": {"description": "wrk", "slices": 3, "slice_seconds": 2.0, "warmup": 0, "connections": "close",
                            "min_requests": 600},
              "reproduce": "python manage.py parallel_bench load"}
    text = load.format_result(result)
    assert "more slices per mode at concurrency 4 (3)" in text
    assert "warning: at concurrency 4 a mode finished fewer than 600 requests even so" in text

    ran.clear()
    bench.min_requests = 0  # no minimum: the planned slices only
    assert bench.level(io, 4, 0)["extra_rounds"] == 0 and len(ran) == 6


def test_each_slice_follows_an_uncounted_lead_in_of_its_own_mode(monkeypatch):
    ran: list[tuple[str, float]] = []

    def slice_fn(url, concurrency, seconds, mode):
        ran.append((mode, seconds))
        n = int(10 * seconds)
        return load.Slice(mode, seconds, ok=n, latencies_ms=[1000.0 if seconds == 1.0 else 50.0] * n)

    check = {"ok": True, "problems": [], "ms": {"serial": 30.0, "parallel": 30.0}}
    monkeypatch.setattr(load, "check_page", lambda *a, **k: check)
    bench = load.LoadBench("http://127.0.0.1:1", [], [4], duration=6, slices=2, warmup=0, slice_fn=slice_fn,
                           serial_header="X-Parallel-Render", lead_in=1.0)
    level = bench.level(load.parse_pages("io")[0], 4, 0)
    assert ran == [("serial", 1.0), ("serial", 3.0), ("parallel", 1.0), ("parallel", 3.0),
                   ("parallel", 1.0), ("parallel", 3.0), ("serial", 1.0), ("serial", 3.0)]
    assert level["serial"]["requests"] == level["parallel"]["requests"] == 60  # the lead-ins' are not counted
    assert level["serial"]["p99"] == level["parallel"]["p99"] == 50.0
    bursts = load.LoadBench("http://127.0.0.1:1", [], [4], duration=6, slices=2, warmup=0, slice_fn=slice_fn,
                            serial_header="X-Parallel-Render", lead_in=1.0, bursts=True)
    assert bursts.lead_in == 0.0  # a burst is measured from a settled node


def test_with_wrk_the_lead_in_and_the_slice_are_one_run_on_the_same_connections(monkeypatch):
    """Two runs left the lead-in's requests in the node as the slice began with as many again;
    in one run the connections go on, and the readings are taken where counting begins."""
    calls: list[tuple[str, float, float]] = []
    cpu = iter([10.0, 12.5, 20.0, 21.0, 30.0, 33.0, 40.0, 41.0])

    def slice_fn(url, concurrency, seconds, mode, lead_in=0.0, counting=None):
        calls.append((mode, seconds, lead_in))
        assert counting is not None
        counting()  # wrk calls it lead_in seconds into the run
        return load.Slice(mode, seconds, ok=30, latencies_ms=[50.0] * 30)

    check = {"ok": True, "problems": [], "ms": {"serial": 30.0, "parallel": 30.0}}
    monkeypatch.setattr(load, "check_page", lambda *a, **k: check)
    bench = load.LoadBench("http://127.0.0.1:1", [], [4], duration=6, slices=2, warmup=0, slice_fn=slice_fn,
                           serial_header="X-Parallel-Render", lead_in=1.0, lead_within=True,
                           node_cpu=lambda: next(cpu))
    level = bench.level(load.parse_pages("io")[0], 4, 0)
    assert calls == [("serial", 3.0, 1.0), ("parallel", 3.0, 1.0), ("parallel", 3.0, 1.0), ("serial", 3.0, 1.0)]
    assert level["serial"]["requests"] == level["parallel"]["requests"] == 60
    # CPU from where counting began to the run's end: serial 2.5 + 1.0 s, parallel 1.0 + 3.0 s.
    assert level["serial"]["node_cpu_ms_per_page"] == pytest.approx(3500 / 60)
    assert level["parallel"]["node_cpu_ms_per_page"] == pytest.approx(4000 / 60)


class _SlowAtFirst:
    """A local HTTP server whose answers take 150 ms for the requests that arrive in the first
    0.8 s after its first one, then 5 ms; it notes each request's headers."""

    def __init__(self) -> None:
        import http.server
        import threading

        first: list[float] = []
        seen: list[dict[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                now = time.monotonic()
                if not first:
                    first.append(now)
                seen.append(dict(self.headers))
                time.sleep(0.15 if now - first[0] < 0.8 else 0.005)
                body = b"ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)")
def test_wrk_counts_only_the_requests_sent_after_the_lead_in(tmp_path):
    server = _SlowAtFirst()
    try:
        wrk = load.Wrk(shutil.which("wrk"), str(tmp_path), "X-Parallel-Render", 5.0)
        began = time.monotonic()
        counting_at: list[float] = []
        got = wrk.slice(server.url, 2, 2.0, "serial", lead_in=1.0, counting=lambda: counting_at.append(time.monotonic()))
    finally:
        server.close()
    assert len(counting_at) == 1 and 0.95 <= counting_at[0] - began <= 1.5
    assert got.seconds == pytest.approx(2.0, abs=0.1)  # the counted part of the 3 s run
    # The slow answers all went to requests sent in the lead-in: none is counted.
    assert got.ok > 20 and got.errors == 0 and got.non200 == 0
    assert max(got.latencies_ms) < 100
    # Answers count from the lead-in's end, latencies from the requests sent after it.
    assert 0 < len(got.latencies_ms) <= got.ok
    assert len(server.seen) > got.ok  # the lead-in's requests reached the server too
    assert all(h.get("X-Parallel-Render") == "serial" and h.get("Connection") == "close" for h in server.seen)
    # Two connections for 2 s, each waiting for its answer.
    assert 0.0 < got.overtimed(2) <= 1.0


def test_the_table_warns_where_the_machine_disturbed_a_slice(monkeypatch):
    # A machine where the hypervisor takes a fifth of a CPU during serial slices, and the wall
    # clock jumps 6 s ahead during one parallel slice: wrk, which times requests by it, then
    # reports its two requests in flight as 6 s ones, more than the slice's connections had.
    clock = {"wall": 1000.0, "mono": 50.0, "steal": 7.0}
    parallel_slices = 0

    def slice_fn(url, concurrency, seconds, mode):
        nonlocal parallel_slices
        clock["mono"] += seconds
        clock["wall"] += seconds
        n = int(10 * seconds)
        latencies = [200.0] * n
        if mode == "serial":
            if clock["steal"] is not None:
                clock["steal"] += 0.2 * seconds
        else:
            parallel_slices += 1
            if parallel_slices == 2:
                clock["wall"] += 6.0
                latencies[-2:] = [6100.0, 6150.0]
        return load.Slice(mode, seconds, ok=n, latencies_ms=latencies)

    check = {"ok": True, "problems": [], "ms": {"serial": 30.0, "parallel": 30.0}}
    monkeypatch.setattr(load, "check_page", lambda *a, **k: check)
    monkeypatch.setattr(load, "machine_mark", lambda: (clock["wall"], clock["mono"], clock["steal"]))
    logged: list[str] = []
    bench = load.LoadBench("http://127.0.0.1:1", [], [2], duration=6, slices=2, warmup=0, slice_fn=slice_fn,
                           serial_header="X-Parallel-Render", log=logged.append)
    io = load.parse_pages("io")[0]
    level = bench.level(io, 2, 0)
    machine = level["machine"]
    assert machine["steal_share"] == pytest.approx(0.2) and machine["steal_mode"] == "serial"
    assert machine["clock_step_ms"] == pytest.approx(6000.0) and machine["clock_step_mode"] == "parallel"
    assert machine["overtimed"] > 1.5 and machine["overtimed_mode"] == "parallel"
    steps = [s["clock_step_ms"] for s in level["parallel"]["slices"]]
    assert steps == [pytest.approx(0.0), pytest.approx(6000.0)]
    assert "[machine: steal 20% of a CPU in a serial slice; wall clock stepped +6000 ms" in logged[-1]
    result = {"node": {"description": "a node"}, "pages": [{"name": "io", "path": io.path, "speedup_target": None,
                                                           "levels": [level]}],
              "generator": {"description": "wrk", "slices": 2, "slice_seconds": 3.0, "warmup": 0, "connections": "close"},
              "reproduce": "python manage.py parallel_bench load"}
    text = load.format_result(result)
    assert "warning: the machine, not the node, disturbed slices at concurrency 2 (steal 20% of a CPU" in text
    assert "latencies of a parallel slice add up to" in text

    # A quiet machine: nothing to warn of, and the real counters read so.
    clock["steal"] = None
    quiet = bench.level(io, 2, 1)
    assert quiet["machine"]["steal_share"] is None and not load.machine_notes(quiet["machine"])
    assert "disturbed" not in load.format_result({**result, "pages": [{**result["pages"][0], "levels": [quiet]}]})
    monkeypatch.undo()
    mark = load.machine_mark()
    time.sleep(0.05)
    stolen, step = load.machine_since(mark)
    assert abs(step) < CLOCK_STEP_TOLERANCE_MS
    assert stolen is None or stolen >= 0


def test_each_mode_gets_the_node_cpu_its_slices_used_per_page(monkeypatch):
    # A node whose processes use 60 ms of CPU per serial page and 66 per parallel one, and
    # some more between slices (lead-ins, settling), which is not counted.
    used = {"cpu": 0.0}
    per_page = {"serial": 0.060, "parallel": 0.066}

    def slice_fn(url, concurrency, seconds, mode):
        n = int(20 * seconds)
        used["cpu"] += n * per_page[mode]
        return load.Slice(mode, seconds, ok=n, latencies_ms=[100.0] * n)

    def node_cpu():
        used["cpu"] += 0.5  # between slices
        return used["cpu"]

    check = {"ok": True, "problems": [], "ms": {"serial": 30.0, "parallel": 30.0}}
    monkeypatch.setattr(load, "check_page", lambda *a, **k: check)
    bench = load.LoadBench("http://127.0.0.1:1", [], [2], duration=6, slices=2, warmup=0, slice_fn=slice_fn,
                           serial_header="X-Parallel-Render", lead_in=1.0, node_cpu=node_cpu)
    io = load.parse_pages("io")[0]
    level = bench.level(io, 2, 0)
    # Each read adds 0.5 s: one read between the two around a slice counts it.
    assert level["serial"]["node_cpu_ms_per_page"] == pytest.approx(60.0 + 500 / 60)
    assert level["parallel"]["node_cpu_ms_per_page"] == pytest.approx(66.0 + 500 / 60)
    assert level["serial"]["node_cpus"] == pytest.approx((60 * 0.060 + 0.5) / 3)
    assert level["ratios"]["node_cpu_per_page"] == pytest.approx((66.0 + 500 / 60) / (60.0 + 500 / 60))
    result = {"node": {"description": "a node"}, "pages": [{"name": "io", "path": io.path, "speedup_target": None,
                                                           "levels": [level]}],
              "generator": {"description": "wrk", "slices": 2, "slice_seconds": 3.0, "warmup": 0, "connections": "close"},
              "reproduce": "python manage.py parallel_bench load"}
    assert "node CPU per page, all its processes, serial / parallel ms (CPUs kept busy): c=2 68.3 / 74.3" in (
        load.format_result(result))
    # Against a node the bench did not start (--url), there is no such line.
    bench.node_cpu = None
    other = bench.level(io, 2, 1)
    assert other["serial"]["node_cpu_ms_per_page"] is None and "node_cpu_per_page" not in other["ratios"]
    assert "node CPU per page" not in load.format_result({**result, "pages": [{**result["pages"][0], "levels": [other]}]})


def test_the_p99_ratio_comes_with_a_bootstrap_interval():
    draw = random.Random(7)
    same = [draw.expovariate(1 / 100) for _ in range(600)], [draw.expovariate(1 / 100) for _ in range(600)]
    low, high = ratio_interval(*same)
    assert low < 1.0 < high  # one distribution: the interval holds 1
    assert high - low > 0.1  # and 600 requests a mode cannot pin a p99 ratio to within 5 %
    slower = [2 * ms for ms in same[0]]
    low, high = ratio_interval(slower, same[1])
    assert 1.0 < low < 2.0 < high < 3.0
    nan = ratio_interval([], same[1])
    assert nan[0] != nan[0]


def test_the_table_gives_each_p99_ratio_its_interval():
    mixed = load.parse_pages("mixed")[0]
    serial, parallel = _mode(20, 300, 600), _mode(19, 320, 690)
    ratios, missed = load.judge(mixed, 8, serial, parallel)
    ratios["p99_interval"] = [0.97, 1.31]
    level = {"concurrency": 8, "slice_seconds": 10.0, "rounds": 25, "serial": serial, "parallel": parallel,
             "ratios": ratios, "missed": missed, "check": {"blocks": 17, "offloaded": 14, "block_ms_p50": 20.0}}
    result = {"node": {"description": "a node"}, "pages": [{"name": "mixed", "path": mixed.path, "speedup_target": None,
                                                           "levels": [level]}],
              "generator": {"description": "wrk", "slices": 3, "slice_seconds": 2.0, "warmup": 1, "connections": "close",
                            "min_requests": 600},
              "reproduce": "python manage.py parallel_bench load"}
    text = load.format_result(result)
    lines = text.split("\n")
    at = next(n for n, line in enumerate(lines) if line.startswith("| conc"))
    header, row = lines[at], lines[at + 2]
    assert "p99 90% interval" in header
    assert "1.15x" in row and "0.97-1.31x" in row and "MISS: p99 1.15x > 1.05x" in row
    assert "for 4 requests per connection each and 600 per mode" in text


def test_a_mode_that_completed_nothing_is_flagged_not_divided_by():
    io = load.parse_pages("io")[0]
    ratios, missed = load.judge(io, 32, {**_mode(0, float("nan"), float("nan"))}, _mode(30, 500, 900))
    assert missed == ["no serial request completed"]
    assert ratios["throughput"] != ratios["throughput"]  # nan, shown as n/a


def test_after_a_slice_the_bench_waits_until_the_node_is_quiet():
    # A node still busy with the slice's requests for 5 windows, then idle: the wait ends after
    # 3 quiet windows in a row, well before the slowest request could have run again.
    used = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.5] + [0.5] * 100)
    settle = load.settle_after(lambda: next(used), max_wait=10.0, window=0.01)
    waited = settle(load.Slice("serial", 1.0, ok=1, latencies_ms=[5000.0]))
    assert 0.07 <= waited < 1.0, waited


def test_the_wait_is_bounded_by_the_slowest_request_and_without_a_node_is_that_long():
    busy = iter(float(k) for k in range(10_000))  # never quiet
    settle = load.settle_after(lambda: next(busy), max_wait=10.0, window=0.01)
    waited = settle(load.Slice("parallel", 1.0, ok=1, latencies_ms=[50.0]))
    assert 1.0 <= waited < 1.5, waited  # the slowest request (0.05 s) plus a second
    assert 0.2 <= load.settle_after(None, max_wait=0.2)(load.Slice("serial", 1.0, latencies_ms=[900.0])) < 0.5


def _run_bench(tmp_path: Path, *args: str) -> dict:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="demo_site.settings", DEMO_DEBUG="0",
               DEMO_DB_PATH=str(tmp_path / "demo.sqlite3"), PYTHONPATH=str(ROOT))
    env.pop("PARALLEL_RENDER_ROUTER", None)
    done = subprocess.run(
        [sys.executable, "manage.py", "parallel_bench", "load", "--json", "--plot", str(tmp_path / "load.svg"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = orjson.loads(done.stdout)
    result["log"] = done.stderr  # the progress lines (--json sends them to stderr)
    return result


def _check_run(result: dict, tmp_path: Path, pages: list[str], levels: list[int]) -> None:
    assert [p["name"] for p in result["pages"]] == pages
    for page in result["pages"]:
        assert [lv["concurrency"] for lv in page["levels"]] == levels
        for lv in page["levels"]:
            assert lv["check"]["ok"], lv["check"]
            assert lv["check"]["offloaded"] > 0  # the parallel page really went through the workers
            for mode in ("serial", "parallel"):
                assert lv[mode]["rps"] > 0, (page["name"], lv)
                assert lv[mode]["errors"] == 0 and lv[mode]["non200"] == 0, lv[mode]["first_error"]
                # The node's CPU per page: a page costs its master at least a millisecond or so,
                # and no page here takes a whole CPU-second.
                assert 0.3 < lv[mode]["node_cpu_ms_per_page"] < 1000, lv[mode]
                assert 0 < lv[mode]["node_cpus"] < 64
    node = result["node"]
    assert node["started"] and node["workers"] >= 1 and node["masters"] >= 1 and node["routers"] == 1
    assert node["orphans"] == []
    alive = [pid for pid in node["pids"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "processes of the node outlived the bench"
    svg = ET.parse(tmp_path / "load.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    # Two charts per page (req/s and p99), each with a line per mode.
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2 * 2 * len(pages)


def test_a_short_run_with_the_builtin_generator(tmp_path):
    result = _run_bench(tmp_path, "--generator", "builtin", "--pages", "io,cpu", "--levels", "1,2",
                        "--duration", "0.6", "--slices", "2", "--warmup", "0.2", "--max-slice", "0.5", "--lead-in", "0.2")
    assert result["generator"]["name"] == "builtin"
    _check_run(result, tmp_path, ["io", "cpu"], [1, 2])
    assert "--lead-in 0.2" in result["reproduce"]
    assert "each slice after a 0.2 s lead-in of its own mode" in load.format_result(result)


def test_a_short_run_of_bursts(tmp_path):
    # Each slice is one burst of `concurrency` requests sent together to a settled node.
    result = _run_bench(tmp_path, "--generator", "burst", "--pages", "io", "--levels", "1,3", "--slices", "2",
                        "--warmup", "0")
    assert result["generator"]["name"] == "burst"
    _check_run(result, tmp_path, ["io"], [1, 3])
    for lv in result["pages"][0]["levels"]:
        for mode in ("serial", "parallel"):
            assert lv[mode]["requests"] == 2 * lv["concurrency"]
            assert [round(s["rps"] * s["seconds"]) for s in lv[mode]["slices"]] == [lv["concurrency"]] * 2
    assert result["node"]["settled_seconds"] > 0  # the node settled before each burst
    assert "the run sends 8 bursts" in result["log"] and "io c=3: 2 bursts per mode:" in result["log"]
    assert "before each burst the bench waited for the node to settle" in load.format_result(result)


def test_an_a_a_run_measures_parallel_against_parallel(tmp_path):
    # --same-mode: the "serial" slices go out without the serial header, so both columns are
    # the parallel page (6 blocks of 20 ms: about 25 ms, where serially it takes 125).
    result = _run_bench(tmp_path, "--generator", "builtin", "--pages", "io", "--levels", "1", "--same-mode",
                        "--duration", "1", "--slices", "2", "--warmup", "0.2", "--max-slice", "1", "--min-requests", "0",
                        "--lead-in", "0.2")
    assert result["generator"]["same_mode"] is True
    level = result["pages"][0]["levels"][0]
    assert level["serial"]["p50"] < 70 and level["parallel"]["p50"] < 70, level
    assert 0.5 < level["ratios"]["speedup_p50"] < 2.0
    assert level["check"]["ok"] and level["check"]["offloaded"] > 0  # the check still compares the two modes
    text = load.format_result(result)
    assert "A/A (--same-mode)" in text and "--same-mode" in result["reproduce"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)")
def test_a_short_run_with_wrk(tmp_path):
    result = _run_bench(tmp_path, "--generator", "wrk", "--pages", "io", "--levels", "1,2",
                        "--duration", "1", "--slices", "1", "--warmup", "0", "--max-slice", "1")
    assert result["generator"]["name"] == "wrk"
    _check_run(result, tmp_path, ["io"], [1, 2])
    assert result["node"]["settled_seconds"] >= 0


def test_a_killed_bench_leaves_no_node_behind(tmp_path):
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="demo_site.settings", DEMO_DEBUG="0",
               DEMO_DB_PATH=str(tmp_path / "demo.sqlite3"), PYTHONPATH=str(ROOT))
    env.pop("PARALLEL_RENDER_ROUTER", None)
    bench = subprocess.Popen(
        [sys.executable, "manage.py", "parallel_bench", "load", "--generator", "builtin", "--pages", "io",
         "--levels", "1", "--duration", "60", "--plot", str(tmp_path / "load.svg")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        tree: list[psutil.Process] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the node, its router, workers and masters
            tree = psutil.Process(bench.pid).children(recursive=True)
            if any("fastrouter" in " ".join(p.cmdline()) for p in tree if p.is_running()):
                break
            time.sleep(0.2)
        assert tree, "the bench started no node"
    finally:
        bench.kill()  # no chance to stop its node itself
        bench.wait()
    _gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"outlived the killed bench: {[p.cmdline() for p in alive]}"
