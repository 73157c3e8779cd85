"""OpenTelemetry (docs/tracing.md): a span per block in the master, its context in the job, and
the worker's span for the block its child, across a real router and real worker processes.

The master's spans go to the SDK's in-memory exporter; the workers' (other processes) to a
file, one JSON line per span, through the tests' OTEL_WORKER_SETUP (tests/otel_export.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

pytest.importorskip("opentelemetry.sdk.trace", reason='the [otel] tests need opentelemetry-sdk (the "test" extra)')

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from parallel_render import checks, conf, signals, tracing
from parallel_render.client import RouterClient
from parallel_render.testing import parallel_workers
from tests.conftest import blocks_of
from tests.otel_export import ENV

A = tracing.A


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """This process's spans, in memory (the global tracer provider can be set once a process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture(scope="module")
def traced_workers(django_db_setup, django_db_blocker, tmp_path_factory):
    """A router and two workers that trace (tests/settings.py turns OTEL on where ENV is set)."""
    path = tmp_path_factory.mktemp("otel") / "worker-spans.jsonl"
    path.touch()
    with parallel_workers(2, env={ENV: str(path)}) as running:
        yield running, path


@pytest.fixture
def otel(settings, traced_workers, exporter, transactional_db):
    traced_workers[0].wait_ready()
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "OTEL": True}
    exporter.clear()
    return traced_workers[0], traced_workers[1], exporter


def worker_spans(path, since: int) -> list[dict]:
    with open(path) as f:
        f.seek(since)
        return [json.loads(line) for line in f]


def get_traced(path_in_site: str, spans_file) -> tuple:
    """GET a page inside a span of the test's own (standing in for the request's span)."""
    since = spans_file.stat().st_size
    with trace.get_tracer("tests").start_as_current_span("GET") as request_span:
        response = Client().get(path_in_site)
    return response, request_span.get_span_context(), worker_spans(spans_file, since)


def test_each_block_sent_has_a_worker_span_that_is_the_child_of_its_block_span(otel):
    cluster, spans_file, exporter = otel
    router = RouterClient(cluster.address)
    # First each block in a job of its own; once measured as cheap, all three in one bundle.
    for attempt in ("alone", "bundled"):
        if attempt == "bundled":
            for _ in range(3):  # each block's cost is the median of its last renders
                Client().get("/p/traced/?title=t")
        exporter.clear()
        before = router.stats()["submitted"]
        response, request, workers = get_traced("/p/traced/?title=t", spans_file)
        jobs = router.stats()["submitted"] - before
        assert response.status_code == 200
        assert (jobs == 3) if attempt == "alone" else (jobs == 1), (attempt, jobs)
        records = blocks_of(response)
        assert [r.outcome for r in records] == ["inline"] + ["sent"] * 3, records  # the inline one first
        records = records[1:]
        html_pids = [int(b.split("pid=")[1].split("<")[0]) for b in response.content.decode().split("<b>")[1:]]

        master = [s for s in exporter.get_finished_spans() if s.name == tracing.BLOCK_SPAN]
        assert len(master) == 4
        for span in master:
            # The request's trace, as children of its span.
            assert span.context.trace_id == request.trace_id
            assert span.parent.span_id == request.span_id
        by_index = {s.attributes.get(A + "index"): s for s in master}
        inline = by_index[None]
        assert inline.attributes[A + "outcome"] == "inline"
        assert inline.attributes[A + "block.label"] == "t/traced.html:2"
        assert "inside {% filter %}" in inline.attributes[A + "reason"]
        assert A + "worker.pid" not in inline.attributes

        # One worker span per block sent, each the child of its own block's span.
        assert len(workers) == 3, workers
        for span in workers:
            assert span["name"] == tracing.RENDER_SPAN and span["kind"] == "CONSUMER"
            assert span["trace_id"] == f"{request.trace_id:032x}"
        parents = {w["parent_id"]: w for w in workers}
        assert len(parents) == 3
        for index, record in enumerate(records):
            block = by_index[index]
            attributes = block.attributes
            assert attributes[A + "outcome"] == "sent" and A + "reason" not in attributes
            assert attributes[A + "block.label"] == record.label == "t/traced.html:1"
            assert attributes[A + "block.template"] == "t/traced.html" and attributes[A + "block.line"] == 1
            assert attributes[A + "block.id"] == record.block_id
            assert attributes[A + "worker.pid"] == record.pid == html_pids[index]
            assert attributes[A + "queue_ms"] == pytest.approx(record.queue_ms)
            assert attributes[A + "render_ms"] == pytest.approx(record.render_ms)
            worker = parents[f"{block.context.span_id:016x}"]
            assert worker["process"] == record.pid
            assert worker["attributes"][A + "worker.pid"] == record.pid
            assert worker["attributes"][A + "block.id"] == record.block_id
            assert worker["attributes"][A + "block.label"] == "t/traced.html:1"
            assert worker["attributes"][A + "render_ms"] == pytest.approx(record.render_ms)
            assert worker["status"] == "UNSET"
            # The worker's span lies within its block's span (one machine, one clock).
            assert block.start_time <= worker["start"] <= worker["end"] <= block.end_time
    router.close()


def test_nested_blocks_are_spans_of_the_worker_under_its_render_span(otel):
    _cluster, spans_file, exporter = otel
    response, request, workers = get_traced("/p/nest3/?title=t&sleep=0.05", spans_file)
    assert response.status_code == 200
    master = [s for s in exporter.get_finished_spans() if s.name == tracing.BLOCK_SPAN]
    assert sorted(s.attributes[A + "outcome"] for s in master) == ["sent", "sent"]
    renders = {w["span_id"]: w for w in workers if w["name"] == tracing.RENDER_SPAN}
    nested = [w for w in workers if w["name"] == tracing.BLOCK_SPAN]
    # L1 holds L2a and L2b, which hold L3a, L3b and ten L3c: 14 nested blocks, reported by the
    # workers that rendered the block each is nested in (sent on, or rendered there).
    assert len(nested) == 14, workers
    assert {w["trace_id"] for w in workers} == {f"{request.trace_id:032x}"}
    master_ids = {f"{s.context.span_id:016x}" for s in master}
    nested_ids = {w["span_id"] for w in nested}
    for span in nested:
        assert span["parent_id"] in renders  # the render of the block it is nested in
    for span in renders.values():
        assert span["parent_id"] in master_ids | nested_ids
    # One worker span per block a worker rendered: the two of the page, and the nested ones sent.
    sent_nested = [w for w in nested if w["attributes"][A + "outcome"] == "sent"]
    assert len(renders) == 2 + len(sent_nested)
    assert {w["parent_id"] for w in renders.values()} >= {w["span_id"] for w in sent_nested}


def test_a_block_that_falls_back_has_an_error_span(otel, settings):
    _cluster, spans_file, exporter = otel
    settings.DEBUG = False
    response, _request, workers = get_traced("/p/bundle/?marker=m&n=2&fail=1", spans_file)
    assert "<i>sorry 1</i>" in response.content.decode()
    spans = {s.attributes[A + "index"]: s for s in exporter.get_finished_spans() if s.name == tracing.BLOCK_SPAN}
    assert spans[1].attributes[A + "outcome"] == "fallback"
    assert spans[1].status.status_code == trace.StatusCode.ERROR
    assert spans[0].attributes[A + "outcome"] == "sent" and spans[0].status.status_code == trace.StatusCode.UNSET
    failed = [w for w in workers if w["status"] == "ERROR"]
    assert len(workers) == 2 and len(failed) == 1
    assert failed[0]["parent_id"] == f"{spans[1].context.span_id:016x}"


def test_a_serial_page_has_master_spans_and_no_worker_span(otel):
    _cluster, spans_file, exporter = otel
    since = spans_file.stat().st_size
    with trace.get_tracer("tests").start_as_current_span("GET") as request_span:
        Client().get("/p/traced/?title=t", HTTP_X_PARALLEL_RENDER="serial")
    assert worker_spans(spans_file, since) == []
    spans = [s for s in exporter.get_finished_spans() if s.name == tracing.BLOCK_SPAN]
    assert [(s.attributes[A + "outcome"], s.attributes[A + "reason"]) for s in spans] == [("inline", signals.NO_SESSION)] * 4
    assert all(s.parent.span_id == request_span.get_span_context().span_id for s in spans)
    assert all(s.attributes[A + "render_ms"] >= 0 and s.end_time > s.start_time for s in spans)


def test_off_nothing_is_traced_and_no_receiver_is_connected(traced_workers, exporter, transactional_db, settings):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "OTEL": False}
    exporter.clear()
    spans_file = traced_workers[1]
    since = spans_file.stat().st_size
    response = Client().get("/p/traced/?title=t")
    assert [r.outcome for r in blocks_of(response)] == ["inline"] + ["sent"] * 3
    assert exporter.get_finished_spans() == ()
    # The workers trace, but a job without a context gets no span of theirs.
    assert worker_spans(spans_file, since) == []
    assert tracing.RECEIVER_UID not in [entry[0][0] for entry in signals.block_finished.receivers]


def test_the_core_does_not_import_opentelemetry_while_off(traced_workers, transactional_db):
    """A page whose blocks go to (tracing) workers, in a process of its own with OTEL off."""
    from django.db import connection

    code = (
        "import sys, django; django.setup()\n"
        "from django.test import Client\n"
        "from parallel_render.testing import capture_blocks\n"
        "with capture_blocks() as blocks:\n"
        "    assert Client().get('/p/traced/?title=t').status_code == 200\n"
        "assert [b.outcome for b in blocks].count('sent') == 3, blocks\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PR_TEST_DB": str(connection.settings_dict["NAME"]),
           conf.ENV_ROUTER: traced_workers[0].address}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_on_without_opentelemetry_the_check_says_what_to_install(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "OTEL": True}
    (error,) = checks.check_tracing()
    assert error.id == "parallel_render.E004"
    assert 'pip install "parallel_render[otel]"' in error.hint
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "OTEL": True, "OTEL_WORKER_SETUP": "tests.nowhere.setup"}
    monkeypatch.delitem(sys.modules, "opentelemetry")
    (error,) = checks.check_tracing()
    assert error.id == "parallel_render.E005" and "tests.nowhere.setup" in error.msg


@pytest.mark.parametrize("key, value", [("OTEL", 1), ("OTEL_WORKER_SETUP", 3), ("OTEL_WORKER_SETUP", "nodots")])
def test_bad_settings_are_refused_with_the_key(settings, key, value):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, key: value}
    with pytest.raises(ImproperlyConfigured, match=key):
        conf.get_config()
