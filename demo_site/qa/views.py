"""The question page: the skeleton is rendered here, the independent parts in parallel."""

import json
import os
import time
from urllib.parse import urlencode

from django.contrib.auth import get_user_model
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string

from parallel_render.streaming import StreamingTemplateResponse
from parallel_render.waterfall import recording, render_waterfall

from .models import Question

MAX_LATENCY_MS = 2000
LATENCY_CHOICES = (0, 20, 100)


def _latency(request: HttpRequest) -> int:
    try:
        value = int(request.GET.get("latency", "0"))
    except ValueError:
        return 0
    return max(0, min(value, MAX_LATENCY_MS))


def _cache_seconds(request: HttpRequest) -> int:
    try:
        return max(0, min(int(request.GET.get("cache", "0")), 3600))
    except ValueError:
        return 0


def _query(latency: int, serial: bool) -> str:
    params = {}
    if latency:
        params["latency"] = latency
    if serial:
        params["serial"] = 1
    return "?" + urlencode(params) if params else ""


def index(request: HttpRequest) -> HttpResponse:
    first = Question.objects.order_by("pk").first()
    if first is None:
        return render(request, "qa/empty.html")
    return redirect("qa:question", pk=first.pk)


def _question_context(request: HttpRequest, pk: int) -> dict:
    """What the question page's blocks read: the question, its answers, querysets for the side."""
    question = get_object_or_404(Question.objects.select_related("author", "author__profile"), pk=pk)
    latency = _latency(request)
    serial = request.GET.get("serial") not in (None, "", "0")
    topics = list(question.topics.all())
    topic_ids = [topic.pk for topic in topics]

    # Model instances (with their select_related caches) travel to the workers as they are.
    answers = list(question.answers.select_related("author", "author__profile"))

    # Unevaluated querysets: each one runs in the worker that renders its block.
    related = (
        Question.objects.filter(topics__in=topic_ids)
        .exclude(pk=question.pk)
        .annotate(shared_topics=Count("topics", distinct=True))
        .order_by("-shared_topics", "-view_count", "pk")[:8]
    )
    top_writers = (
        get_user_model()
        .objects.filter(answers__question__topics__in=topic_ids)
        # prefetch, not select_related: a plain queryset runs in the worker, not here.
        .prefetch_related("profile")
        # Filtering before annotating counts only the answers in these topics.
        .annotate(answer_count=Count("answers", distinct=True))
        .order_by("-answer_count", "username")[:5]
    )

    previous_q = Question.objects.filter(pk__lt=question.pk).order_by("-pk").only("pk").first()
    next_q = Question.objects.filter(pk__gt=question.pk).order_by("pk").only("pk").first()

    context = {
        "question": question,
        "topics": topics,
        "answers": answers,
        "related": related,
        "top_writers": top_writers,
        "latency": latency,
        # ?cache=SECONDS caches the blocks for that long (parallel_bench cache measures it); off by default.
        "cache_seconds": _cache_seconds(request),
        "serial": serial,
        "master_pid": os.getpid(),
        # Query string that keeps the current mode and latency, for links inside blocks.
        "mode_query": _query(latency, serial),
        "parallel_query": _query(latency, False),
        "serial_query": _query(latency, True),
        "latency_links": [(ms, _query(ms, serial)) for ms in LATENCY_CHOICES],
        "previous_q": previous_q,
        "next_q": next_q,
    }
    return context


def question_blocks(request: HttpRequest, pk: int) -> HttpResponse:
    """The question page without its first screen: the same blocks, nothing measured or timed,
    so the page is the same whichever way it renders (`parallel_bench load`'s mixed page)."""
    return render(request, "qa/question_blocks.html", _question_context(request, pk))


def question_stream(request: HttpRequest, pk: int) -> HttpResponse:
    """The same page as question_blocks, streamed: the browser gets the question at once, then
    each answer and side box as its block arrives, in page order (parallel_render.streaming;
    `parallel_bench stream` compares the two)."""
    return StreamingTemplateResponse(request, "qa/question_blocks.html", _question_context(request, pk))


def question_detail(request: HttpRequest, pk: int) -> HttpResponse:
    context = _question_context(request, pk)
    serial = context["serial"]
    # The blocks' part of the page first, timed, with the records of its blocks: the page's
    # first screen shows that time, the same page's other mode (fetched by its script) and
    # the waterfall.
    with recording(request) as records:
        started = time.perf_counter()
        body = render_to_string("qa/question_body.html", context, request)
        render_ms = (time.perf_counter() - started) * 1000
    other = request.GET.copy()
    if serial:
        other.pop("serial", None)
    else:
        other["serial"] = "1"
    context.update({
        "body": body,
        "render_ms": render_ms,
        "block_count": len(records),
        "workers": len({r.pid for r in records if r.pid}),
        "waterfall_html": "" if serial else render_waterfall(records),
        "compare_url_json": json.dumps(request.path + "?" + other.urlencode()).replace("<", "\\u003c"),
    })
    response = render(request, "qa/question.html", context)
    response["Server-Timing"] = f'page;dur={render_ms:.1f};desc="the page\'s blocks rendered and stitched"'
    return response


def show_toolbar(request: HttpRequest) -> bool:
    """django-debug-toolbar on pages opened with ?toolbar=1 (and its own requests)."""
    from django.conf import settings

    return settings.DEBUG and (request.GET.get("toolbar") == "1" or request.path.startswith("/__debug__/"))


def trivial(request: HttpRequest) -> HttpResponse:
    """N trivial blocks: measures what the plugin costs when blocks do no work at all."""
    n = max(1, min(int(request.GET.get("n", "20") or 20), 500))
    return render(request, "qa/trivial.html", {"rows": [{"i": i, "label": f"row {i}"} for i in range(n)]})
