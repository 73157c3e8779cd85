"""Fixtures that start real parts: a fastrouter and worker processes on the test database."""

from __future__ import annotations

import os
import re

import pytest

from parallel_render import conf
from parallel_render.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(django_db_setup, django_db_blocker):
    """A router and two workers that use the test database (a file, so they can open it)."""
    from django.conf import settings

    db_name = settings.DATABASES["default"]["NAME"]
    with LocalCluster(2, env={"PR_TEST_DB": str(db_name), "PR_ROLE": "worker"}) as running:
        running.wait_ready()
        os.environ[conf.ENV_ROUTER] = running.address
        conf.get_config.cache_clear()
        try:
            yield running
        finally:
            del os.environ[conf.ENV_ROUTER]
            conf.get_config.cache_clear()


@pytest.fixture
def parallel(cluster, transactional_db):
    """The cluster, with every worker idle again before the test starts.

    Transactional: workers are other processes and only see committed rows.
    """
    cluster.wait_ready()
    return cluster


def block_pids(response) -> list[int]:
    """The pid of the process that rendered each parallel block, from Server-Timing."""
    header = response.headers.get("Server-Timing", "")
    return [int(pid) for pid in re.findall(r'pid (\d+)', header)]


def rescued(response) -> list[str]:
    header = response.headers.get("Server-Timing", "")
    return re.findall(r'desc="[^"]* master render [\d.]+ms: ([^"]*)"', header)
