"""parallel_render.metrics: a real node counts its blocks and serves them, with the router's STATS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import wait_for
from tests.servers import free_port
from tests.test_node import ROOT, NodeProcess

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics_node(django_db_setup, django_db_blocker, tmp_path_factory):
    from django.conf import settings

    test_db = str(settings.DATABASES["default"]["NAME"])
    port = free_port()
    log = tmp_path_factory.mktemp("metrics-node") / "node.log"
    node = NodeProcess("--masters", "2", "--workers", "2", log=log, db=test_db, env={"PR_TEST_METRICS_PORT": str(port)})
    node.metrics_url = f"http://127.0.0.1:{port}/metrics"
    node.wait_serving()
    assert wait_for(lambda: _answers(node.metrics_url), 20, 0.1), node.tail()
    yield node
    node.stop(signal.SIGTERM)


def _answers(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True


def test_the_port_counts_every_block_a_page_sent_and_shows_the_router(metrics_node):
    before = scrape(metrics_node.metrics_url)
    pages = 3
    for _ in range(pages):
        status, body = metrics_node.get()  # four blocks, each rendered by a worker
        assert status == 200 and metrics_node.worker_rendered(body)
    after = scrape(metrics_node.metrics_url)
    sent = {"outcome": "sent", "template": "t/slow.html"}
    # The pages went to either master: the scrape adds up every process of the node.
    assert value(after, "parallel_render_blocks_total", **sent) - value(before, "parallel_render_blocks_total", **sent) \
        == 4 * pages
    counted = "parallel_render_block_render_seconds_count"
    assert value(after, counted, **sent) - value(before, counted, **sent) == 4 * pages
    # Each block sleeps 20 ms in its worker.
    rendered = "parallel_render_block_render_seconds_sum"
    assert value(after, rendered, **sent) - value(before, rendered, **sent) >= 0.02 * 4 * pages
    queued = "parallel_render_block_queue_seconds_count"
    assert value(after, queued, template="t/slow.html") - value(before, queued, template="t/slow.html") == 4 * pages
    # Per-worker busy time, labelled by the node's worker slots (two workers: slots 0 and 1).
    busy = {dict(labels)["worker"]: v for (name, labels), v in after.items()
            if name == "parallel_render_worker_busy_seconds_total"}
    assert busy and set(busy) <= {"0", "1"}, busy
    assert sum(busy.values()) >= 0.02 * 4 * pages
    # The router's STATS, read at the scrape.
    assert value(after, "parallel_render_router_up") == 1
    assert value(after, "parallel_render_router_workers") == 2
    assert value(after, "parallel_render_router_queued") == 0
    assert value(after, "parallel_render_router_submitted_total") - value(before, "parallel_render_router_submitted_total") \
        >= 4 * pages
    # The router reports a quantile as its histogram bucket's midpoint (16 buckets per power of
    # two): a 20.3 ms median reads 19.968 ms, so allow the bucket's half width below 20 ms.
    assert value(after, "parallel_render_router_service_seconds", quantile="0.5") >= 0.02 * (1 - 1 / 32)


def test_the_django_view_shows_the_same_node_wide_counts(metrics_node):
    through_view = scrape(metrics_node.base + "/metrics/")
    on_port = scrape(metrics_node.metrics_url)
    sent = {"outcome": "sent", "template": "t/slow.html"}
    assert value(through_view, "parallel_render_blocks_total", **sent) == value(on_port, "parallel_render_blocks_total", **sent) > 0
    assert value(through_view, "parallel_render_router_up") == 1


def test_the_multiprocess_directory_is_private_and_goes_with_the_node(metrics_node):
    directory = os.path.join(metrics_node.private_dir(), "metrics")
    assert os.stat(metrics_node.private_dir()).st_mode & 0o077 == 0
    assert any(name.startswith("counter_") for name in os.listdir(directory))
    assert metrics_node.stop(signal.SIGTERM) == 0
    assert not os.path.exists(directory)


def test_without_prometheus_client_the_import_says_what_to_install():
    code = "import sys; sys.modules['prometheus_client'] = None; import parallel_render.metrics"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and 'pip install "parallel_render[metrics]"' in run.stderr, run.stderr
