"""Benchmarks behind `manage.py parallel_bench`; each prints a table and can emit JSON."""
