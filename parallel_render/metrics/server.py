"""`python -m parallel_render.metrics.server HOST PORT`: a node's metrics on a port of their own.

The node's supervisor runs this as one of its children (PARALLEL_RENDER["METRICS_PORT"]), with
the node's PROMETHEUS_MULTIPROC_DIR and router address in its environment, restarts it if it
dies and stops it with the node. It serves GET /metrics (any path, in fact) from a thread of
prometheus_client's; the main thread only waits for the signal that stops it.
"""

from __future__ import annotations

import signal
import sys
import threading


def parse_bind(value: object) -> tuple[str, int]:
    """METRICS_PORT as (host, port): a port number (loopback) or "host:port"."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return "127.0.0.1", value
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if port.isdigit() and 0 < int(port) < 65536:
            return host.strip("[]") or "127.0.0.1", int(port)
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        f"PARALLEL_RENDER['METRICS_PORT'] must be a port number (1-65535, on 127.0.0.1) or \"host:port\", not {value!r}."
    )


def main(argv: list[str]) -> int:
    import django

    django.setup(set_prefix=False)
    from prometheus_client import start_http_server

    from parallel_render.metrics import registry
    from parallel_render.process import die_with_parent

    host, port, parent = argv[0], int(argv[1]), int(argv[2]) if len(argv) > 2 else 0
    if parent:
        die_with_parent(parent)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server, thread = start_http_server(port, host, registry=registry())
    print(f"parallel_render metrics: serving http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    stop.wait()
    server.shutdown()
    thread.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
