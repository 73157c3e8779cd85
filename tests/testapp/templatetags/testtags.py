import os
import time

from django import template
from django.db.backends.signals import connection_created

register = template.Library()


@register.simple_tag
def sleep(seconds):
    time.sleep(float(seconds))
    return ""


@register.simple_tag
def pid():
    return str(os.getpid())


@register.simple_tag
def crash_worker():
    """Kills the process rendering it when that is a worker (the master never dies)."""
    if os.environ.get("PR_ROLE") == "worker" or "parallel_worker" in " ".join(__import__("sys").argv):
        os._exit(17)
    return "rendered-in-master"


@register.simple_tag
def boom():
    raise ValueError("boom")


@register.simple_tag
def cache_get(key):
    from django.core.cache import cache

    return cache.get(key, "miss")


class ShoutNode(template.Node):
    """A custom block tag that transforms what it encloses."""

    def __init__(self, nodelist):
        self.nodelist = nodelist

    def render(self, context):
        return self.nodelist.render(context).upper()


@register.tag
def shout(parser, token):
    nodelist = parser.parse(("endshout",))
    parser.delete_first_token()
    return ShoutNode(nodelist)


class ReadsContextNode(template.Node):
    """A custom tag reading a variable it was never given."""

    def render(self, context):
        return str(context.get("title", ""))


@register.tag
def reads_title(parser, token):
    return ReadsContextNode()


@register.simple_tag
def sleep_in_worker(seconds):
    """Sleeps only in a worker, so a timed-out block is rescued by the master at once."""
    if os.environ.get("PR_ROLE") == "worker" or "parallel_worker" in " ".join(__import__("sys").argv):
        time.sleep(float(seconds))
    return ""


@register.simple_tag(takes_context=True)
def escaped_include(context, name):
    """Renders another template through the backend and escapes the result, as a tag that
    shows HTML as source might: the inner blocks must be in place before the escaping."""
    from django.template.loader import render_to_string
    from django.utils.html import escape

    return escape(render_to_string(name, context.flatten(), context.get("request")))


@register.simple_tag
def remember(request, key, value):
    """A tag with side effects on the request: a session write and a message."""
    from django.contrib import messages

    request.session[key] = value
    messages.info(request, f"remembered {key}={value}")
    return f"remembered {key}"


_connections_made = 0


def _count_connection(sender, **kwargs):
    global _connections_made
    _connections_made += 1


connection_created.connect(_count_connection)


@register.simple_tag
def db_connections_made():
    """How many database connections this process has opened so far (opening one if none is)."""
    from django.db import connection

    connection.ensure_connection()
    return str(_connections_made)


@register.simple_tag
def fail_in_worker():
    """Fails only in a worker: the master renders the block again, and it works there."""
    if os.environ.get("PR_ROLE") == "worker" or "parallel_worker" in " ".join(__import__("sys").argv):
        raise ValueError("fails in a worker")
    return "rendered-in-master"


@register.simple_tag
def burn(ms):
    """Keeps the CPU busy for about ms milliseconds of this thread's CPU time."""
    end = time.thread_time() + float(ms) / 1000
    n = 0
    while time.thread_time() < end:
        n += 1
    return ""


@register.simple_tag
def gate_in_worker(path, seconds=10):
    """In a worker, waits (at most `seconds`) until the file at path exists, so a test decides
    when the block is done; elsewhere (a serial render, a rescue) returns at once.

    It takes 5 ms at least in a worker, so its block is never cheap enough to travel in a
    bundle with others (which would then wait for it too)."""
    if os.environ.get("PR_ROLE") == "worker" or "parallel_worker" in " ".join(__import__("sys").argv):
        time.sleep(0.005)
        end = time.monotonic() + float(seconds)
        while path and not os.path.exists(path) and time.monotonic() < end:
            time.sleep(0.005)
    return ""


@register.simple_tag
def tally(name):
    """Count a render of the block it is in, in whichever process renders it: appends one byte
    to a file named after `name` in the temporary directory (tests/test_fragment_cache.py)."""
    import tempfile

    if name:
        with open(os.path.join(tempfile.gettempdir(), f"pr-tally-{name}"), "a") as f:
            f.write("x")
    return ""
