"""Percentiles and tables for the benchmarks."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values) if values else float("nan"),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def ratio_interval(
    numerator: Sequence[float], denominator: Sequence[float], q: float = 99, confidence: float = 0.9,
    resamples: int = 1000, seed: int = 1,
) -> tuple[float, float]:
    """A bootstrap interval for percentile(numerator, q) / percentile(denominator, q).

    Each sample is redrawn with replacement `resamples` times; the interval holds the middle
    `confidence` of the ratios. A p99 over a few hundred requests rests on its slowest few, so
    two runs of the same code can differ by more than a target's margin: the interval says how
    far apart the two modes' p99s would have to be to tell them apart. Requests of one slice
    are not independent (a busy moment slows several), so the true interval is wider.
    """
    if not numerator or not denominator:
        return float("nan"), float("nan")
    draw = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        bottom = percentile(draw.choices(denominator, k=len(denominator)), q)
        if bottom > 0:
            ratios.append(percentile(draw.choices(numerator, k=len(numerator)), q) / bottom)
    if not ratios:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
