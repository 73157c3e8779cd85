"""A worker runs Django's request signals around bursts of jobs, not around every job.

Jobs that follow each other at once (the router hands a busy worker its next job as soon as
the result is in) share one request_started/request_finished pair, so per-request work such
as closing the database connection (CONN_MAX_AGE=0, Django's default) runs once per burst
instead of once per block; a pause ends the request, and so does its age (BURST_MAX); a block
that fails ends it at once.
"""

from __future__ import annotations

import re
import time

import pytest
from django.test import Client

from parallel_render import worker
from parallel_render.testing import parallel_workers
from tests.conftest import block_pids


@pytest.fixture
def one_worker(settings, django_db_setup, django_db_blocker, transactional_db):
    # Every block goes to the one worker, in a job of its own (each costs more than a bundle holds).
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ADAPTIVE": False, "MIN_BLOCK_MS": 0}
    with parallel_workers(1) as cluster:
        yield cluster


def connections_per_block(response) -> list[int]:
    return [int(n) for n in re.findall(r"<div>\w (\d+)</div>", response.content.decode())]


def test_back_to_back_jobs_share_one_request_and_a_pause_ends_it(one_worker):
    client = Client()
    pages = []
    for _ in range(3):
        response = client.get("/p/burst/?sleep=0.005")
        assert block_pids(response) == [one_worker.worker_pids[0]] * 4
        pages.append(connections_per_block(response))
        time.sleep(0.3)  # the worker goes idle: its request ends, and the connection closes
    jobs = sum(len(page) for page in pages)
    assert jobs == 12
    opened = pages[-1][-1] - pages[0][0] + 1
    # One job per request would open a connection for each of the 12 blocks.
    assert opened < jobs, pages
    # Each page's blocks were a new request of their own: a fresh connection after each pause.
    assert pages[0][-1] < pages[1][0] and pages[1][-1] < pages[2][0], pages


def test_a_failing_block_ends_its_request(one_worker):
    client = Client()
    client.get("/p/burst/?sleep=0.005")
    # After the first block, one that fails in the worker (the master renders it again).
    first = connections_per_block(client.get("/p/burst_fail/?sleep=0.005"))
    assert len(first) == 3
    # The blocks after the failing one run in a request of their own: a fresh connection.
    assert first[0] < first[1], first


def test_a_request_that_keeps_getting_jobs_still_ends_after_burst_max(one_worker):
    # Four blocks of 0.4 s, back to back on the one worker: the request that began with the
    # first is BURST_MAX (1 s) old once the third is done, so it ends there; the fourth block
    # begins a request of its own, on a fresh connection.
    assert worker.BURST_MAX == 1.0
    response = Client().get("/p/burst/?sleep=0.4")
    assert block_pids(response) == [one_worker.worker_pids[0]] * 4
    first, second, third, fourth = connections_per_block(response)
    assert first == second == third < fourth
