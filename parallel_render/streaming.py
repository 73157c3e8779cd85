"""Opt-in streaming: send the page up to its first unfinished block at once, then each
following part as soon as its blocks are in, in document order (docs/streaming.md).

A view opts in by returning a StreamingTemplateResponse (a TemplateResponse; or set
`response_class = StreamingTemplateResponse` on a class-based view), or with the
@stream_blocks decorator on a view that returns a TemplateResponse. Its template then
renders with the placeholders of its sent blocks left in, and ParallelRenderMiddleware
answers with a StreamingHttpResponse whose body is the skeleton with each block stitched in
as it arrives: the same bytes as the buffered page, sent sooner.

The status and headers are those of the view's response, decided before the first byte: no
Content-Length, and Server-Timing without the per-block entries (blocks finish after the
headers left). A block that fails or times out after that gets its fallback or is rendered
here, as on a buffered page. Where a middleware that needs the whole body wraps ours
(GZipMiddleware, ConditionalGetMiddleware), the page is served buffered, and the log says
why once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpResponseBase, StreamingHttpResponse
from django.template.response import SimpleTemplateResponse, TemplateResponse

from parallel_render import cache as fragment_cache
from parallel_render import rendering, session

logger = logging.getLogger("parallel_render")

V = TypeVar("V", bound=Callable[..., Any])

# Reasons already logged, so each is said once per process.
_logged: set[str] = set()


def _log_once(message: str, *args: Any) -> None:
    text = message % args
    if text not in _logged:
        _logged.add(text)
        logger.info("%s", text)


class StreamingTemplateResponseMixin:
    """Makes a SimpleTemplateResponse subclass stream its page's blocks.

    Under a render session (ParallelRenderMiddleware), the template renders with the
    placeholders of the blocks it sent left in; the middleware stitches them while it streams.
    Anywhere else (no session, streaming declined) it renders like its base class.
    """

    streams_blocks = True

    @property
    def rendered_content(self) -> str:
        template = self.resolve_template(self.template_name)  # type: ignore[attr-defined]
        context = self.resolve_context(self.context_data)  # type: ignore[attr-defined]
        request = getattr(self, "_request", None)
        current = session.current()
        if current is None or current.nested or not current.stitch or declined() is not None:
            return template.render(context, request)
        current.streaming = True
        try:
            return rendering.render_unstitched(template, context, request)
        finally:
            current.streaming = False


class StreamingTemplateResponse(StreamingTemplateResponseMixin, TemplateResponse):
    """A TemplateResponse whose page is streamed block by block (see the module's docstring)."""


@functools.cache
def _streaming_class(cls: type[SimpleTemplateResponse]) -> type[SimpleTemplateResponse]:
    if cls is TemplateResponse:
        return StreamingTemplateResponse
    return type(f"Streaming{cls.__name__}", (StreamingTemplateResponseMixin, cls), {"__module__": cls.__module__})


def stream_blocks(view: V) -> V:
    """Stream the blocks of the TemplateResponse this view returns (sync or async view).

    A response that is already rendered (e.g. from django.shortcuts.render()) cannot leave
    its placeholders in any more: it is served buffered, and the log says so once per view.
    """

    def opt_in(response: Any) -> Any:
        if isinstance(response, SimpleTemplateResponse) and not response.is_rendered:
            if not isinstance(response, StreamingTemplateResponseMixin):
                response.__class__ = _streaming_class(type(response))
        elif not isinstance(response, StreamingTemplateResponseMixin):
            _log_once(
                "%s.%s returned a %s, not an unrendered TemplateResponse: its page is not streamed",
                view.__module__,
                getattr(view, "__qualname__", view),
                type(response).__name__,
            )
        return response

    if iscoroutinefunction(view):

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return opt_in(await view(*args, **kwargs))

        wrapped: Any = functools.wraps(view)(async_wrapper)
    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return opt_in(view(*args, **kwargs))

        wrapped = functools.wraps(view)(wrapper)
    wrapped.streams_blocks = True  # for the system check (streaming_views)
    return wrapped  # type: ignore[no-any-return]


def declined() -> str | None:
    """Why no page of this site can be streamed (logged once), or None when pages can be."""
    from django.conf import settings

    why = _declined(tuple(getattr(settings, "MIDDLEWARE", None) or ()))
    if why is not None:
        _log_once("streaming declined, pages are served buffered: %s", why)
    return why


def streaming_views() -> list[str]:
    """The URL patterns whose views are known to stream: decorated with @stream_blocks, or
    class-based with a StreamingTemplateResponse response_class (a function view that returns
    one is only known when it runs)."""
    from django.urls import URLPattern, URLResolver, get_resolver

    found: list[str] = []

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern) and _streams(pattern.callback):
                found.append(prefix + str(pattern.pattern))

    walk(get_resolver().url_patterns, "")
    return found


def _streams(view: Any) -> bool:
    if getattr(view, "streams_blocks", False):
        return True
    response_class = getattr(getattr(view, "view_class", None), "response_class", None)
    return isinstance(response_class, type) and issubclass(response_class, StreamingTemplateResponseMixin)


def body_middleware_around_ours(middleware: tuple[str, ...]) -> str | None:
    """The first middleware that needs the whole body and wraps ParallelRenderMiddleware."""
    why = _declined(middleware)
    return why.split(" ", 1)[0] if why is not None and why.endswith("needs the whole body") else None


@functools.cache
def _declined(middleware: tuple[str, ...]) -> str | None:
    from django.utils.module_loading import import_string

    from parallel_render.checks import BODY_MIDDLEWARE, MIDDLEWARE_PATH
    from parallel_render.middleware import ParallelRenderMiddleware

    def load(path: str) -> Any:
        try:
            return import_string(path)
        except ImportError:
            return None

    classes = [load(path) for path in middleware]
    ours = next(
        (i for i, cls in enumerate(classes) if isinstance(cls, type) and issubclass(cls, ParallelRenderMiddleware)),
        None,
    )
    if ours is None:
        return f"{MIDDLEWARE_PATH} is not in MIDDLEWARE"
    body = tuple(cls for cls in map(load, BODY_MIDDLEWARE) if isinstance(cls, type))
    for path, cls in zip(middleware[:ours], classes[:ours], strict=True):
        if path in BODY_MIDDLEWARE or (isinstance(cls, type) and issubclass(cls, body)):
            return f"{path} wraps {middleware[ours]} in MIDDLEWARE and needs the whole body"
    return None


def defer(node: Any, current: session.RenderSession, context: Any, why: str, frame: Any, began: float) -> str | None:
    """On a streamed page, a block the dispatch policy keeps in the master (no idle worker,
    every CPU busy) becomes a placeholder, rendered by the master from the values captured now
    once the page's first part is sent, rather than before it; None where it must render in
    place (anything that keeps a block from being sent keeps it from being deferred).

    The stream renders deferred blocks while it waits for a worker's, so the master's share of
    the page overlaps the workers' as it does on a buffered page.
    """
    from parallel_render import codec
    from parallel_render.fragments import capture_env

    if node.reason_inline(context, frame) is not None:
        return None
    try:
        values = node.capture_values(context)
    except codec.Unsendable:
        return None
    env = capture_env(context)
    if env is None:
        return None
    index = len(current.fragments)
    now = time.monotonic()
    pending = session.Pending(
        index=index, job_id=0, node=node, values=values, env=env, template=context.template,
        nonce=f"{current.token}:{index}", submitted=now, deadline=now + node.resolve_timeout(context),
        nested=current.nested, unsent=why, began=began, deferred=True,
    )  # fmt: skip
    current.fragments.append(pending)
    return current.placeholder(index)


def wants_stream(response: HttpResponseBase, current: session.RenderSession) -> bool:
    """Whether the middleware should stream this response: it opted in, and blocks are out."""
    return bool(getattr(response, "streams_blocks", False)) and not response.streaming and current.unresolved()


def stream(current: session.RenderSession, response: Any, asynchronous: bool = False) -> StreamingHttpResponse:
    """The view's response as a StreamingHttpResponse: its status, headers and cookies, and a
    body that stitches the page's blocks in document order as they arrive."""
    from parallel_render.middleware import server_timing_enabled

    current.send_bundle()  # the cheap blocks still waiting go out before the first byte
    fragment_cache.resolve_lookups(current)  # cached blocks: hits in the first chunk, misses out now
    body = BlockStream(current, response.content, response.charset)
    streamed = StreamingHttpResponse(status=response.status_code)
    streamed.headers = response.headers
    streamed.headers.pop("Content-Length", None)
    # nginx buffers a proxied response whole unless told not to: this one is worth sending as it comes.
    streamed.headers.setdefault("X-Accel-Buffering", "no")
    streamed.cookies = response.cookies
    streamed._charset = response._charset
    if response._reason_phrase is not None:
        streamed.reason_phrase = response._reason_phrase
    streamed._resource_closers.extend(response._resource_closers)
    for name in ("template_name", "context_data"):
        if hasattr(response, name):
            setattr(streamed, name, getattr(response, name))
    if current.timings and server_timing_enabled():
        streamed.headers["Server-Timing"] = ", ".join(
            [*filter(None, [streamed.headers.get("Server-Timing")]), *current.timings]
        )
    if server_timing_enabled():
        entry = (
            f"pr-stream;dur={(time.monotonic() - current.started) * 1000:.1f};"
            f'desc="{len(body.pending)} blocks streamed after the headers"'
        )
        existing = streamed.headers.get("Server-Timing")
        streamed.headers["Server-Timing"] = f"{existing}, {entry}" if existing else entry
    if asynchronous:
        streamed.streaming_content = body.chunks_async()
        streamed._resource_closers.append(body.close)
    else:
        streamed.streaming_content = body
    return streamed


class BlockStream:
    """The body of a streamed page: the rendered skeleton, cut at its placeholders, with each
    block's HTML put in as it is gathered (middleware.gather, so a block that failed or timed
    out gets its fallback or is rendered here, as on a buffered page).

    Everything it sends has been written since the last wait: what is ready goes out in one
    chunk just before the stream would wait for a block. close() (the server calls it at the
    end, or when the client went away) cancels the jobs of blocks not gathered yet.
    """

    def __init__(self, current: session.RenderSession, content: bytes, charset: str) -> None:
        self.current = current
        self.content = content
        self.charset = charset
        # The blocks not gathered yet, by index (a block gathered by a render is in current.html).
        self.pending: dict[int, session.Pending] = {
            f.index: f for f in current.fragments[current.resolved :] if f.index not in current.html
        }
        current.resolved = len(current.fragments)  # gathered here, not by middleware.resolve
        self.finished = False
        self.closing = False
        self._chunks = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    async def chunks_async(self) -> AsyncIterator[bytes]:
        """The same chunks for an ASGI server: each wait happens in a thread, off the event loop."""
        step = sync_to_async(next, thread_sensitive=False)
        while True:
            chunk = await step(self._chunks, None)
            if chunk is None:
                return
            yield chunk

    def _generate(self) -> Iterator[bytes]:
        from parallel_render.middleware import report_stitched

        current, client = self.current, self.current.client
        html = current.html
        out: list[bytes] = []
        at = 0
        try:
            for match in current.pattern().finditer(self.content):
                if self.closing:
                    return
                out.append(self.content[at : match.start()])
                at = match.end()
                index = int(match.group(1))
                f = self.pending.get(index)
                if f is not None:
                    if not (f.job_id and client.answered([f.job_id])):
                        if out:
                            report_stitched(current)
                            yield b"".join(out)
                            out = []
                        # While a worker finishes this one, the master renders its own share.
                        while f.job_id and not client.answered([f.job_id]):
                            later = next((g for g in self.pending.values() if g.deferred and g.index > index), None)
                            if later is None:
                                break
                            self._gather(later)
                    self._gather(f)
                out.append(html[index].encode(self.charset) if index in html else match.group(0))
            out.append(self.content[at:])
            self._cancel("its placeholder is not in the page")
            self.finished = True
            report_stitched(current)
            yield b"".join(out)
        except GeneratorExit:
            raise
        except Exception:
            logger.exception(
                "a block of a streamed page failed after the headers were sent; the stream "
                "ends without its last chunk, so the client sees an incomplete response"
            )
            raise
        finally:
            if not self.finished:
                self.finished = True
                self._cancel("the stream ended before them")

    def _gather(self, f: session.Pending) -> None:
        """Gather f and the blocks that share its job (a bundle's blocks come back together)."""
        from parallel_render.middleware import NOT_RENDERED, _render_here, gather

        if f.deferred:
            del self.pending[f.index]
            self.current.html[f.index] = _render_here(f, f.unsent, NOT_RENDERED, self.current, measure=True)[0]
            return
        group = [g for g in self.pending.values() if g.job_id == f.job_id] if f.job_id else [f]
        for g in group:
            del self.pending[g.index]
        html, _timings = gather(self.current, group, timed=False)
        self.current.html.update(html)

    def _cancel(self, why: str) -> None:
        """Forget the blocks not gathered; tell the router, so no worker renders them for nobody."""
        pending, self.pending = self.pending, {}
        jobs = sorted({f.job_id for f in pending.values() if f.job_id})
        if jobs:
            logger.info("streamed page: %d blocks not gathered (%s); cancelling their jobs", len(pending), why)
            self.current.client.cancel(jobs)
        if self.current.held:
            from parallel_render import signals

            signals.send_stitched(self.current.held, None)

    def close(self) -> None:
        """The server is done with the body: cancel what was not gathered (idempotent)."""
        self.closing = True
        try:
            self._chunks.close()
        except ValueError:
            # It is running in another thread (an ASGI server gave up on the client): it
            # stops, and cancels the rest, at its next block.
            return
        if not self.finished:
            self.finished = True
            self._cancel("the response was closed before it was sent")
