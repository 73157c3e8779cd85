"""Blocks that read Django's cache see the same memcached / Redis server from the workers."""

from __future__ import annotations

import os

import pytest
from django.core.cache import caches
from django.test import Client, override_settings

from parallel_render import conf
from parallel_render.cluster import LocalCluster
from tests.conftest import block_pids
from tests.servers import server


@pytest.mark.parametrize("kind", ["memcached", "redis"])
def test_block_reads_the_shared_cache_from_a_worker(kind, transactional_db, monkeypatch):
    from django.conf import settings

    with server(kind) as url:
        if kind == "memcached":
            cache_settings = {"default": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                                          "LOCATION": url[len("memcached://"):]}}
        else:
            cache_settings = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}}
        env = {"PR_TEST_DB": str(settings.DATABASES["default"]["NAME"]), "PR_TEST_CACHE": url}
        with LocalCluster(2, env=env) as cluster, override_settings(CACHES=cache_settings):
            cluster.wait_ready()
            monkeypatch.setenv(conf.ENV_ROUTER, cluster.address)
            conf.get_config.cache_clear()
            caches["default"].set("k-" + kind, f"value from {kind}")
            response = Client().get(f"/p/cache/?n=4&marker=k-{kind}")
            pids = block_pids(response)
            assert len(pids) == 4 and os.getpid() not in pids
            assert response.content.decode().strip() == "".join(f"[{i}:value from {kind}]" for i in range(4))
            caches["default"].clear()
        conf.get_config.cache_clear()
