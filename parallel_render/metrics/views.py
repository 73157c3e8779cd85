"""The metrics as a Django view: `path("metrics/", parallel_render.metrics.views.metrics)`.

The view shows what the whole node counted (in multiprocess mode) and the router's STATS: guard
it as any internal page (a URL only the scraper reaches, or a decorator of the site's own).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from parallel_render.metrics import exposition


def metrics(request: HttpRequest) -> HttpResponse:
    body, content_type = exposition(accept=request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)
