"""Prometheus metrics for parallel_render: `pip install "parallel_render[metrics]"` (prometheus_client).

Add "parallel_render.metrics" to INSTALLED_APPS: every process of the site (masters, and
workers for the blocks nested in theirs) then counts its blocks from the block_finished
signal. Serve them through `parallel_render.metrics.views.metrics` in the site's urls, or on
a port of their own from a node (PARALLEL_RENDER["METRICS_PORT"]). A scrape also asks the
router for its STATS, so queue depth, idle workers and queue and service percentiles are read
at that moment. docs/metrics.md lists every metric.

Under a node (several processes), the node gives every process one PROMETHEUS_MULTIPROC_DIR in
its private directory; a scrape adds up the files of all of them (prometheus_client's
multiprocess mode), and the node removes a process's live gauges when it exits.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - the message is the feature
    raise ImportError(
        "parallel_render.metrics needs prometheus_client: pip install \"parallel_render[metrics]\" "
        "(or pip install prometheus_client)"
    ) from exc

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from parallel_render import signals

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Blocks are mostly short: from a tenth of a millisecond to the default 10 s timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

BLOCKS = Counter(
    "parallel_render_blocks", "{% parallel %} blocks rendered, by what became of them",
    ["outcome", "template"],
)
RENDER = Histogram(
    "parallel_render_block_render_seconds",
    "A block's own render: by its worker (sent), or by the master (inline, rescued, fallback)",
    ["outcome", "template"], buckets=BUCKETS,
)
QUEUE = Histogram(
    "parallel_render_block_queue_seconds",
    "For a block a worker rendered: submit to answer, less the worker's render (the router's queue and the trip)",
    ["template"], buckets=BUCKETS,
)
WORKER_BUSY = Counter(
    "parallel_render_worker_busy_seconds",
    "Time each worker slot spent rendering blocks that came back to a master: its rate is the slot's utilisation",
    ["worker"],
)


# (outcome, template) -> its labelled children: labels() takes a lock and builds a key each call.
_children: dict[tuple[str, str | None], tuple[Any, Any, Any]] = {}


def record_block(sender: Any, record: signals.BlockRecord, **kwargs: Any) -> None:
    """block_finished receiver: count the block, and its times."""
    key = (record.outcome, record.template)
    found = _children.get(key)
    if found is None:
        template = record.template or "<string>"
        found = _children[key] = (BLOCKS.labels(record.outcome, template), RENDER.labels(record.outcome, template),
                                  QUEUE.labels(template) if record.outcome == "sent" else None)
    blocks, render, queue = found
    blocks.inc()
    if record.render_ms is not None:
        render.observe(record.render_ms / 1000)
    if queue is not None:
        if record.queue_ms is not None:
            queue.observe(record.queue_ms / 1000)
        if record.pid is not None and record.render_ms is not None:
            # By the node's slot, which outlives the worker that fills it: labelled by pid, every
            # recycled worker would leave a series behind in every master. A worker the node did
            # not start has no slot, and is named by its pid.
            worker = str(record.worker_slot) if record.worker_slot is not None else f"pid {record.pid}"
            WORKER_BUSY.labels(worker).inc(record.render_ms / 1000)


def install() -> None:
    """Count this process's blocks (the metrics app's ready() calls this)."""
    signals.block_finished.connect(record_block, dispatch_uid="parallel_render.metrics.record_block")


# STATS keys that only grow (exported as counters, `_total`), and those that are a state now.
ROUTER_COUNTERS = {
    "submitted": "jobs submitted (including those answered busy or error)",
    "completed": "jobs answered with a worker's result",
    "errors": "jobs answered ERROR",
    "timeouts": "jobs answered TIMEOUT",
    "busy": "jobs answered BUSY (queue full, or no idle worker for a nested block)",
    "cancelled": "jobs cancelled by their master",
    "withdrawn": "queued jobs taken back by their master",
    "dropped": "queued jobs dropped with their master, and results discarded",
    "protocol_errors": "PROTOCOL_ERROR answers sent",
}
ROUTER_GAUGES = {
    "queued": "jobs waiting in the router's queue",
    "queued_bytes": "bytes of the jobs waiting in the queue",
    "in_flight": "jobs a worker holds whose answer is owed",
    "workers_idle": "workers waiting for a job",
    "workers_busy": "workers rendering a job",
    "workers": "connected workers",
    "masters": "connected masters",
}
ROUTER_SECONDS = {
    "queue_wait_p50_us": ("queue_wait_seconds", "0.5", "SUBMIT received to JOB handed to a worker"),
    "queue_wait_p99_us": ("queue_wait_seconds", "0.99", "SUBMIT received to JOB handed to a worker"),
    "service_p50_us": ("service_seconds", "0.5", "JOB handed to a worker to its RESULT"),
    "service_p99_us": ("service_seconds", "0.99", "JOB handed to a worker to its RESULT"),
}


class RouterCollector(Collector):
    """The router's STATS, asked for at scrape time (fastrouter/PROTOCOL.md, "Stats")."""

    def __init__(self, address: str | None = None, timeout: float = 1.0) -> None:
        self.address = address
        self.timeout = timeout

    def collect(self) -> Any:
        from parallel_render import conf
        from parallel_render.client import RouterClient

        address = self.address or conf.get_config()["ROUTER"]
        up = GaugeMetricFamily("parallel_render_router_up", "1 when the router answered STATS at this scrape")
        stats: dict[str, Any] = {}
        if address:
            client = RouterClient(address)
            try:
                stats = client.stats(self.timeout)
            except Exception:  # a router that is down is what `up` says
                stats = {}
            finally:
                client.close()
        up.add_metric([], 1.0 if stats else 0.0)
        yield up
        if not stats:
            return
        for key, text in ROUTER_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(f"parallel_render_router_{key}", f"Router: {text}", value=float(stats[key]))
        for key, text in ROUTER_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"parallel_render_router_{key}", f"Router: {text}", value=float(stats[key]))
        families: dict[str, GaugeMetricFamily] = {}
        for key, (name, quantile, text) in ROUTER_SECONDS.items():
            if key not in stats:
                continue
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(
                    f"parallel_render_router_{name}", f"Router: {text}, percentile since it started (within 1/16)",
                    labels=["quantile"])
            family.add_metric([quantile], stats[key] / 1e6)
        yield from families.values()


def registry(router: str | None = None) -> CollectorRegistry:
    """What one scrape reports: every process's blocks (all of the node's, in multiprocess mode)
    and the router's STATS, read now."""
    from prometheus_client import REGISTRY

    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        found = CollectorRegistry()
        multiprocess.MultiProcessCollector(found)
    else:
        found = CollectorRegistry()
        found.register(_Forward(REGISTRY))
    found.register(RouterCollector(router))
    return found


class _Forward(Collector):
    """This process's own metrics (one process, no multiprocess directory)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Any:
        return self.source.collect()


def exposition(router: str | None = None, accept: str | None = None) -> tuple[bytes, str]:
    """The scrape's body and content type."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry(router)), content_type


def process_exited(pid: int, directory: str | None = None) -> None:
    """Forget an exited process's live gauges (the node calls this for masters and workers)."""
    directory = directory or os.environ.get(MULTIPROC_ENV)
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
