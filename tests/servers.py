"""Real memcached and redis-server processes for the tests (parallel_render.bench.servers)."""

from parallel_render.bench.servers import free_port, server

__all__ = ["free_port", "server"]
