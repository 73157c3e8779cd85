"""Two identical nodes behind a real nginx: both serve, and losing one fails no page."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.servers import free_port
from tests.test_node import NodeProcess, good_page, test_db  # noqa: F401 (test_db is a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream nodes {{
{servers}
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 1s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.path.exists(p)), None)
    if not found:
        raise RuntimeError("nginx is not installed; ./scripts/test.sh installs it (apt-get install nginx)")
    return found


@contextlib.contextmanager
def nginx(upstreams: list[int]) -> Iterator[str]:
    workdir = tempfile.mkdtemp(prefix="pr-nginx-")
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in upstreams)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=workdir, servers=servers, port=port))
    proc = subprocess.Popen([nginx_binary(), "-c", conf, "-p", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/p/slow/", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def fetch(base: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(base + "/p/slow/?sleep=0.01", timeout=30) as response:
        return response.status, response.read().decode(), response.headers.get("X-Upstream", "")


def test_two_nodes_behind_nginx_both_serve_and_losing_one_fails_no_page(test_db):  # noqa: F811
    first = NodeProcess("--masters", "1", "--workers", "1", db=test_db)
    second = NodeProcess("--masters", "1", "--workers", "1", db=test_db)
    try:
        first.wait_serving()
        second.wait_serving()
        with nginx([first.port, second.port]) as base:
            served_by: set[str] = set()
            for _ in range(10):
                status, body, upstream = fetch(base)
                assert good_page(status, body)
                served_by.add(upstream)
            assert served_by == {f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"}

            first.stop(signal.SIGKILL)  # the whole node: its children die with it
            assert first.survivors() == []
            after = [fetch(base) for _ in range(20)]
            assert all(good_page(status, body) for status, body, _ in after)
            # nginx retried the dead node (proxy_next_upstream) and then took it out of rotation.
            assert {upstream.split(", ")[-1] for _, _, upstream in after} == {f"127.0.0.1:{second.port}"}
    finally:
        for node in (first, second):
            if node.proc.poll() is None:
                node.stop()
