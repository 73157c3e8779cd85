"""Benchmarks behind `manage.py parallel_bench`; each prints a table and can emit JSON."""


class BenchError(Exception):
    """A benchmark cannot run as asked; the message says why and what to do."""


def need_psutil(bench: str) -> None:
    """Raise BenchError naming the extra to install when psutil (the [node] extra) is missing."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise BenchError(
            f"parallel_bench {bench} reads processes' CPU time and children with psutil, which is "
            "not installed: pip install 'parallel_render[node]'"
        ) from None
