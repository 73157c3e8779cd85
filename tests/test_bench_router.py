"""`manage.py parallel_bench router`: one quick run against a real router, workers and redis-server."""

from __future__ import annotations

import io
import json
import math

import pytest
from django.core.management import call_command

REQUIRED = (
    "native_rtt_p50_us",
    "native_rtt_p99_us",
    "python_rtt_p50_us",
    "redis_rtt_p50_us",
    "redis_over_python_rtt",
    "direct_rtt_p50_us",
    "throughput_jobs_s",
    "throughput_batched_jobs_s",
    "router_cpu_us_per_job",
    "router_rss_mb",
)


@pytest.fixture(scope="module")
def result() -> dict:
    out = io.StringIO()
    call_command("parallel_bench", "router", "--quick", "--json", stdout=out)
    return json.loads(out.getvalue())


def test_json_has_every_key_with_a_sane_value(result):
    missing = [k for k in REQUIRED if k not in result]
    assert not missing, missing
    for key in REQUIRED:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # A percentile never inverts, and a p99 under a p50 would mean the two were mixed up.
    assert result["native_rtt_p99_us"] >= result["native_rtt_p50_us"]
    assert result["redis_over_python_rtt"] == pytest.approx(result["redis_rtt_p50_us"] / result["python_rtt_p50_us"])
    # Every load run answered every job with RESULT, and the router saw them all.
    for name in ("1k", "1k_batched", "64k", "64k_batched"):
        load = result[f"load_{name}"]
        assert load["errors"] == 0 and load["jobs"] > 0, load
    stats = result["router_stats"]
    assert stats["completed"] >= sum(result[f"load_{n}"]["jobs"] for n in ("1k", "1k_batched", "64k", "64k_batched"))
    assert stats["errors"] == stats["timeouts"] == stats["busy"] == 0, stats
    assert result["router_rss_mb"] < 100


def test_table_names_every_measurement_and_the_command():
    out = io.StringIO()
    call_command("parallel_bench", "router", "--quick", "--seconds", "0.1", stdout=out)
    text = out.getvalue()
    assert "reproduce: python manage.py parallel_bench router" in text
    for needle in ("ping-pong", "RouterClient", "Redis lists", "batches of 16", "router CPU per job", "RSS"):
        assert needle in text, needle


def test_a_missing_redis_package_says_what_to_install(monkeypatch):
    import sys

    from parallel_render.bench import BenchError
    from parallel_render.bench.router import running_redis

    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    with pytest.raises(BenchError, match=r"pip install redis"):
        with running_redis():
            pass
