"""Per-block cost: `parallel_bench overhead`, and the caches that keep a block cheap."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command


def test_parallel_bench_overhead_reports_each_role(transactional_db, capsys):
    call_command("parallel_bench", "overhead", "--path", "/p/leak/?n=3", "--blocks", "4", "--pages", "3",
                 "--rounds", "1", "--json")
    result = json.loads(capsys.readouterr().out)
    us = result["us_per_block"]
    # Serially the router and the workers do nothing; in parallel every block costs them CPU.
    assert us["router"] > 0 and us["workers"] > 0, us
    assert result["cpu_ms_per_page"]["serial"]["workers"] < result["cpu_ms_per_page"]["parallel"]["workers"]
    assert us["total"] == pytest.approx(us["master"] + us["router"] + us["workers"])
    call_command("parallel_bench", "overhead", "--path", "/p/leak/?n=3", "--blocks", "4", "--pages", "2", "--rounds", "1")
    out = capsys.readouterr().out
    assert "| workers" in out and "| total" in out and "reproduce: python manage.py parallel_bench overhead" in out
