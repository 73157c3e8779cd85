"""Every render through Django's template backend returns its page whole.

`render()`, `render_to_string()`, `TemplateResponse` and `get_template(...).render()` all go
through `django.template.backends.django.Template.render`. While a render session is active,
the blocks a render sent to workers are gathered and stitched into its output before it
returns, so what a view then does with the HTML (embed it in JSON, escape it, cut it up)
sees the finished page, never a placeholder. The middleware only adds the Server-Timing
header, and stitches whatever a render could not (see below).

A streamed page (parallel_render.streaming) is the one render that leaves its placeholders
in on purpose: the middleware stitches them as it sends the page, block by block.

One exception: an async view that calls `render()` on the event loop itself. Waiting for
workers there would block the loop, so that render leaves its placeholders to the
middleware, which waits in a thread, as it always did.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from django.utils.safestring import SafeString, mark_safe

from parallel_render import session

_ORIGINAL_ATTR = "_parallel_render_original"


def install() -> None:
    """Wrap the Django template backend's render (once; AppConfig.ready calls this)."""
    from django.template.backends.django import Template

    if hasattr(Template.render, _ORIGINAL_ATTR):
        return
    original = Template.render

    def render(self: Any, context: Any = None, request: Any = None) -> Any:
        html = original(self, context, request)
        current = session.current()
        if current is None or not current.fragments or not current.stitch or _on_event_loop():
            return html
        if _unstitched.get() is self:
            return html
        from parallel_render.middleware import stitch_text

        done = stitch_text(current, html)
        return mark_safe(done) if isinstance(html, SafeString) else done

    setattr(render, _ORIGINAL_ATTR, original)
    render.__doc__ = original.__doc__
    Template.render = render  # type: ignore[method-assign]


def render_unstitched(template: Any, context: Any = None, request: Any = None) -> Any:
    """template.render(), leaving the placeholders of the blocks it sends in its output: a
    streamed page stitches them as they arrive (parallel_render.streaming). Only this render
    of this template is left unstitched; renders inside it still stitch their own blocks."""
    token = _unstitched.set(template)
    try:
        return template.render(context, request)
    finally:
        _unstitched.reset(token)


# The template whose render (through the wrapper below) leaves its placeholders in.
_unstitched: contextvars.ContextVar[Any] = contextvars.ContextVar("parallel_render_unstitched", default=None)


def render_code() -> Any:
    """The code object of the wrapped render: a block rendered under it is stitched by it."""
    from django.template.backends.django import Template

    install()
    return Template.render.__code__


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
