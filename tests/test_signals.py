"""block_finished: one record per {% parallel %} block per render, with what became of it."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from django.test import Client

from parallel_render import signals
from tests.conftest import blocks_of

SERIAL = {"HTTP_X_PARALLEL_RENDER": "serial"}


def test_each_block_a_worker_rendered_is_reported_once_with_its_worker_and_times(parallel):
    response = Client().get("/p/slow/?sleep=0.02")
    records = blocks_of(response)
    assert [r.outcome for r in records] == ["sent"] * 4
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert {r.pid for r in records} <= set(parallel.worker_pids) and os.getpid() not in {r.pid for r in records}
    # Every block's HTML shows the pid that rendered it: the record names the same one.
    assert [r.pid for r in records] == [int(pid) for pid in re.findall(r"<div>\w pid=(\d+)</div>", response.content.decode())]
    # And the node's slot it fills: one slot per worker pid, of the cluster's two.
    slots = {r.pid: r.worker_slot for r in records}
    assert set(slots.values()) <= {0, 1} and len(set(slots.values())) == len(slots)
    for r in records:
        assert (r.template, r.line, r.reason, r.label) == ("t/slow.html", 2, "", "t/slow.html:2")
        assert r.block_id.startswith("t/slow.html#0:")
        assert r.render_ms >= 20 and r.queue_ms >= 0
        assert r.total_ms == pytest.approx(r.queue_ms + r.render_ms)
        assert r.request is response.wsgi_request
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].outcome = "inline"  # type: ignore[misc]


def test_each_record_places_its_block_on_the_page_time_line(parallel):
    response = Client().get("/p/slow/?sleep=0.02")
    records = blocks_of(response)
    assert [r.outcome for r in records] == ["sent"] * 4
    # One pass stitched them all, after every worker's render had ended.
    assert len({r.stitched_ms for r in records}) == 1
    for r in records:
        assert 0 <= r.start_ms and 0 <= r.submit_ms < 50, r
        # The worker began after the master sent it (queue wait >= 0) and ended before the stitch.
        assert r.start_ms + r.submit_ms <= r.render_start_ms, r
        assert r.render_start_ms + r.render_ms <= r.stitched_ms, r
    assert [r.start_ms for r in records] == sorted(r.start_ms for r in records)
    serial = blocks_of(Client().get("/p/slow/?sleep=0", **SERIAL))
    assert {(r.start_ms, r.submit_ms, r.render_start_ms, r.stitched_ms) for r in serial} == {(None,) * 4}


def test_a_timed_out_block_is_reported_as_its_fallback(parallel):
    response = Client().get("/p/timeout/?sleep=2&title=T")
    assert response.content.decode().strip() == "<p>FALLBACK T</p>"
    (record,) = blocks_of(response)
    assert (record.outcome, record.reason, record.pid) == ("fallback", "timed out", None)
    assert record.total_ms >= 300


def test_blocks_kept_in_the_master_are_reported_inline_with_their_reason(parallel):
    response = Client().get("/p/unsafe/?unsendable=1&n=2")
    inline = [r for r in blocks_of(response) if r.outcome == "inline"]
    reasons = " | ".join(r.reason for r in inline)
    assert "inside {% filter %}" in reasons and "thing is a builtins.object" in reasons, reasons
    assert all(r.index is None and r.pid is None and r.render_ms is not None for r in inline)
    # Rendered in place: it starts where its render does, and is in the page from then on.
    assert all(r.start_ms >= 0 and r.render_start_ms == r.start_ms and r.submit_ms is r.stitched_ms is None for r in inline)


def test_a_serial_request_reports_every_block_inline(parallel):
    response = Client().get("/p/slow/?sleep=0", **SERIAL)
    records = blocks_of(response)
    assert [(r.outcome, r.reason) for r in records] == [("inline", signals.NO_SESSION)] * 4


def test_a_failing_block_rendered_inline_reports_its_fallback(settings, transactional_db):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ENABLED": False}
    response = Client().get("/p/error_fallback/?title=T")
    (record,) = blocks_of(response)
    assert record.outcome == "fallback" and record.reason.startswith("failed: "), record


def test_nothing_is_built_or_sent_while_no_receiver_is_connected(parallel, blocks, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a record was built with no receiver connected")

    monkeypatch.setattr(signals, "send", fail)
    saved = signals.block_finished.receivers[:]
    signals.block_finished.receivers.clear()
    try:
        response = Client().get("/p/slow/?sleep=0")
        serial = Client().get("/p/slow/?sleep=0", **SERIAL)
    finally:
        signals.block_finished.receivers[:] = saved
    assert response.status_code == serial.status_code == 200
    assert response.content.decode().count("pid=") == 4
