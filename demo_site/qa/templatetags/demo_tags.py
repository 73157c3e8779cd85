"""Tags and filters of the demo's templates.

Every tag here writes its output directly (no ``as var`` forms): assignments inside a
``{% parallel %}`` block would make the plugin render the block inline.
"""

import os
import re
import time

from django import template
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db.models import Avg, Count, Max
from django.utils.html import conditional_escape, format_html
from django.utils.safestring import mark_safe

from demo_site.qa.models import Answer, Comment, Question, Topic, Vote

register = template.Library()

MAX_LATENCY_MS = 5000
STAT_CACHE_SECONDS = 60


@register.simple_tag
def simulated_io(latency) -> str:
    """Sleep ``latency`` milliseconds, standing in for a slow database or cache call."""
    try:
        ms = int(latency or 0)
    except (TypeError, ValueError):
        ms = 0
    if ms > 0:
        time.sleep(min(ms, MAX_LATENCY_MS) / 1000)
    return ""


@register.simple_tag
def rendered_by() -> str:
    """The pid of the process rendering this spot of the page."""
    return f"pid {os.getpid()}"


def _total_words() -> int:
    # Deliberately CPU-heavy: that is what the cache in front of it is for.
    return sum(len(body.split()) for body in Answer.objects.values_list("body", flat=True))


def _top_topic() -> str:
    topic = Topic.objects.annotate(n=Count("questions")).order_by("-n", "name").first()
    return f"{topic.name} ({topic.n} questions)" if topic else "none"


_STATS = {
    "users": lambda: get_user_model().objects.count(),
    "topics": lambda: Topic.objects.count(),
    "questions": lambda: Question.objects.count(),
    "answers": lambda: Answer.objects.count(),
    "comments": lambda: Comment.objects.count(),
    "votes": lambda: Vote.objects.count(),
    "upvote_share": lambda: f"{Vote.objects.filter(value=Vote.UP).count() / (Vote.objects.count() or 1):.0%}",
    "avg_answers": lambda: f"{Question.objects.annotate(n=Count('answers')).aggregate(a=Avg('n'))['a'] or 0:.1f}",
    "avg_score": lambda: f"{Answer.objects.aggregate(a=Avg('score'))['a'] or 0:.1f}",
    "best_score": lambda: Answer.objects.aggregate(m=Max("score"))["m"] or 0,
    "total_words": _total_words,
    "top_topic": _top_topic,
}


def _compute(name: str):
    compute = _STATS.get(name)
    if compute is None:
        raise template.TemplateSyntaxError(f"Unknown statistic {name!r}; known: {', '.join(sorted(_STATS))}")
    return compute()


@register.simple_tag
def stat(name: str):
    """A site-wide count or aggregate, computed with a fresh query."""
    return _compute(name)


@register.simple_tag
def cached_stat(name: str):
    """The same as ``stat`` but read through Django's cache (``cache.get_or_set``)."""
    return cache.get_or_set(f"qa:stat:{name}", lambda: _compute(name), STAT_CACHE_SECONDS)


_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)(.+?)(?<=\S)\*(?![*\w])")
_CODE = re.compile(r"`([^`\n]+)`")
_BULLET = re.compile(r"^\s*[-*] +")


def _inline(text: str) -> str:
    text = _CODE.sub(r"<code>\1</code>", text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    return _ITALIC.sub(r"<em>\1</em>", text)


@register.filter(is_safe=True, needs_autoescape=True)
def markdownish(value, autoescape=True):
    """A tiny Markdown: paragraphs, ``- `` lists, ``> `` quotes, ``## `` headings,
    ``**bold**``, ``*italic*`` and ```code```. The text is escaped first."""
    text = str(conditional_escape(value) if autoescape else value)
    text = text.replace("\r\n", "\n").strip()
    blocks = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines:
            continue
        if all(_BULLET.match(line) for line in lines):
            items = "".join(f"<li>{_inline(_BULLET.sub('', line))}</li>" for line in lines)
            blocks.append(f"<ul>{items}</ul>")
        elif all(line.startswith("&gt; ") for line in lines):
            quote = "<br>".join(_inline(line[5:]) for line in lines)
            blocks.append(f"<blockquote>{quote}</blockquote>")
        elif len(lines) == 1 and lines[0].startswith("## "):
            blocks.append(f"<h4>{_inline(lines[0][3:])}</h4>")
        else:
            blocks.append("<p>" + "<br>".join(_inline(line) for line in lines) + "</p>")
    return mark_safe("\n".join(blocks))


@register.simple_tag
def upvoted_by(answer) -> str:
    """``Upvoted by A, B and C`` for the first upvoters of an answer (one query)."""
    names = [user.get_full_name() or user.get_username() for user in answer.top_upvoters()]
    if not names:
        return ""
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return format_html("<span>Upvoted by {}</span>", text)


@register.filter
def reading_time(value) -> str:
    """``"3 min read"`` at 200 words a minute."""
    minutes = max(1, round(len(str(value).split()) / 200))
    return f"{minutes} min read"


@register.filter
def initials(user) -> str:
    first = (getattr(user, "first_name", "") or "")[:1]
    last = (getattr(user, "last_name", "") or "")[:1]
    return (first + last).upper() or str(user)[:1].upper()
