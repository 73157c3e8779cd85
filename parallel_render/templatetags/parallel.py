"""{% parallel [timeout=S] [cache=S [key=expr ...]] [with a=expr ...] [only] %} ... [{% fallback %} ...] {% endparallel %}"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from typing import Any

import orjson
from django import template
from django.conf import settings
from django.template import Context, Node, NodeList, TemplateSyntaxError
from django.template.base import FilterExpression, Variable, token_kwargs

from parallel_render import analysis, codec, conf, policy, sealing, session, signals, streaming, threads, tracing
from parallel_render import cache as fragment_cache
from parallel_render.client import RouterUnavailable
from parallel_render.fragments import capture_env, engine_alias, render_captured

register = template.Library()
logger = logging.getLogger("parallel_render")

# Tags that may enclose a block in the same template and pass its output through unchanged.
TRANSPARENT_COMMANDS = {
    "for", "if", "with", "autoescape", "block", "language", "localtime", "timezone",
    "localize", "parallel", "comment", "verbatim", "extends",
}


# A block's cost is the median of its last COST_SAMPLES render times.
COST_SAMPLES = 5


class ParallelNode(Node):
    child_nodelists = ("nodelist", "fallback")

    def __init__(
        self,
        nodelist: NodeList,
        fallback: NodeList | None,
        timeout: FilterExpression | None,
        extra: dict[str, FilterExpression],
        isolated: bool,
        template_name: str | None,
        ordinal: int,
        digest: str,
        static_reason: str | None,
        line: int,
        cache: FilterExpression | None = None,
        cache_keys: list[FilterExpression] | None = None,
    ) -> None:
        self.nodelist = nodelist
        self.fallback = fallback
        self.timeout = timeout
        self.extra = extra
        self.isolated = isolated
        self.template_name = template_name
        self.ordinal = ordinal
        self.digest = digest
        self.static_reason = static_reason
        self.line = line
        # cache=SECONDS and its key= expressions (parallel_render.cache, docs/cache.md).
        self.cache = cache
        self.cache_keys = cache_keys or []
        self._analysis: analysis.Analysis | None = None
        self._logged: set[str] = set()
        self._cache_nodes: list[Any] | None = None
        # Set when a worker found the block changing the request (codec.SideEffect): from then
        # on this master renders it itself.
        self.learned_reason: str | None = None
        # What rendering this block costs, in ms (None until measured): see observe().
        self.cost_ms: float | None = None
        self._samples: list[float] = []
        # Of that, the time on a CPU (the rendering thread's CPU time) in this master and in
        # a worker, apart: the policy weighs what a worker's render costs over ours. None until
        # measured there.
        self.here_cpu_ms: float | None = None
        self._here_samples: list[float] = []
        self.sent_cpu_ms: float | None = None
        self._sent_samples: list[float] = []
        # Of a render in a worker, the time it slept (on I/O: neither on a CPU nor waiting
        # for one, as the worker measures it): the median of the last few. None until
        # measured. (A master's renders cannot tell sleeping from waiting for the
        # interpreter lock its other threads hold.)
        self.io_ms: float | None = None
        self._io_samples: list[float] = []

    def observe(self, ms: float, cpu_ms: float | None = None, sent: bool = False, io_ms: float | None = None) -> None:
        """One render's time and the CPU time it took, here or (sent) in a worker. Each is the
        median of the last few: a worker's first render of a block also loads its template and
        opens connections (often 100x the render), and an average would carry that one sample
        for dozens of pages. (Its CPU time is not passed at all: middleware.gather leaves out
        results marked cold, which with many workers can be all of a block's first few.)"""
        self.cost_ms = _median_of_last(self._samples, ms)
        if isinstance(io_ms, (int, float)):
            self.io_ms = _median_of_last(self._io_samples, float(io_ms))
        if isinstance(cpu_ms, (int, float)):
            if sent:
                self.sent_cpu_ms = _median_of_last(self._sent_samples, float(cpu_ms))
            else:
                self.here_cpu_ms = _median_of_last(self._here_samples, float(cpu_ms))

    def waits(self) -> bool:
        """Whether the block sleeps (on I/O) at least as long as it computes, as its renders in
        workers measured it, and costs enough to be worth a block thread (threads.py) when
        the master keeps it."""
        cpu = self.here_cpu_ms if self.here_cpu_ms is not None else self.sent_cpu_ms
        return (self.io_ms is not None and cpu is not None and self.cost_ms is not None
                and self.cost_ms >= policy.BATCH_MS and self.io_ms >= cpu)

    def kept_because(self, current: session.RenderSession) -> str | None:
        """Why the dispatch policy keeps this block in the master now; None: it may go out."""
        load = current.client.load()
        if not policy.should_send(load, self.cost_ms, current.nested, self.here_cpu_ms, self.sent_cpu_ms):
            return "every CPU busy" if self.cpu_busy() else "no idle worker"
        if not current.nested and not self.waits() and policy.every_cpu_has_a_page():
            return "every CPU has a page"
        if not current.nested and policy.holds_its_share(load, current.blocks_out):
            return "its page holds its share of the workers"
        return None

    def cpu_busy(self) -> bool:
        """Whether the CPUs are too busy for this block to be sent (policy.idle_needed)."""
        return not policy.cpu_room.has_room(policy.idle_needed(self.here_cpu_ms, self.sent_cpu_ms))

    def __repr__(self) -> str:
        return f"<ParallelNode {self.label}>"

    @property
    def label(self) -> str:
        return f"{self.template_name or '<string>'}:{self.line}"

    # -- rendering ------------------------------------------------------------------------

    def render(self, context: Context) -> str:
        current = session.current()
        if self.cache is not None:
            cached = self.cache_lookup(context)
            if cached is not None:
                return self._render_cached(current, context, *cached, sys._getframe(1))
        if current is None:
            return self._render_here(context, signals.NO_SESSION, getattr(context, "request", None))
        began = time.monotonic() if signals.block_finished.receivers else 0.0
        config = conf.get_config()
        threshold = config["MIN_BLOCK_MS"]
        if threshold and self.cost_ms is not None and self.cost_ms < threshold:
            # Cheaper to render here than to send: keep measuring, in case it grows.
            return self._render_measured(current, context, "cheap")
        if config["ADAPTIVE"] and (why := self.kept_because(current)) is not None:
            # No worker would start it soon, or no CPU would run it sooner than this one, or
            # the page holds its share of the workers: rendering it here costs the page (and
            # the node) less than sending it.
            if current.streaming:  # rendered here after the first byte, not before it
                deferred = streaming.defer(self, current, context, why, sys._getframe(1), began)
                if deferred is not None:
                    return deferred
            # A block that mostly waits goes to a thread of this master, if one is free: the
            # page goes on meanwhile, and the waits of its blocks overlap.
            pool = (None if current.nested or current.streaming or not self.waits()
                    or not policy.cpu_room.has_room(policy.THREAD_IDLE_SHARE)
                    else threads.block_threads(config["MASTER_THREADS"]))
            if (pool is None or pool.busy() >= pool.size
                    or policy.holds_its_threads(pool.size, current.blocks_in_threads)):
                return self._render_measured(current, context, why)
            kept = why
        else:
            pool = kept = None
        reason = self.reason_inline(context, sys._getframe(1))
        if reason is not None:
            return self._inline_because(current, context, reason)
        try:
            values = self.capture_values(context)
        except codec.Unsendable as exc:
            return self._inline_because(current, context, str(exc))
        env = capture_env(context)
        alias = engine_alias(context.template.engine)
        if env is None or alias is None:
            return self._inline_because(current, context, "its template engine or time zone cannot be carried")
        index = len(current.fragments)
        nonce = f"{current.token}:{index}"
        try:
            job = self.encode_job(current, context.template.engine, context.request, _processor_values(context),
                                  values, env, alias, index, nonce)
            body = orjson.dumps(job)
        except codec.Unsendable as exc:
            return self._inline_because(current, context, str(exc))
        except (TypeError, orjson.JSONEncodeError) as exc:
            return self._inline_because(current, context, f"a value cannot be encoded: {exc}")
        timeout = self.resolve_timeout(context)
        if current.deadline is not None:
            timeout = min(timeout, current.deadline - time.monotonic())
            if timeout <= 0.001:
                return self._inline_because(current, context, "the enclosing block's deadline has passed", warn=False)
        now = time.monotonic()
        pending = session.Pending(
            index, 0, self, values, env, context.template, nonce, now, now + timeout, current.nested, began=began
        )
        if pool is not None:
            pending.local = pool.submit(body)
            if pending.local is None:  # another page's block took the last thread meanwhile
                return self._render_measured(current, context, kept)
            pending.unsent = f"{kept}: rendered in a thread of the master"
            current.fragments.append(pending)
            return current.placeholder(index)
        if not current.nested and self.cost_ms is not None and self.cost_ms < policy.BATCH_MS:
            # Too cheap to be worth a job of its own: it travels with the page's other cheap
            # blocks, in one job, once they add up to a job's worth of work.
            current.fragments.append(pending)
            current.add_to_bundle(pending, body, self.cost_ms, policy.BATCH_MS)
            return current.placeholder(index)
        sealed, pending.identity, pending.expiry_ms = sealing.seal_job(current.client.binding, body, timeout)
        try:
            pending.job_id = current.client.submit(
                sealed, timeout, high_priority=current.nested, no_queue=current.nested
            )
        except RouterUnavailable as exc:
            return self._inline_because(current, context, str(exc), warn=False)
        except ValueError as exc:  # larger than MAX_PAYLOAD
            return self._inline_because(current, context, str(exc))
        current.fragments.append(pending)
        return current.placeholder(index)

    def encode_job(
        self, current: session.RenderSession, engine: Any, request: Any, processors: dict[str, Any],
        values: dict[str, Any], env: dict[str, Any], alias: str, index: int, nonce: str,
    ) -> dict[str, Any]:
        """The block's job (before orjson): what a worker needs to render it. Raises codec.Unsendable.

        processors: the values the context processors made (_processor_values), request the
        context's request: a processor's value that cannot be sent is made again in the worker.
        """
        job = {"v": 1, "e": alias, "t": self.template_name, "o": self.ordinal, "h": self.digest,
               "n": nonce, "c": encode_values(None, values, self.get_analysis(engine), processors),
               "env": env}
        if any(type(v) is dict and "$proc" in v for v in job["c"].values()):
            job["req"] = codec.Encoder().encode(request, "request")
        if conf.get_config()["OTEL"]:  # its span starts here; its context goes in the job
            tracing.start_block(self, job, current.request, index)
        return job

    # -- the fragment cache (parallel_render.cache) -------------------------------------------

    def cache_lookup(self, context: Context) -> tuple[fragment_cache.Lookup, dict[str, Any]] | None:
        """Where this render of a cached block lives in the fragment cache, and its rendering
        state; None when it renders uncached (cache=0 or None, no usable fragment cache, a time
        zone that cannot be named)."""
        if not fragment_cache.usable():
            return None
        try:
            ttl = fragment_cache.seconds(self.cache.resolve(context))
        except ValueError as exc:
            if str(exc) not in self._logged:
                self._logged.add(str(exc))
                logger.warning("block %s: %s; it renders uncached", self.label, exc)
            return None
        env = capture_env(context) if ttl is not None else None
        if env is None:
            return None
        values = [fe.resolve(context) for fe in self.cache_keys]
        return fragment_cache.Lookup(fragment_cache.block_key(self, values, env), ttl), env

    def _render_cached(
        self, current: session.RenderSession | None, context: Context, entry: fragment_cache.Lookup,
        env: dict[str, Any], frame: Any,
    ) -> str:
        """A cached block: with a render session, a placeholder whose lookup waits for the page's
        one get_many (a miss goes to a worker, or to the master where an uncached block would
        render inline); without one, or where a placeholder cannot stand in for it (inside a tag
        that changes its output), its own lookup here and a render in place on a miss."""
        request = getattr(context, "request", None) if current is None else current.request
        timeout = self.resolve_timeout(context)
        here = signals.NO_SESSION if current is None else (self.static_reason or enclosure_reason(self, frame))
        if here is None and current.deadline is not None:
            timeout = min(timeout, current.deadline - time.monotonic())
            if timeout <= 0.001:
                here = "the enclosing block's deadline has passed"
        if here is not None:
            if current is not None:
                current.inline.append((self.label, here))
            return self._cached_here(context, entry, timeout, here, request)
        began = time.monotonic()
        config = conf.get_config()
        why = None
        if config["MIN_BLOCK_MS"] and self.cost_ms is not None and self.cost_ms < config["MIN_BLOCK_MS"]:
            why = "cheap"
        elif config["ADAPTIVE"] and (kept := self.kept_because(current)) is not None:
            why = kept
        else:
            why = self.reason_inline(context, frame)
        try:
            values = self.capture_values(context)
        except codec.Unsendable as exc:
            # Nothing to render it from later: it is looked up and rendered here, now.
            current.inline.append((self.label, str(exc)))
            return self._cached_here(context, entry, timeout, str(exc), request)
        alias = engine_alias(context.template.engine)
        index = len(current.fragments)
        nonce = f"{current.token}:{index}"
        job = None
        if why is None and alias is not None:
            # Encoded only on a miss (a hit costs no encoding), from the values captured now.
            job = functools.partial(self.encode_job, current, context.template.engine, getattr(context, "request", None),
                                    _processor_values(context), values, env, alias, index, nonce)
        elif alias is None:
            why = "its template engine cannot be carried"
        now = time.monotonic()
        pending = session.Pending(
            index, 0, self, values, env, context.template, nonce, now, now + timeout, current.nested,
            began=began if signals.block_finished.receivers else 0.0, cache=entry, job=job,
            unsent=f"not in the fragment cache, and renders here: {why}" if why else "",
        )
        current.fragments.append(pending)
        current.lookups.append(pending)
        return current.placeholder(index)

    def _cached_here(
        self, context: Context, entry: fragment_cache.Lookup, timeout: float, reason: str, request: Any
    ) -> str:
        """A cached block looked up on its own, and rendered in place on a miss."""

        def render() -> tuple[str, bool]:
            html, failure = self._render_reported(context, reason, request)
            return html, failure is None

        html, hit = fragment_cache.render_here(entry, timeout, render)
        if hit and signals.block_finished.receivers:
            signals.send(self, "cached", "", request)
        return html

    def _render_measured(self, current: session.RenderSession, context: Context, reason: str) -> str:
        current.inline.append((self.label, reason))
        return self._render_here(context, reason, current.request, measure=True)

    def _render_here(self, context: Context, reason: str, request: Any, measure: bool = False) -> str:
        """Render the block in place (never sent), and report it to block_finished receivers.

        measure: its time feeds the block's cost model (observe()).
        """
        return self._render_reported(context, reason, request, measure)[0]

    def _render_reported(
        self, context: Context, reason: str, request: Any, measure: bool = False
    ) -> tuple[str, Exception | None]:
        """_render_here(), and the failure its {% fallback %} stood in for (None: its own HTML)."""
        report = signals.block_finished.receivers
        if not report and not measure:
            return self._render_inline(context)
        started = policy.start_measuring()
        html, failure = self._render_inline(context)
        ms, cpu_ms = policy.measured(started)
        if measure:
            self.observe(ms, cpu_ms)
        if report:
            # On the page's time line (signals.BlockRecord): it began ms ago.
            current = session.current()
            at = None if current is None else (time.monotonic() - current.started) * 1000 - ms
            if failure is None:
                signals.send(self, "inline", reason, request, render_ms=ms, start_ms=at, render_start_ms=at)
            else:
                signals.send(self, "fallback", f"failed: {type(failure).__name__}: {failure}", request, render_ms=ms,
                             start_ms=at, render_start_ms=at)
        return html, failure

    def render_inline(self, context: Context) -> str:
        """Render the block here, exactly as it would render without the plugin."""
        return self._render_inline(context)[0]

    def _render_inline(self, context: Context) -> tuple[str, Exception | None]:
        """The block rendered here, and the failure its {% fallback %} stands in for (if it did)."""
        try:
            return self._render_list(self.nodelist, context), None
        except Exception as exc:
            if self.fallback is None or settings.DEBUG:
                raise
            logger.exception("block %s failed; rendering its {%% fallback %%}", self.label)
            return self._render_list(self.fallback, context), exc

    def _render_list(self, nodelist: NodeList, context: Context) -> str:
        # Without `with`, the block is no scope at all: it renders as if the tag were absent.
        if not self.extra and not self.isolated:
            return nodelist.render(context)
        values = {name: fe.resolve(context) for name, fe in self.extra.items()}
        if self.isolated:
            return nodelist.render(context.new(values))
        with context.push(values):
            return nodelist.render(context)

    def rescue(self, pending: session.Pending, why: str, kind: str) -> str:
        """After the page: the fallback, or the block itself, from the captured values.

        kind is "failed", "timed out" or "not rendered". The fallback stands in for a block
        that failed or timed out; in DEBUG a failed block is rendered again instead, so the
        error page shows the real exception (and without a fallback the page fails as it
        would serially). A block that was never rendered is simply rendered here.
        """
        if self.stands_in(kind):
            logger.warning("block %s: %s; rendering its {%% fallback %%}", self.label, why)
            return render_captured(self, pending.template, pending.values, pending.env, fallback=True)
        # A block nobody rendered (no idle worker for a nested block, a full queue) is routine.
        log = logger.warning if kind != "not rendered" else logger.info
        log("block %s: %s; rendering it here", self.label, why)
        return render_captured(self, pending.template, pending.values, pending.env)

    def stands_in(self, kind: str) -> bool:
        """Whether rescue() renders the {% fallback %} for a block that came back this kind."""
        return self.fallback is not None and (kind == "timed out" or (kind == "failed" and not settings.DEBUG))

    def resolve_timeout(self, context: Context) -> float:
        """The block's timeout=, or the TIMEOUT setting when it is absent or not a positive number.

        A timeout changes nothing a serial render does, so a value that is no timeout (a
        missing variable, "abc", -1) must not fail the page in parallel either: it is logged
        (once per block and value) and the default is used. A literal that can never be right
        is refused when the template compiles, in both modes.
        """
        default = float(conf.get_config()["TIMEOUT"])
        if self.timeout is None:
            return default
        value = self.timeout.resolve(context)
        seconds = _positive_seconds(value)
        if seconds is None:
            why = f"timeout={value!r} is not a positive number of seconds"
            if why not in self._logged:
                self._logged.add(why)
                logger.warning("block %s: %s; using TIMEOUT (%g s)", self.label, why, default)
            return default
        return seconds

    def _inline_because(self, current: session.RenderSession, context: Context, reason: str, warn: bool = True) -> str:
        current.inline.append((self.label, reason))
        if reason not in self._logged:
            self._logged.add(reason)
            (logger.info if warn else logger.debug)("block %s renders inline: %s", self.label, reason)
        return self._render_here(context, reason, current.request)

    # -- analysis -------------------------------------------------------------------------

    def get_analysis(self, engine: Any) -> analysis.Analysis:
        if self._analysis is None:
            transparent = analysis.transparent_paths(conf.get_config()["TRANSPARENT_TAGS"])
            lists = [self.nodelist] + ([self.fallback] if self.fallback is not None else [])
            self._analysis = analysis.analyse(lists, engine, sorted(transparent))
        return self._analysis

    def reason_inline(self, context: Context, frame: Any) -> str | None:
        if self.static_reason:
            return self.static_reason
        if self.learned_reason:
            return self.learned_reason
        found = self.get_analysis(context.template.engine).reason
        if found:
            return found
        found = self.local_cache_reason(context)
        if found:
            return found
        return enclosure_reason(self, frame)

    def local_cache_reason(self, context: Context) -> str | None:
        """A {% cache %} in the block whose backend lives in the master's memory (LocMemCache):
        a worker would read and fill its own copy, and the page would differ from serial."""
        if self._cache_nodes is None:
            self._cache_nodes = _cache_nodes([self.nodelist] + ([self.fallback] if self.fallback else []),
                                             context.template.engine)
        if not self._cache_nodes:
            return None
        from django.core.cache import caches
        from django.core.cache.backends.locmem import LocMemCache

        for cache_node in self._cache_nodes:
            if cache_node.cache_name is None:
                alias = "template_fragments" if "template_fragments" in settings.CACHES else "default"
            else:
                try:
                    alias = cache_node.cache_name.resolve(context)
                except Exception:
                    return "a {% cache using=... %} in it names a cache that cannot be resolved here"
            try:
                backend = caches[alias]
            except Exception:
                continue  # the render fails the same way serially, wherever it runs
            if isinstance(backend, LocMemCache):
                return f"a {{% cache %}} in it uses {alias!r}, a LocMemCache that only this process sees"
        return None

    def capture_values(self, context: Context) -> dict[str, Any]:
        extra = {name: fe.resolve(context) for name, fe in self.extra.items()}
        if self.isolated:
            return _snapshot_loops(context, extra)
        values: dict[str, Any] = {}
        for name in self.get_analysis(context.template.engine).names:
            try:
                values[name] = context[name]
            except KeyError:
                pass
        values.update(extra)
        return _snapshot_loops(context, values)


def _median_of_last(samples: list[float], sample: float) -> float:
    """Add sample to the last COST_SAMPLES samples (in place) and return their median."""
    samples.append(sample)
    if len(samples) > COST_SAMPLES:
        del samples[0]
    ordered = sorted(samples)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _cache_nodes(nodelists: list[NodeList], engine: Any, depth: int = 0) -> list[Any]:
    """The {% cache %} nodes in these node lists and in the templates they include by name."""
    from django.template.loader_tags import IncludeNode
    from django.templatetags.cache import CacheNode

    found: list[Any] = []
    for nodelist in nodelists:
        found += nodelist.get_nodes_by_type(CacheNode)
        if depth >= 8:
            continue
        for include in nodelist.get_nodes_by_type(IncludeNode):
            name = getattr(include.template, "var", None)
            if isinstance(name, str):
                try:
                    included = engine.get_template(name)
                except Exception:
                    continue
                found += _cache_nodes([included.nodelist], engine, depth + 1)
    return found


def _snapshot_loops(context: Context, values: dict[str, Any]) -> dict[str, Any]:
    """{% for %} updates one `forloop` dict in place as it goes: a block the master renders
    later (rescued, taken back) must see this iteration's counters, not the last. Every
    captured value that is one of the enclosing loops' dicts becomes a copy made now."""
    try:
        loop = context["forloop"]
    except KeyError:
        return values
    copies: dict[int, dict[str, Any]] = {}
    chain = []
    while type(loop) is dict and id(loop) not in copies:
        copies[id(loop)] = dict(loop)
        chain.append(loop)
        loop = loop.get("parentloop")
    for original in chain:
        parent = original.get("parentloop")
        if id(parent) in copies:
            copies[id(original)]["parentloop"] = copies[id(parent)]
    for name, value in values.items():
        if id(value) in copies and type(value) is dict:
            values[name] = copies[id(value)]
    return values


def encode_values(
    context: Context | None, values: dict[str, Any], reads: analysis.Analysis | None = None,
    processors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode what a block reads (only the parts it reads, given its analysis). A value that cannot
    be sent but comes from a context processor listed in WORKER_CONTEXT_PROCESSORS is made again
    by that processor in the worker. processors: what the processors made, if not context's."""
    encoder = codec.Encoder(reads)
    rerun = conf.get_config()["WORKER_CONTEXT_PROCESSORS"]
    made_by_processors = _processor_values(context) if processors is None else processors
    encoded = {}
    for name, value in values.items():
        try:
            encoded[name] = encoder.encode(value, name)
        except codec.Unsendable as exc:
            never = isinstance(exc, codec.NeverSent)  # a credential or sensitive field it reads
            if never or not (rerun and name in made_by_processors and made_by_processors[name] is value):
                raise
            encoded[name] = {"$proc": name}
    return encoded


def _processor_values(context: Context | None) -> dict[str, Any]:
    """The values the context processors made for this render (a RequestContext's own dict)."""
    return context.dicts[context._processors_index] if hasattr(context, "_processors_index") else {}


def enclosure_reason(node: ParallelNode, frame: Any) -> str | None:
    """Why the block's output would not reach the response unchanged, from the render stack.

    Walks up the Python stack: every template node being rendered around the block must pass
    its output through unchanged, up to the render that stitches it: a render through the
    template backend (render(), render_to_string(), TemplateResponse; see
    parallel_render.rendering), or a worker's rendering of the block it nests in.

    What the walk found above an enclosing node's frame holds for as long as that frame runs
    (its callers do not change meanwhile): the render session keeps it, by frame, so the
    blocks of a loop walk only up to the loop's node. The frames it keeps stay alive (and are
    never mistaken for new ones) until the page is done.
    """
    current = session.current()
    known = current.enclosures if current is not None else None
    transparent = analysis.transparent_paths(conf.get_config()["TRANSPARENT_TAGS"])
    f = frame
    if f is not None and f.f_code is _RENDER_ANNOTATED:
        f = f.f_back  # the block's own render_annotated (it renders only its own node)
    walked = []
    reason: str | None = (
        "the template is not rendered through Django's template backend (render(), render_to_string(), "
        "TemplateResponse)"
    )
    while f is not None:
        code = f.f_code
        if code is _RENDER_ANNOTATED:
            if known is not None:
                found = known.get(f, _UNKNOWN)
                if found is not _UNKNOWN:
                    reason = found
                    break
                walked.append(f)
            outer = f.f_locals.get("self")
            # (A block inside itself, through a recursive include, is a ParallelNode: transparent.)
            if outer is not None and analysis.class_path(outer) not in transparent:
                reason = f"inside {{% {analysis.tag_name(outer)} %}}, which may change its output"
                break
        elif code in _RESPONSE_CODES:
            reason = None
            break
        f = f.f_back
    if known is not None:
        for f in walked:
            known[f] = reason
    return reason


_UNKNOWN = object()


def _response_codes() -> set[Any]:
    from parallel_render import rendering, worker

    # Every render through the template backend stitches its own blocks before it returns;
    # a worker's rendering of a block stitches the blocks nested in it.
    return {rendering.render_code(), worker.render_job.__code__}


_RENDER_ANNOTATED = Node.render_annotated.__code__
_RESPONSE_CODES = _response_codes()


def parallel_nodes(tpl: Any) -> dict[int, ParallelNode]:
    """Every {% parallel %} node parsed from this template, by ordinal (cached on the template)."""
    index = getattr(tpl, "_parallel_index", None)
    if index is None:
        index = {}
        _collect(tpl.nodelist, index, 0)
        tpl._parallel_index = index
    return index


def _collect(value: Any, index: dict[int, ParallelNode], depth: int) -> None:
    if depth > 50:
        return
    if isinstance(value, ParallelNode):
        index[value.ordinal] = value
    if isinstance(value, Node):
        for key, item in vars(value).items():
            if key not in ("token", "origin"):
                _collect(item, index, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, index, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, index, depth + 1)


def _positive_seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if 0 < seconds < float("inf") else None


@register.tag("parallel")
def do_parallel(parser: Any, token: Any) -> ParallelNode:
    bits = token.split_contents()[1:]
    timeout = None
    cache = None
    cache_keys: list[FilterExpression] = []
    extra: dict[str, FilterExpression] = {}
    isolated = False
    while bits:
        bit = bits.pop(0)
        if bit.startswith("cache="):
            if cache is not None:
                raise TemplateSyntaxError("{% parallel %} got cache= twice")
            cache = parser.compile_filter(bit[len("cache="):])
            literal = cache.var if not isinstance(cache.var, Variable) else cache.var.literal
            if literal is not None and not cache.filters:
                try:
                    fragment_cache.seconds(literal)
                except ValueError as exc:
                    raise TemplateSyntaxError(f"{{% parallel {bit} %}}: {exc}") from None
        elif bit.startswith("key="):
            cache_keys.append(parser.compile_filter(bit[len("key="):]))
        elif bit.startswith("timeout="):
            if timeout is not None:
                raise TemplateSyntaxError("{% parallel %} got timeout= twice")
            timeout = parser.compile_filter(bit[len("timeout="):])
            literal = timeout.var if not isinstance(timeout.var, Variable) else timeout.var.literal
            if literal is not None and not timeout.filters and _positive_seconds(literal) is None:
                raise TemplateSyntaxError(
                    f"{{% parallel timeout={bit[len('timeout='):]} %}}: the timeout must be a positive number of seconds"
                )
        elif bit == "with":
            extra = token_kwargs(bits, parser, support_legacy=False)
            if not extra:
                raise TemplateSyntaxError("{% parallel with %} needs at least one name=value")
        elif bit == "only":
            isolated = True
        else:
            raise TemplateSyntaxError(
                f"{{% parallel %}} got an unknown argument {bit!r}; it takes timeout=S, cache=S, key=expr ..., "
                "with a=b ..., and only"
            )
    if cache_keys and cache is None:
        raise TemplateSyntaxError("{% parallel key=... %} needs cache=SECONDS: key= values name a cached block's entry")
    ordinal = getattr(parser, "_parallel_ordinal", -1) + 1
    parser._parallel_ordinal = ordinal
    enclosing = [cmd for cmd, _tok in parser.command_stack if cmd not in TRANSPARENT_COMMANDS]
    before = list(parser.tokens)
    nodelist = parser.parse(("fallback", "endparallel"))
    fallback = None
    if parser.next_token().contents == "fallback":
        fallback = parser.parse(("endparallel",))
        parser.delete_first_token()
    consumed = before[len(parser.tokens):]
    digest = hashlib.sha256(
        "\0".join([token.contents] + [f"{t.token_type.value}:{t.contents}" for t in reversed(consumed)]).encode()
    ).hexdigest()[:32]
    origin = getattr(parser, "origin", None)
    template_name = getattr(origin, "template_name", None)
    static_reason = None
    if not isinstance(template_name, str):
        static_reason = "its template was built from a string, so a worker cannot load it"
    elif enclosing:
        static_reason = f"inside {{% {enclosing[-1]} %}}, which may change its output"
    return ParallelNode(
        nodelist, fallback, timeout, extra, isolated, template_name if isinstance(template_name, str) else None,
        ordinal, digest, static_reason, token.lineno, cache, cache_keys,
    )
