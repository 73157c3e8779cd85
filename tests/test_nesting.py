"""Blocks nested in a block: sent on by the worker when another is idle, never a deadlock."""

from __future__ import annotations

import time

from django.test import Client

from parallel_render import conf
from parallel_render.cluster import LocalCluster
from tests.conftest import block_pids, thread

SERIAL = {"HTTP_X_PARALLEL_RENDER": "serial"}


def test_a_worker_sends_nested_blocks_to_an_idle_worker(parallel):
    client = Client()
    serial = client.get("/p/nest3/?title=t&sleep=0.2", **SERIAL).content.decode()
    response = client.get("/p/nest3/?title=t&sleep=0.2")
    assert response.content.decode() == serial
    assert "L3a T" in serial and "L3c9" in serial
    timing = response.headers["Server-Timing"]
    assert len(block_pids(response)) == 2
    assert "nested" in timing, timing


def test_one_worker_three_levels_under_load_never_deadlocks(transactional_db, monkeypatch):
    from django.conf import settings

    env = {"PR_TEST_DB": str(settings.DATABASES["default"]["NAME"])}
    with LocalCluster(1, env=env) as cluster:
        cluster.wait_ready()
        monkeypatch.setenv(conf.ENV_ROUTER, cluster.address)
        conf.get_config.cache_clear()
        expected = Client().get("/p/nest3/?title=x&sleep=0.01", **SERIAL).content
        bodies: list[bytes] = []
        started = time.monotonic()

        def load() -> None:
            client = Client()
            for _ in range(5):
                bodies.append(client.get("/p/nest3/?title=x&sleep=0.01").content)

        threads = [thread(load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        took = time.monotonic() - started
    conf.get_config.cache_clear()
    assert len(bodies) == 30 and all(b == expected for b in bodies)
    # Far below any timeout: nothing ever waited on a queue it could not drain.
    assert took < 10, took
