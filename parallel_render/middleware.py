"""ParallelRenderMiddleware: opens a render session around the view, then stitches the page."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any

import orjson
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse

from parallel_render import cache as fragment_cache
from parallel_render import conf, policy, sealing, session, signals, streaming
from parallel_render import protocol as p
from parallel_render.client import get_client

logger = logging.getLogger("parallel_render")

# How long past the last fragment's own deadline the master waits for the router's answer
# before it gives up on the router and renders the rest itself.
GRACE = 0.25

# Results that do not open or carry another job's identity: the first of each kind is a warning.
_refused = sealing.RefusalLog("master")


class ParallelRenderMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        current = self.session_for(request)
        if current is None:
            return self.get_response(request)
        with policy.pages_in_flight:  # the dispatch policy shares the workers among them
            with rendering(current):
                response = self.get_response(request)
            if current.fragments:
                if streaming.wants_stream(response, current):
                    return streaming.stream(current, response)
                stitch(current, response)
            return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        current = self.session_for(request)
        if current is None:
            return await self.get_response(request)
        # The session travels in a context variable, which asgiref copies into the thread
        # where a sync view (or a TemplateResponse) renders.
        with policy.pages_in_flight:
            with rendering(current):
                response = await self.get_response(request)
            if current.fragments:
                if streaming.wants_stream(response, current):
                    # It sends the last bundle and looks cached blocks up: off the event loop too.
                    return await sync_to_async(streaming.stream, thread_sensitive=False)(
                        current, response, asynchronous=True
                    )
                # Waiting for the workers blocks; keep it off the event loop.
                await sync_to_async(stitch, thread_sensitive=False)(current, response)
            return response

    def session_for(self, request: HttpRequest) -> session.RenderSession | None:
        config = conf.get_config()
        if not config["ENABLED"] or not config["ROUTER"] or self.wants_serial(request, config):
            return None
        return session.RenderSession(request, get_client(config["ROUTER"], config["MAX_PAYLOAD"]))

    @staticmethod
    def wants_serial(request: HttpRequest, config: dict[str, Any]) -> bool:
        param = config["SERIAL_QUERY_PARAM"]
        if param and request.GET.get(param, "") not in ("", "0"):
            return True
        header = config["SERIAL_HEADER"]
        return bool(header) and request.headers.get(header, "").lower() == "serial"


@contextmanager
def rendering(current: session.RenderSession) -> Iterator[None]:
    """Around the view: current is the active render session; if the view raises, the blocks
    it sent are abandoned; afterwards the session lets go of the frames its renders kept."""
    token = session.activate(current)
    try:
        yield
    except BaseException:
        abandon(current)
        raise
    finally:
        session.deactivate(token)
        current.forget_frames()


def abandon(current: session.RenderSession) -> None:
    """The view raised after blocks went out: tell the router, so nothing waits for them."""
    current.drop_bundle()
    for f in current.fragments[current.resolved:]:
        if f.local is not None:
            f.local.cancel()  # one a thread has started runs on; its result is dropped
    if current.unresolved():
        current.client.cancel(sorted({f.job_id for f in current.fragments[current.resolved:] if f.job_id}))


def stitch(current: session.RenderSession, response: HttpResponse) -> None:
    """After the view: the Server-Timing header, and any placeholder a render left.

    Every render through the template backend stitched its own blocks before it returned
    (parallel_render.rendering); what is left here is a render on an async view's event loop.
    """
    resolve(current)
    if getattr(response, "streaming", False):
        if current.html:
            logger.error("a streaming response cannot be stitched; its blocks may be missing")
        report_stitched(current)
        return
    if b"<!--pr:" in response.content:
        charset = response.charset
        encoded = {i: s.encode(charset) for i, s in current.html.items()}
        content = current.pattern().sub(lambda m: encoded.get(int(m.group(1)), m.group(0)), response.content)
        response.content = content
        if response.has_header("Content-Length"):
            response.headers["Content-Length"] = str(len(content))
    report_stitched(current)
    if current.timings and server_timing_enabled():
        existing = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = ", ".join(([existing] if existing else []) + current.timings)


def resolve(current: session.RenderSession) -> None:
    """Gather every fragment not gathered yet (one deadline for them all) into current.html."""
    pending = current.fragments[current.resolved:]
    if not pending and not current.bundle:
        return
    current.send_bundle()
    # The page's cached blocks, in one get_many: hits go in the page, misses out now.
    fragment_cache.resolve_lookups(current)
    pending = [f for f in current.fragments[current.resolved:] if f.index not in current.html]
    current.resolved = len(current.fragments)
    if not pending:
        return
    html, timings = gather(current, pending)
    current.html.update(html)
    current.timings.extend(timings)


def server_timing_enabled() -> bool:
    """The per-block header names templates and pids: on in DEBUG unless the site says otherwise."""
    from django.conf import settings

    setting = conf.get_config()["SERVER_TIMING"]
    return settings.DEBUG if setting is None else bool(setting)


def stitch_text(current: session.RenderSession, text: str) -> str:
    """A render's output with every block it sent in place (a worker stitching the blocks
    nested in the one it rendered, or any render through the template backend)."""
    resolve(current)
    if "<!--pr:" in text:
        text = current.replace_placeholders(text, current.html)
    report_stitched(current)
    return text


def report_stitched(current: session.RenderSession) -> None:
    """Send the block_finished records gather() held back, now that their blocks are in the page."""
    if current.held:
        signals.send_stitched(current.held, (time.monotonic() - current.started) * 1000)


def gather(
    current: session.RenderSession, fragments: list[session.Pending], timed: bool | None = None
) -> tuple[dict[int, str], list[str]]:
    """Every fragment's HTML (from its worker, or rendered here) and a Server-Timing entry each
    (none unless timed; by default, when the header is on: server_timing_enabled()).

    Before waiting, the master takes back its blocks that no worker has started, newest
    first, and renders them itself while the workers finish theirs: it never waits on a
    queue for work it could do. The router's queue is first in, first out, so once the
    newest block still out is with a worker, every older one is too.
    """
    client = current.client
    if timed is None:
        timed = server_timing_enabled()
    deadline = max(f.deadline for f in fragments) + GRACE
    html: dict[int, str] = {}
    timing: dict[int, str] = {}
    jobs: dict[int, list[session.Pending]] = {}  # job id -> its blocks, in the order sent
    for f in fragments:
        if f.job_id:
            jobs.setdefault(f.job_id, []).append(f)
    taken: set[int] = set()
    for f in reversed(fragments):  # a block kept in a thread of this master that has not started
        if f.local is not None and f.local.cancel():
            html[f.index], timing[f.index] = _render_here(f, "taken back", NOT_RENDERED, current, True, timed)
    # Nested blocks never queue (FLAG_NO_QUEUE): nothing to take back.
    if not current.nested and conf.get_config()["ADAPTIVE"]:
        newest_first = sorted(jobs, reverse=True)  # a connection's job ids grow
        batch = 1
        while newest_first:
            # One job first (at an idle node, the newest is already with a worker); while
            # every one asked for was still queued, ask for twice as many in one round trip.
            asked, newest_first = newest_first[:batch], newest_first[batch:]
            outcome = client.withdraw(asked, deadline)
            for job_id in asked:
                if outcome[job_id] is not True:
                    continue
                taken.add(job_id)
                for f in jobs[job_id]:
                    html[f.index], timing[f.index] = _render_here(f, "taken back", NOT_RENDERED, current, True, timed)
            if any(outcome[job_id] is False for job_id in asked):
                break  # that one is with a worker, so is every older one
            batch *= 2
    waited_from = time.monotonic()
    answers = client.collect([job_id for job_id in jobs if job_id not in taken], deadline)
    waited = time.monotonic() - waited_from
    decoded: dict[int, dict | str] = {}
    for f in fragments:
        if f.job_id in taken or f.index in html:
            continue
        if f.local is not None:
            result, why, kind = _local_result(f)
            if result is None:
                html[f.index], timing[f.index] = _render_here(f, why, kind, current, timed=timed)
                continue
            html[f.index] = result["html"]
            f.node.observe(result["ms"], result["cpu"])
            if timed:
                timing[f.index] = (f'pr-{f.index};dur={(time.monotonic() - f.submitted) * 1000:.1f};'
                                   f'desc="{f.node.label} master thread render {result["ms"]:.1f}ms"')
            if signals.block_finished.receivers:
                signals.send(f.node, "inline", f.unsent, current.request, index=f.index, render_ms=result["ms"],
                             **_time_line(current, f, result["at"]), later=current.held)
            continue
        answer = answers.get(f.job_id)
        if not f.job_id:
            result, why, kind = None, f.unsent, NOT_RENDERED
        else:
            result, why, kind = _result(f, answer, decoded, client.binding)
        if result is not None:
            html[f.index] = result["html"]
            if f.cache is not None:
                fragment_cache.filled(f, result["html"], own=True, by_worker=True)
            # A worker's first render of a block (cold) says nothing of what the next costs it.
            cold = result.get("cold")
            f.node.observe(result["ms"], None if cold else result.get("cpu"), sent=True,
                           io_ms=None if cold else result.get("io"))
            if timed:
                nested = f" +{result['nested']} nested" if result.get("nested") else ""
                timing[f.index] = (
                    f'pr-{f.index};dur={(answer.received - f.submitted) * 1000:.1f};'
                    f'desc="{f.node.label} pid {result["pid"]} render {result["ms"]:.1f}ms{nested}"'
                )
            if signals.block_finished.receivers:
                total = (answer.received - f.submitted) * 1000
                signals.send(f.node, "sent", "", current.request, index=f.index, queue_ms=max(total - result["ms"], 0.0),
                             render_ms=result["ms"], total_ms=total, pid=result["pid"], nested=result.get("nested") or 0,
                             worker_slot=result.get("slot") if isinstance(result.get("slot"), int) else None,
                             **_time_line(current, f, _worker_began(f, decoded, answer.received, result["ms"])),
                             later=current.held)
            continue
        html[f.index], timing[f.index] = _render_here(f, why, kind, current, timed=timed)
    if not timed:
        return html, []
    timings = [timing[f.index] for f in fragments]
    timings.append(f'pr-wait;dur={waited * 1000:.1f};desc="waited for {len(fragments)} fragments"')
    return html, timings


def _render_here(
    f: session.Pending, why: str, kind: str, current: session.RenderSession, measure: bool = False,
    timed: bool = True,
) -> tuple[str, str]:
    """The block rendered by the master (or its fallback), and its Server-Timing entry ("" unless timed).

    measure: the block rendered as a worker would have (taken back), so its time feeds the
    block's cost model.
    """
    started = policy.start_measuring()
    html = f.node.rescue(f, why, kind)
    ms, cpu_ms = policy.measured(started)
    if f.cache is not None:
        fragment_cache.filled(f, html, own=not f.node.stands_in(kind))
    if measure:
        f.node.observe(ms, cpu_ms)
    if signals.block_finished.receivers:
        signals.send(f.node, "fallback" if f.node.stands_in(kind) else "rescued", why, current.request, index=f.index,
                     render_ms=ms, total_ms=(time.monotonic() - f.submitted) * 1000,
                     **_time_line(current, f, time.monotonic() - ms / 1000), later=current.held)
    if not timed:
        return html, ""
    entry = (f'pr-{f.index};dur={(time.monotonic() - f.submitted) * 1000:.1f};'
             f'desc="{f.node.label} master render {ms:.1f}ms: {why[:100].replace(chr(34), chr(39))}"')
    return html, entry


def _time_line(current: session.RenderSession, f: session.Pending, render_began: float) -> dict[str, float | None]:
    """Where a block sits on the page's time line, in ms from the render session's start
    (signals.BlockRecord): its start, its submit and its render's start."""
    origin = current.started
    return {"start_ms": (f.began - origin) * 1000 if f.began else None,
            "submit_ms": (f.submitted - f.began) * 1000 if f.began else None,
            "render_start_ms": (render_began - origin) * 1000}


def _worker_began(f: session.Pending, decoded: dict[int, dict | str], received: float, ms: float) -> float:
    """When f's worker began rendering it: the time.monotonic() its result reports (the
    clock the machine's processes share; after the blocks before it in a bundle), or, from a
    worker whose clock is not this one, its render's length before the answer arrived."""
    job = decoded.get(f.job_id)
    at = job.get("at") if isinstance(job, dict) else None
    if isinstance(at, (int, float)) and f.part is not None:
        at += sum(part.get("ms") or 0 for part in job.get("bundle", [])[:f.part] if isinstance(part, dict))
    if isinstance(at, (int, float)) and f.submitted <= at <= received:
        return at
    return received - ms / 1000


# Why a fragment came back without HTML. The block's {% fallback %} stands in for a block that
# failed or ran out of time; a block that was never rendered (no capacity, a router going
# away, a worker running other code) is simply rendered by the master.
FAILED, TIMED_OUT, NOT_RENDERED = "failed", "timed out", "not rendered"


def _result(
    f: session.Pending, answer: Any, decoded: dict[int, dict | str], binding: bytes
) -> tuple[dict | None, str, str]:
    """What the answer to f's job says of f: (result, "", "") or (None, why, kind).

    decoded caches each job's parsed result (or why it could not be read), for the blocks
    that share a bundle's job. binding: the node binding the job was sealed for; only a
    result sealed with the job's identity and expiry is read.
    """
    if answer is None:
        return None, "no answer before the page deadline", TIMED_OUT
    if answer.type == p.TIMEOUT:
        return None, "timed out", TIMED_OUT
    if answer.type == p.BUSY:
        return None, ("no idle worker" if f.nested else "the router queue is full"), NOT_RENDERED
    if answer.type == p.ERROR:
        why = "router error: " + answer.payload.decode("utf-8", "replace")
        return None, why, FAILED if answer.flags == p.ERROR_WORKER_LOST else NOT_RENDERED
    result = decoded.get(f.job_id)
    if result is None:
        try:
            result = orjson.loads(sealing.open_result(binding, answer.payload, f.identity, f.expiry_ms))
        except sealing.Refused as exc:
            _refused(exc, f"the result of block {f.node.label}")
            result = f"bad result: {exc}"
        except orjson.JSONDecodeError as exc:
            result = f"bad result: {exc}"
        if not isinstance(result, (dict, str)):
            result = "bad result: not an object"
        decoded[f.job_id] = result
    if isinstance(result, str):  # why the job's answer could not be read
        return None, result, NOT_RENDERED
    if f.part is not None:
        parts = result.get("bundle")
        if not isinstance(parts, list):
            # The bundle failed as a whole (e.g. its result was too large to send back).
            kind = NOT_RENDERED if result.get("master_only") else FAILED
            return None, f"worker error: {result.get('error', 'no result for the bundle')}", kind
        part = parts[f.part] if f.part < len(parts) else None
        if not isinstance(part, dict):
            return None, "bad result: the bundle's answer lacks this block", NOT_RENDERED
        part["pid"] = result.get("pid")  # the job's, as for a block of its own (the dict is this page's)
        result = part
    if not result.get("ok"):  # no HTML to stitch (a worker's refusal carries no nonce)
        return _failed(f, result, "worker error")
    if result.get("n") != f.nonce:
        # Never stitch a fragment into a page it was not rendered for.
        logger.error("result for %s carried the wrong nonce; discarded", f.node.label)
        return None, "result belongs to another request", NOT_RENDERED
    return result, "", ""


def _failed(f: session.Pending, result: dict, where: str) -> tuple[None, str, str]:
    """What a result that is not ok (a failed or refused block) says of f."""
    kind = NOT_RENDERED if result.get("master_only") else FAILED
    if result.get("effect"):
        # It changes the request (session, messages): only the master's request keeps that.
        f.node.learned_reason = str(result.get("error", "it changes the request"))
    return None, f"{where}: {result.get('error', '?')}", kind


def _local_result(f: session.Pending) -> tuple[dict | None, str, str]:
    """What became of f in a thread of this master (parallel_render.threads), by its deadline."""
    try:
        result = f.local.result(timeout=max(0.0, f.deadline - time.monotonic()))
    except FutureTimeout:
        return None, "timed out", TIMED_OUT
    except Exception as exc:  # the thread could not even report a failure
        return None, f"master thread error: {type(exc).__name__}: {exc}", FAILED
    if not result.get("ok"):
        return _failed(f, result, "master thread error")
    return result, "", ""
