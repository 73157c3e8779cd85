import os
import time

from django import template

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
