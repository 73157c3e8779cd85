"""Under ASGI the middleware runs async; pages are stitched the same way."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient

from tests.conftest import block_pids


def fetch(path: str, **headers):
    async def go():
        try:
            return await AsyncClient().get(path, **headers)
        finally:
            # Sync views ran in asgiref's thread for sync code, which outlives the request; the
            # test client keeps Django from closing their database connections: close them here.
            await sync_to_async(connections.close_all)()

    return asyncio.run(go())


def test_async_view_and_sync_view_under_asgi(parallel):
    for path in ("/async/leak/?marker=a&n=4", "/p/leak/?marker=a&n=4", "/tr/leak/?marker=a&n=4"):
        serial = fetch(path, HTTP_X_PARALLEL_RENDER="serial")
        response = fetch(path)
        assert response.status_code == 200
        assert response.content == serial.content, path
        assert len(block_pids(response)) == 5, path
        assert set(block_pids(response)) <= set(parallel.worker_pids)
