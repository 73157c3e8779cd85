import datetime
import decimal
import uuid

from django.shortcuts import render
from django.template.response import TemplateResponse
from django.utils.safestring import mark_safe

from tests.testapp.models import Article, Author


def common_context(request):
    return {
        "title": request.GET.get("title", "Hello <world> & \"friends\""),
        "items": [{"name": f"item {i}", "n": i, "html": "<b>bold</b>"} for i in range(int(request.GET.get("n", 5)))],
        "numbers": list(range(10)),
        "nested": {"a": {"b": ["x", ("y", 2), None]}, "flag": True},
        "price": decimal.Decimal("12.50"),
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 2, 29),
        "ident": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "safe_html": mark_safe("<em>trusted</em>"),
        "unsafe_html": "<script>alert(1)</script>",
        "sleep": float(request.GET.get("sleep", 0)),
        "ms": float(request.GET.get("ms", 0)),
        "marker": request.GET.get("marker", ""),
        "fail": int(request.GET.get("fail", -1)),
        "gate": request.GET.get("gate", ""),
    }


def page(request, name):
    ctx = common_context(request)
    if Author.objects.exists():
        ctx["articles"] = list(Article.objects.select_related("author").prefetch_related("tags"))
        ctx["article_qs"] = Article.objects.filter(price__gte=0)
        ctx["first_author"] = Author.objects.first()
    if request.GET.get("unsendable"):
        ctx["thing"] = object()
    response = render(request, f"t/{name}.html", ctx)
    if request.GET.get("content_length"):
        response["Content-Length"] = str(len(response.content))  # as a middleware inside ours might
    return response


def page_tr(request, name):
    return TemplateResponse(request, f"t/{name}.html", common_context(request))


def json_view(request):
    from django.http import JsonResponse
    from django.template.loader import render_to_string

    html = render_to_string("t/render_to_string_inner.html", common_context(request), request)
    return JsonResponse({"html": html})


def effects(request):
    """A page whose block writes the session and adds a message (see t/effects.html)."""
    context = common_context(request)
    context["visits"] = request.session.get("k", "none")
    return render(request, "t/effects.html", context)


def json_of_render(request):
    """A view that reuses render()'s output: the HTML travels inside a JSON document."""
    from django.http import JsonResponse

    page = render(request, "t/leak.html", common_context(request))
    return JsonResponse({"html": page.content.decode(), "length": len(page.content)})


def form_view(request):
    from django.http import HttpResponse

    if request.method == "POST":
        return HttpResponse("posted " + request.POST["x"])
    return render(request, "t/form.html", common_context(request))


# The property-based test sets the context its generated template renders with.
GENERATED_CONTEXT: dict = {}


def generated(request, name):
    return render(request, name, GENERATED_CONTEXT)


def generated_streamed(request, name):
    """A generated template (tests/test_streaming.py) as a streamed page."""
    from parallel_render.streaming import StreamingTemplateResponse

    return StreamingTemplateResponse(request, name, GENERATED_CONTEXT)


def from_string(request):
    from django.template import engines

    template = engines["django"].from_string("{% load parallel %}{% parallel %}inline from string{% endparallel %}")
    return TemplateResponse(request, template, {})


async def async_page(request, name):
    """An async view: renders in the event loop's thread, stitched by the async middleware."""
    return render(request, f"t/{name}.html", common_context(request))


def page_streamed(request, name):
    """The page of t/<name>.html, streamed block by block (parallel_render.streaming)."""
    from parallel_render.streaming import StreamingTemplateResponse

    return StreamingTemplateResponse(request, f"t/{name}.html", common_context(request))


def _page_decorated(request, name):
    return TemplateResponse(request, f"t/{name}.html", common_context(request))


def _render_decorated(request, name):
    return render(request, f"t/{name}.html", common_context(request))


def _streamed_view():
    from django.views.generic import TemplateView

    from parallel_render.streaming import StreamingTemplateResponse, stream_blocks

    class StreamedPage(TemplateView):
        response_class = StreamingTemplateResponse

        def get_template_names(self):
            return [f"t/{self.kwargs['name']}.html"]

        def get_context_data(self, **kwargs):
            return common_context(self.request)

    async def async_streamed(request, name):
        return StreamingTemplateResponse(request, f"t/{name}.html", common_context(request))

    return (
        stream_blocks(_page_decorated),
        StreamedPage.as_view(),
        stream_blocks(_render_decorated),
        stream_blocks(async_streamed),
    )


page_stream_decorated, page_stream_cbv, page_stream_rendered, async_page_streamed = _streamed_view()


def outstanding(request):
    """This process's jobs still owed to its pages (RouterClient.outstanding), as JSON."""
    from django.http import JsonResponse

    from parallel_render import conf
    from parallel_render.client import get_client

    config = conf.get_config()
    return JsonResponse(get_client(config["ROUTER"], config["MAX_PAYLOAD"]).outstanding()._asdict())


def pages_on_node(request):
    """After ?sleep= seconds: this process's pid and the pages in flight in it and on its node
    (and the response's close takes ?linger= seconds)."""
    import os
    import time

    from django.http import JsonResponse

    from parallel_render import policy

    time.sleep(float(request.GET.get("sleep", "0")))
    response = JsonResponse({"pid": os.getpid(), "here": policy.pages_in_flight.count,
                             "node": policy.pages_in_flight.on_node()})
    linger = float(request.GET.get("linger", "0"))
    if linger:  # the thread goes on after the last byte, as while request_finished's receivers run
        response._resource_closers.append(lambda: time.sleep(linger))
    return response
