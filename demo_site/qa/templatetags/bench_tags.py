"""Tags of the benchmark pages (see demo_site.qa.bench_views)."""

from django import template

register = template.Library()

# Iterations of burn_cpu's loop per millisecond on the 2-core development machine; a faster
# machine spends less. The benchmark reads each block's real render time from Server-Timing.
ITERATIONS_PER_MS = 15_000
MAX_MS = 1000


@register.simple_tag
def burn_cpu(ms, seed) -> str:
    """Spend about `ms` of pure-Python CPU (holding the GIL); the result depends only on the arguments."""
    x = int(seed) + 1
    for _ in range(int(min(max(float(ms), 0.0), MAX_MS) * ITERATIONS_PER_MS)):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return f"{x:08x}"
