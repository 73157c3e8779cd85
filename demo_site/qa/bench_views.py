"""Pages for `manage.py parallel_bench load`: one I/O-bound, one CPU-bound.

Their HTML is the same whether the page is rendered serially or in parallel (no pids, no
clocks, no tokens), so the benchmark can check every response against the serial one. The
skeleton does a little real work of its own (a table computed in the view and rendered by
the master); the blocks do the work the page is named for, inside their own rendering.
"""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

MAX_BLOCKS = 64
MAX_MS = 1000
SKELETON_ROWS = 40
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def _param(request: HttpRequest, name: str, default: int, high: int) -> int:
    try:
        value = int(request.GET.get(name, default))
    except ValueError:
        return default
    return max(0, min(value, high))


def _skeleton_rows() -> list[dict]:
    rows = []
    for i in range(SKELETON_ROWS):
        digits = [int(d) for d in str(2**(i + 20))]
        rows.append({"n": i, "label": " ".join(WORDS[d] for d in digits[:4]), "total": sum(digits), "ratio": sum(digits) / len(digits)})
    return sorted(rows, key=lambda row: (-row["total"], row["n"]))


def _page(request: HttpRequest, template: str, title: str, default_blocks: int, default_ms: int) -> HttpResponse:
    count = max(1, _param(request, "blocks", default_blocks, MAX_BLOCKS))
    ms = _param(request, "ms", default_ms, MAX_MS)
    blocks = [{"n": i, "title": f"block {i + 1} of {count}", "words": [WORDS[(i + k) % len(WORDS)] for k in range(8)]}
              for i in range(count)]
    return render(request, template, {"title": title, "blocks": blocks, "ms": ms, "rows": _skeleton_rows()})


def io_page(request: HttpRequest) -> HttpResponse:
    """`?blocks=6&ms=20`: each block waits `ms` on simulated I/O (a sleep, as a slow query would)."""
    return _page(request, "qa/bench/io.html", "I/O-bound", 6, 20)


def cpu_page(request: HttpRequest) -> HttpResponse:
    """`?blocks=4&ms=10`: each block burns about `ms` of pure-Python CPU while it renders."""
    return _page(request, "qa/bench/cpu.html", "CPU-bound", 4, 10)
