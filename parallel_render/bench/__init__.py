"""Benchmarks behind `manage.py parallel_bench`; each prints a table and can emit JSON."""


class BenchError(Exception):
    """A benchmark cannot run as asked; the message says why and what to do."""
