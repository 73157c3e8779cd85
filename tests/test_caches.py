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


def test_a_cache_tag_on_a_process_local_cache_keeps_its_block_in_the_master(parallel, caplog):
    """LocMemCache (Django's default) lives in one process: a worker would fill its own copy."""
    from parallel_render.testing import serially

    caplog.set_level("INFO", "parallel_render")
    with serially():
        serial = Client().get("/p/cache_tag/?marker=loc1")
    assert serial.content.decode().strip() == "Aloc1|Aloc1"
    response = Client().get("/p/cache_tag/?marker=loc2")
    assert response.content.decode().strip() == "Aloc2|Aloc2"
    assert block_pids(response) == []
    assert "renders inline: a {% cache %} in it uses 'default', a LocMemCache that only this process sees" in caplog.text


@pytest.mark.parametrize("kind", ["memcached", "redis"])
def test_a_cache_tag_on_a_shared_cache_renders_in_a_worker(kind, transactional_db, monkeypatch):
    from django.conf import settings

    with server(kind) as url:
        if kind == "memcached":
            cache_settings = {"default": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                                          "LOCATION": url[len("memcached://"):]}}
        else:
            cache_settings = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}}
        env = {"PR_TEST_DB": str(settings.DATABASES["default"]["NAME"]), "PR_TEST_CACHE": url}
        with LocalCluster(1, env=env) as cluster, override_settings(CACHES=cache_settings):
            cluster.wait_ready()
            monkeypatch.setenv(conf.ENV_ROUTER, cluster.address)
            conf.get_config.cache_clear()
            response = Client().get(f"/p/cache_tag/?marker={kind}")
            assert response.content.decode().strip() == f"A{kind}|A{kind}"
            assert block_pids(response) == cluster.worker_pids
            caches["default"].clear()
        conf.get_config.cache_clear()
