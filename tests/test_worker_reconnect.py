"""A worker outlives its router: when the router dies, the worker connects to the next one."""

from __future__ import annotations

import os
import threading
import time

from django.test import Client

from parallel_render import conf
from parallel_render.cluster import LocalCluster
from parallel_render.testing import serially
from tests.conftest import thread


def _wait(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def _router_stat(address: str, name: str) -> int:
    """One of the router's STATS counters; 0 while no router answers at the address."""
    from parallel_render.client import RouterClient, RouterUnavailable

    try:
        return RouterClient(address).stats().get(name, 0)
    except (OSError, RouterUnavailable):
        return 0


def test_workers_reconnect_quietly_when_the_router_is_killed_mid_page(transactional_db, monkeypatch, capfd):
    from django.conf import settings

    env = {"PR_TEST_DB": str(settings.DATABASES["default"]["NAME"])}
    with LocalCluster(2, env=env) as cluster:
        cluster.wait_ready()
        monkeypatch.setenv(conf.ENV_ROUTER, cluster.address)
        conf.get_config.cache_clear()
        workers = set(cluster.worker_pids)
        stop = threading.Event()
        errors: list[str] = []

        def load() -> None:
            # Pages whose blocks the workers are rendering (and answering) when the router dies.
            client = Client()
            while not stop.is_set():
                response = client.get("/p/slow/?sleep=0.05")
                if response.status_code != 200 or response.content.count(b"<div>") != 4:
                    errors.append(f"{response.status_code} {response.content[:200]!r}")

        threads = [thread(load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for _ in range(6):
                old = cluster.router
                # Killed while a worker holds a job: its answer meets a dead connection, quietly.
                _wait(lambda: _router_stat(cluster.address, "in_flight") > 0)
                old.kill()
                _wait(lambda old=old: cluster.router is not None and cluster.router.pid != old.pid)
                _wait(lambda: _router_stat(cluster.address, "workers") == 2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[:3]
        # The same worker processes throughout: none exited and had to be started again.
        assert set(cluster.worker_pids) == workers
        with serially():
            assert Client().get("/p/slow/?sleep=0").status_code == 200
    conf.get_config.cache_clear()
    err = capfd.readouterr().err
    assert "BrokenPipeError" not in err and "Traceback" not in err, err[-3000:]
    assert os.getpid() not in workers
