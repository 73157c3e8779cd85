"""`manage.py runparallel`: a real node (gunicorn masters, fastrouter, workers) under signals and failures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = "/p/slow/?sleep=0.02"
BLOCK = re.compile(r"<div>([abcd]) pid=(\d+)</div>")

# Nodes are other processes that open the test database file: it must exist, with tables.
pytestmark = pytest.mark.django_db(transaction=True)


class NodeProcess:
    """One `manage.py runparallel` on a free port, with helpers to look at its process tree."""

    def __init__(self, *args: str, db: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT))
        env.pop("PARALLEL_RENDER_ROUTER", None)  # the session's own cluster is not this node's
        if db:
            env["PR_TEST_DB"] = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runparallel", "--bind", f"127.0.0.1:{self.port}", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        )
        self.descendants: set[int] = set()

    def wait_serving(self, timeout: float = 40.0) -> NodeProcess:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"runparallel exited with {self.proc.returncode}"
            try:
                self.get()
                if len(self.workers()) >= 1 and self.worker_rendered():
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the node did not serve pages rendered by its workers")

    def get(self, path: str = PAGE, timeout: float = 30.0) -> tuple[int, str]:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return response.status, response.read().decode()

    def children(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.descendants.update(p.pid for p in found)
        return found

    def _kind(self, kind: str) -> list[int]:
        out = []
        for child in self.children():
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            is_router = "fastrouter" in cmd.split(" ")[0]
            is_worker = "parallel_worker" in cmd
            if (kind == "router" and is_router) or (kind == "worker" and is_worker) or (
                kind == "master" and not is_router and not is_worker
            ):
                out.append(child.pid)
        return out

    def router(self) -> list[int]:
        return self._kind("router")

    def workers(self) -> list[int]:
        return self._kind("worker")

    def masters(self) -> list[int]:
        return self._kind("master")

    def worker_rendered(self, body: str | None = None) -> bool:
        """True when every block of a fresh page was rendered by one of the node's workers."""
        if body is None:
            body = self.get()[1]
        pids = {int(pid) for _, pid in BLOCK.findall(body)}
        return len(BLOCK.findall(body)) == 4 and bool(pids) and pids <= set(self.workers())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"runparallel did not exit {timeout}s after {signal.Signals(sig).name}") from None

    def survivors(self, timeout: float = 5.0) -> list[int]:
        end = time.monotonic() + timeout
        while True:
            alive = [pid for pid in self.descendants if psutil.pid_exists(pid) and _not_zombie(pid)]
            if not alive or time.monotonic() > end:
                return alive
            time.sleep(0.1)


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def good_page(status: int, body: str) -> bool:
    return status == 200 and sorted(letter for letter, _ in BLOCK.findall(body)) == ["a", "b", "c", "d"]


def wait_for(condition, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


class Load:
    """Threads fetching the page until stopped; every answer that is not a whole page is a failure."""

    def __init__(self, node: NodeProcess, threads: int = 3) -> None:
        self.node = node
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = self.node.get()
                if good_page(status, body):
                    self.ok += 1
                else:
                    self.failures.append(f"{status}: {body[:200]}")
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)


@pytest.fixture(scope="module")
def test_db(django_db_setup, django_db_blocker) -> str:
    from django.conf import settings

    return str(settings.DATABASES["default"]["NAME"])


@pytest.fixture(scope="module")
def node(test_db):
    """One node shared by the supervision tests, in order; the last test stops it."""
    running = NodeProcess("--masters", "2", "--workers", "2", "--stuck-timeout", "2", db=test_db).wait_serving()
    yield running
    if running.proc.poll() is None:
        running.stop(signal.SIGKILL)


def test_node_serves_pages_rendered_by_its_own_workers(node):
    assert len(node.router()) == 1
    assert len(node.workers()) == 2
    assert len(node.masters()) == 2
    status, body = node.get()
    assert good_page(status, body)
    assert node.worker_rendered(body)


def test_a_killed_worker_is_replaced_within_a_second(node):
    before = node.workers()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in node.workers() and len(node.workers()) == 2, 1.0), node.workers()
    assert wait_for(node.worker_rendered, 20, 0.2)


def test_a_killed_router_is_restarted_and_masters_reconnect(node):
    (router,) = node.router()
    with Load(node) as load:
        os.kill(router, signal.SIGKILL)
        assert wait_for(lambda: node.router() and node.router() != [router], 5), "router not restarted"
        # Masters render inline while they cannot reach it, then reconnect (client backoff <= 2 s).
        assert wait_for(node.worker_rendered, 15, 0.2), "masters never used the new router"
    assert not load.failures, load.failures[:3]
    assert load.ok > 0


def test_a_stuck_worker_is_killed_and_replaced(node):
    victim = node.workers()[0]
    os.kill(victim, signal.SIGSTOP)  # stopped: no heartbeat, as a worker stuck in one job
    try:
        assert wait_for(lambda: victim not in node.workers(), 6, 0.2), "stuck worker still there"
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    assert wait_for(lambda: len(node.workers()) == 2, 2)


def test_sighup_restarts_workers_and_masters_without_failing_a_page(node):
    assert wait_for(node.worker_rendered, 20, 0.2)
    workers, masters = set(node.workers()), set(node.masters())
    with Load(node) as load:
        time.sleep(0.5)
        node.proc.send_signal(signal.SIGHUP)

        def replaced() -> bool:
            return not (set(node.workers()) & workers) and not (set(node.masters()) & masters) and len(node.workers()) == 2

        assert wait_for(replaced, 30, 0.2), (workers, node.workers(), masters, node.masters())
        time.sleep(1.0)
    assert not load.failures, load.failures[:3]
    assert load.ok > 10
    assert node.worker_rendered()


def test_sigterm_drains_pages_in_flight_and_leaves_nothing_behind(node):
    node.children()
    results: list[tuple[int, str] | Exception] = []

    def slow_page() -> None:
        try:
            results.append(node.get("/p/slow/?sleep=1"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=slow_page) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # both pages are being rendered
    assert node.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(30)
    assert len(results) == 2
    for result in results:
        assert not isinstance(result, Exception), result
        assert good_page(*result)
    assert node.survivors() == []


@pytest.mark.parametrize("limit", [["--max-jobs", "3"], ["--max-memory", "1"]], ids=["max-jobs", "max-memory"])
def test_workers_are_recycled_without_failing_a_page(test_db, limit):
    running = NodeProcess("--masters", "1", "--workers", "2", *limit, db=test_db).wait_serving()
    try:
        seen: set[int] = set(running.workers())
        for _ in range(12):
            status, body = running.get()
            assert good_page(status, body)
            seen.update(running.workers())
            time.sleep(0.1)
        # Every page was whole, and the workers it started with were replaced along the way.
        assert len(seen) > 2, seen
    finally:
        running.stop(signal.SIGTERM)
    assert running.survivors() == []


def test_sync_masters_serve_pages_rendered_by_workers(test_db):
    running = NodeProcess("--masters", "1", "--workers", "2", "--worker-class", "sync", db=test_db).wait_serving()
    try:
        status, body = running.get()
        assert good_page(status, body)
        assert wait_for(running.worker_rendered, 10, 0.2)
    finally:
        running.stop(signal.SIGTERM)
    assert running.survivors() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_no_orphans_when_the_node_is_interrupted_or_killed(test_db, sig):
    running = NodeProcess("--masters", "1", "--workers", "2", db=test_db).wait_serving()
    running.children()
    assert len(running.descendants) == 4
    running.stop(sig)
    assert running.survivors() == []


def test_affinity_is_applied_where_there_are_enough_cores(test_db):
    from parallel_render.layout import MIN_PINNED_CPUS, plan, usable_cpus

    cpus = usable_cpus()
    if len(cpus) < MIN_PINNED_CPUS:
        pytest.skip(f"{len(cpus)} usable CPUs: the layout pins nothing below {MIN_PINNED_CPUS} (runparallel --layout says so)")
    layout = plan(cpus, masters=2, workers=2)
    running = NodeProcess("--masters", "2", "--workers", "2", db=test_db).wait_serving()
    try:
        (router,) = running.router()
        assert psutil.Process(router).cpu_affinity() == list(layout.router_cpus)
        worker_cores = {c for cpus in layout.worker_cpus for c in cpus}
        for pid in running.workers():
            assert set(psutil.Process(pid).cpu_affinity()) <= worker_cores
        master_cores = {c for cpus in layout.master_cpus for c in cpus}
        for pid in running.masters():
            assert set(psutil.Process(pid).cpu_affinity()) <= master_cores
    finally:
        running.stop()


def test_apply_affinity_pins_a_process_and_psutil_sees_it():
    from parallel_render.layout import apply_affinity, usable_cpus

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cpu = usable_cpus()[-1]
        assert apply_affinity(child.pid, [cpu])
        assert psutil.Process(child.pid).cpu_affinity() == [cpu]
    finally:
        child.kill()
        child.wait()
