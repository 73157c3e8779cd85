"""OpenTelemetry spans for {% parallel %} blocks: the [otel] extra (docs/tracing.md).

On with PARALLEL_RENDER["OTEL"] = True and opentelemetry-api installed. Until then nothing
here imports opentelemetry, no receiver is connected and a block costs one dict lookup.

In the master (and in a worker, for the blocks nested in the one it renders), every block
gets a span, "parallel_render.block", a child of whatever span is current where the block
renders (the request's, with opentelemetry-instrumentation-django):

- a block that goes to a worker: its span starts when its job is built, and the job carries
  the span's context (the propagator's fields, W3C `traceparent`/`tracestate` by default) in
  its sealed body; the span ends when block_finished reports what became of the block;
- a block the master renders without sending it (inline): its span is made from its
  BlockRecord when block_finished reports it, timed by its render.

Either way the attributes are the BlockRecord's: the one per-block signal is the one source.

In a worker, each block of a job whose body carries a context gets a span,
"parallel_render.render", a child of that block's span in the master (a bundle's blocks each
carry their own). The worker's tracer provider is the site's to set up: OTEL_WORKER_SETUP
names a function each worker calls once at start for that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from parallel_render import conf
from parallel_render.signals import BlockRecord, block_finished

logger = logging.getLogger("parallel_render")

INSTALL = 'pip install "parallel_render[otel]"'
BLOCK_SPAN = "parallel_render.block"
RENDER_SPAN = "parallel_render.render"
# Where a job carries its block's trace context: the propagator's carrier, str -> str.
JOB_KEY = "tc"
RECEIVER_UID = "parallel_render.tracing.finish_block"
# Attribute names, all under one prefix.
A = "parallel_render."

# A sent block's open span, by its index in its render session, kept on the request the page
# belongs to (so it goes with the request, even when the view fails and the block never
# finishes); a worker's nested blocks have no request and one job at a time: _nested.
_REQUEST_ATTR = "_parallel_render_spans"
_nested: dict[int, Any] = {}

_tracer: Any = None
_missing_logged = False


def missing() -> str | None:
    """Why tracing cannot run in this process, or None when opentelemetry-api imports."""
    try:
        import opentelemetry.context
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError as exc:
        return f"opentelemetry-api is not installed ({exc}); {INSTALL}"
    return None


def enabled() -> bool:
    """Whether OTEL is on and can run here (opentelemetry-api imports)."""
    try:
        on = conf.get_config()["OTEL"]
    except ImproperlyConfigured:
        return False  # the system check reports the setting
    if not on:
        return False
    problem = missing()
    if problem is None:
        return True
    global _missing_logged
    if not _missing_logged:
        _missing_logged = True
        logger.error("PARALLEL_RENDER['OTEL'] is on, but %s: blocks are not traced", problem)
    return False


def sync(**kwargs: Any) -> None:
    """Connect the receiver that ends blocks' spans while OTEL is on, disconnect it otherwise.

    Called by the app's ready() and, as a setting_changed receiver, when PARALLEL_RENDER
    changes (override_settings). Off, block_finished keeps no receiver of ours, so blocks
    build no record for tracing's sake.
    """
    if kwargs.get("setting") not in (None, "PARALLEL_RENDER"):
        return
    if enabled():
        block_finished.connect(finish_block, weak=False, dispatch_uid=RECEIVER_UID)
    else:
        block_finished.disconnect(dispatch_uid=RECEIVER_UID)


def tracer() -> Any:
    """parallel_render's tracer, from the global tracer provider (a proxy until one is set)."""
    global _tracer
    if _tracer is None:
        from importlib.metadata import PackageNotFoundError, version

        from opentelemetry import trace

        try:
            ours = version("parallel_render")
        except PackageNotFoundError:
            ours = None
        _tracer = trace.get_tracer("parallel_render", ours)
    return _tracer


def start_block(node: Any, job: dict[str, Any], request: Any, index: int) -> None:
    """A block about to be sent: start its span and put the span's context in its job.

    Called with the job's dict before it is encoded and sealed, only while OTEL is on.
    The span ends in finish_block(), when the block's outcome is known.
    """
    try:
        from opentelemetry import propagate, trace
    except ImportError:  # enabled() has said so once
        return
    # Its attributes come with its record (finish_block): each one set costs the SDK's checks.
    span = tracer().start_span(BLOCK_SPAN, kind=trace.SpanKind.INTERNAL)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    if carrier:  # nothing to carry where no SDK records spans (the API alone)
        job[JOB_KEY] = carrier
    _open_spans(request, create=True)[index] = span


def _open_spans(request: Any, create: bool = False) -> dict[int, Any]:
    if request is None:
        return _nested
    spans = getattr(request, _REQUEST_ATTR, None)
    if spans is None:
        spans = {}
        if create:
            try:
                setattr(request, _REQUEST_ATTR, spans)
            except AttributeError:  # a request object that takes no attributes: not kept
                pass
    return spans


def finish_block(sender: Any, record: BlockRecord, **kwargs: Any) -> None:
    """block_finished receiver: the block's span gets the record's facts and ends.

    A block that was sent (or meant to be) has the span start_block() opened; a block the
    master rendered without a job gets a span now, begun where its render began.
    """
    from opentelemetry import trace

    span = _open_spans(record.request).pop(record.index, None) if record.index is not None else None
    if span is None:
        now = time.time_ns()
        started = now - int((record.render_ms or 0.0) * 1_000_000)
        span = tracer().start_span(BLOCK_SPAN, kind=trace.SpanKind.INTERNAL, start_time=started)
        end_time: int | None = now
    else:
        end_time = None
    if span.is_recording():
        span.set_attributes(record_attributes(record))
        if record.outcome == "fallback":
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.reason))
    span.end(end_time)


def record_attributes(record: BlockRecord) -> dict[str, Any]:
    """A BlockRecord as span attributes (those that are not None)."""
    attributes: dict[str, Any] = {
        A + "block.label": record.label,
        A + "block.template": record.template or "<string>",
        A + "block.line": record.line,
        A + "block.id": record.block_id,
        A + "outcome": record.outcome,
        A + "nested": record.nested,
    }
    optional = {
        A + "reason": record.reason or None,
        A + "index": record.index,
        A + "worker.pid": record.pid,
        A + "queue_ms": record.queue_ms,
        A + "render_ms": record.render_ms,
        A + "total_ms": record.total_ms,
    }
    attributes.update((key, value) for key, value in optional.items() if value is not None)
    return attributes


# -- workers ------------------------------------------------------------------------------

RenderOne = Callable[..., dict[str, Any]]


def worker_setup() -> bool:
    """In a worker at start: whether to trace its jobs; runs OTEL_WORKER_SETUP first.

    A setup that fails is logged and the worker goes on without tracing: its pages are
    still right, and its blocks' spans in the master still say what they cost.
    """
    if not enabled():
        return False
    path = conf.get_config()["OTEL_WORKER_SETUP"]
    if path:
        try:
            import_string(path)()
        except Exception:
            logger.exception("PARALLEL_RENDER['OTEL_WORKER_SETUP'] (%s) failed; this worker does not trace", path)
            return False
    return True


def render_traced(render_one: RenderOne, job: Any, *args: Any, pid: int) -> dict[str, Any]:
    """render_one(job, *args) in a span that is a child of the job's block span in the master.

    A job without a trace context (its master does not trace, or records no spans) renders
    without a span, rather than start a trace of its own.
    """
    carrier = job.get(JOB_KEY) if isinstance(job, dict) else None
    if not isinstance(carrier, dict):
        return render_one(job, *args)
    from opentelemetry import propagate, trace

    parent = propagate.extract({str(k): str(v) for k, v in carrier.items()})
    attributes: dict[str, Any] = {A + "worker.pid": pid}
    template, ordinal, digest = job.get("t"), job.get("o"), job.get("h")
    if isinstance(template, str):
        attributes[A + "block.template"] = template
        attributes[A + "block.id"] = f"{template}#{ordinal}:{digest}"
    span = tracer().start_span(RENDER_SPAN, context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes)
    with trace.use_span(span, end_on_exit=True):
        result = render_one(job, *args)
        if span.is_recording():
            line = _block_line(job)
            if line is not None:
                span.set_attributes({A + "block.line": line, A + "block.label": f"{template}:{line}"})
            span.set_attribute(A + "render_ms", float(result.get("ms", 0.0)))
            span.set_attribute(A + "nested", int(result.get("nested") or 0))
            if not result.get("ok"):
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(result.get("error", ""))))
    return result


def _block_line(job: dict[str, Any]) -> int | None:
    """The line of the job's block in this worker's template (loaded already by its render)."""
    from parallel_render import fragments

    try:
        return fragments.worker_block(job["e"], job["t"], job["o"], job["h"])[1].line
    except Exception:  # a block that could not be found: the render's error says why
        return None
