"""Under ASGI the middleware runs async; pages are stitched the same way."""

from __future__ import annotations

import asyncio

from django.test import AsyncClient

from tests.conftest import block_pids


def fetch(path: str, **headers):
    async def go():
        return await AsyncClient().get(path, **headers)

    return asyncio.run(go())


def test_async_view_and_sync_view_under_asgi(parallel):
    for path in ("/async/leak/?marker=a&n=4", "/p/leak/?marker=a&n=4", "/tr/leak/?marker=a&n=4"):
        serial = fetch(path, HTTP_X_PARALLEL_RENDER="serial")
        response = fetch(path)
        assert response.status_code == 200
        assert response.content == serial.content, path
        assert len(block_pids(response)) == 5, path
        assert set(block_pids(response)) <= set(parallel.worker_pids)
