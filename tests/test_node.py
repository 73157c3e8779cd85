"""`manage.py runparallel`: a real node (supervisor, gunicorn, fastrouter, workers) under signals and failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.processes import alive, cmdline, python, wait_for
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = "/p/slow/?sleep=0.02"
BLOCK = re.compile(r"<div>([abcd]) pid=(\d+)</div>")

# Nodes are other processes that open the test database file: it must exist, with tables.
pytestmark = pytest.mark.django_db(transaction=True)


def node_env(db: str | None) -> dict[str, str]:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("PARALLEL_RENDER_ROUTER", None)  # the session's own cluster is not this node's
    if db:
        env["PR_TEST_DB"] = db
    return env


class NodeProcess:
    """One node on a free port, its output in a log file, with helpers to look at its process tree.

    By default `manage.py runparallel`; `command` replaces the arguments after `python`.
    """

    def __init__(self, *args: str, log: Path | None = None, db: str | None = None, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if log is None:
            fd, name = tempfile.mkstemp(prefix="node-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log_path = log
        bind = f"127.0.0.1:{self.port}"
        argv = [arg.replace("{bind}", bind) for arg in command] if command else [
            "-m", "django", "runparallel", "--bind", bind, *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(python(*argv), cwd=ROOT, env={**node_env(db), **(env or {})},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.descendants: set[int] = set()

    # -- what it says --------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def says(self, pattern: str, timeout: float = 20.0) -> str:
        """The first log line matching pattern, waiting for it."""
        assert wait_for(lambda: self.lines(pattern), timeout, 0.1), f"no log line matches {pattern!r}:\n{self.tail()}"
        return self.lines(pattern)[0]

    # -- serving -------------------------------------------------------------------------

    def wait_serving(self, timeout: float = 90.0) -> NodeProcess:
        def serving() -> bool:
            assert self.proc.poll() is None, f"the node exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                return len(self.workers()) >= 1 and self.worker_rendered()
            except OSError:
                return False

        assert wait_for(serving, timeout, 0.2), f"the node did not serve pages rendered by its workers:\n{self.tail()}"
        return self

    def get(self, path: str = PAGE, timeout: float = 60.0) -> tuple[int, str]:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return response.status, response.read().decode()

    def worker_rendered(self, body: str | None = None) -> bool:
        """True when every block of a fresh page was rendered by one of the node's workers."""
        if body is None:
            try:
                body = self.get()[1]
            except OSError:
                return False
        pids = {int(pid) for _, pid in BLOCK.findall(body)}
        return len(BLOCK.findall(body)) == 4 and bool(pids) and pids <= set(self.workers())

    # -- the process tree ----------------------------------------------------------------

    def _children(self, pid: int) -> list[psutil.Process]:
        try:
            found = [p for p in psutil.Process(pid).children() if alive(p.pid)]
        except psutil.NoSuchProcess:
            return []
        self.descendants.update(p.pid for p in found)
        return found

    def _direct(self, test) -> list[int]:
        return [p.pid for p in self._children(self.proc.pid) if test(cmdline(p.pid))]

    def router(self) -> list[int]:
        return self._direct(lambda cmd: cmd.split(" ")[0].endswith("fastrouter"))

    def workers(self) -> list[int]:
        return self._direct(lambda cmd: "parallel_worker" in cmd)

    def arbiter(self) -> list[int]:
        return self._direct(lambda cmd: "gunicorn" in cmd)

    def masters(self) -> list[int]:
        return [p.pid for a in self.arbiter() for p in self._children(a)]

    def everything(self) -> set[int]:
        """Every process of the node below the top one, as of now (also remembered for survivors())."""
        found = set()
        for pid in [*self.router(), *self.workers(), *self.arbiter(), *self.masters()]:
            found.add(pid)
        return found

    def private_dir(self) -> str:
        (router,) = self.router()
        listen = psutil.Process(router).cmdline()
        address = listen[listen.index("--listen") + 1]
        assert address.startswith("unix://"), address
        return os.path.dirname(address[len("unix://"):])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int | None:
        self.everything()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the node did not exit {timeout}s after {signal.Signals(sig).name}:\n{self.tail()}") from None

    def survivors(self, timeout: float = 30.0) -> list[int]:
        wait_for(lambda: not any(alive(pid) for pid in self.descendants), timeout, 0.1)
        return [pid for pid in self.descendants if alive(pid)]


def good_page(status: int, body: str) -> bool:
    return status == 200 and sorted(letter for letter, _ in BLOCK.findall(body)) == ["a", "b", "c", "d"]


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
            t.join(60)


@pytest.fixture(scope="module")
def test_db(django_db_setup, django_db_blocker) -> str:
    from django.conf import settings

    return str(settings.DATABASES["default"]["NAME"])


@pytest.fixture(scope="module")
def node(test_db, tmp_path_factory):
    """One node shared by the supervision tests, in order; the last test stops it."""
    log = tmp_path_factory.mktemp("node") / "node.log"
    running = NodeProcess("--masters", "2", "--workers", "2", "--stuck-timeout", "4", log=log, db=test_db)
    yield running.wait_serving()
    if running.proc.poll() is None:
        running.stop(signal.SIGKILL)


def test_the_supervisor_is_the_parent_of_gunicorn_the_router_and_the_workers(node):
    top = psutil.Process(node.proc.pid)
    (arbiter,) = node.arbiter()
    (router,) = node.router()
    workers, masters = node.workers(), node.masters()
    assert len(workers) == 2 and len(masters) == 2
    # gunicorn's waitpid(-1) can only take its masters: the router and workers are not its children.
    assert {psutil.Process(pid).ppid() for pid in [arbiter, router, *workers]} == {top.pid}
    assert {psutil.Process(pid).ppid() for pid in masters} == {arbiter}
    # Nobody forks from a process with threads: the supervisor and the arbiter have one each.
    assert top.num_threads() == 1
    assert psutil.Process(arbiter).num_threads() == 1
    status, body = node.get()
    assert good_page(status, body)
    assert node.worker_rendered(body)


def pages_on_node(node: NodeProcess, concurrently: int, sleep: float) -> list[dict]:
    """That many requests at once, each answering after `sleep` s what its master counts."""
    answers: list[dict] = []

    def one() -> None:
        answers.append(json.loads(node.get(f"/pages_on_node/?sleep={sleep}")[1]))

    threads = [threading.Thread(target=one) for _ in range(concurrently)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == concurrently
    return answers


def test_each_master_counts_the_pages_in_flight_on_the_whole_node(node):
    masters = set(node.masters())
    # Until a round's pages land on both masters (the masters take connections as they come).
    for _ in range(20):
        answers = pages_on_node(node, 3, 1.0)
        if {a["pid"] for a in answers} == masters:
            break
    else:
        raise AssertionError(f"20 rounds of 3 pages never reached both masters {masters}")
    # The first page to wake saw all three, two of them in its master or one; the others may
    # have seen fewer, the first having left.
    first = max(answers, key=lambda a: a["node"])
    assert first["node"] == 3 and first["here"] in (1, 2), answers
    assert all(1 <= a["here"] <= a["node"] for a in answers), answers
    assert [a["node"] for a in pages_on_node(node, 1, 0)] == [1]
    # A master killed with a page in flight: its count goes with it.
    waiting = threading.Thread(target=_try, args=(node.get, "/pages_on_node/?sleep=3"))
    waiting.start()
    assert wait_for(lambda: pages_on_node(node, 1, 0)[0]["node"] == 2, 10, 0.05)
    probe = pages_on_node(node, 1, 0)[0]
    assert probe["node"] == 2, probe
    # here == 2: the waiting page is in the probe's master; 1: in the other one.
    (victim,) = {probe["pid"]} if probe["here"] == 2 else masters - {probe["pid"]}
    os.kill(victim, signal.SIGKILL)
    waiting.join(60)
    assert wait_for(lambda: victim not in node.masters() and len(node.masters()) == 2, 30), node.tail()
    assert max(a["node"] for a in pages_on_node(node, 2, 1.0)) == 2
    assert [a["node"] for a in pages_on_node(node, 1, 0)] == [1]


def test_a_new_connection_goes_to_the_master_with_fewer_requests_in_flight(node):
    masters = set(node.masters())
    apart = 0
    for _ in range(20):
        first: list[dict] = []

        def fetch(into: list[dict] = first) -> None:
            into.append(json.loads(node.get("/pages_on_node/?sleep=0.5")[1]))

        slow = threading.Thread(target=fetch)
        slow.start()
        time.sleep(0.2)  # the slow request is in one master's thread now
        second = json.loads(node.get("/pages_on_node/")[1])
        slow.join(60)
        assert {first[0]["pid"], second["pid"]} <= masters
        apart += first[0]["pid"] != second["pid"]
    # Left to whichever master wakes first, about half would be apart.
    assert apart >= 17, apart


def test_a_master_counts_a_request_only_until_its_last_byte_is_written(node):
    """Requests one after another beside a slow one: each new connection arrives while the
    thread that served the one before is still closing it (50 ms here), and still goes to that
    master."""
    first: list[dict] = []
    slow = threading.Thread(target=lambda: first.append(json.loads(node.get("/pages_on_node/?sleep=3")[1])))
    slow.start()
    time.sleep(0.3)
    quick = [json.loads(node.get("/pages_on_node/?linger=0.05")[1])["pid"] for _ in range(20)]
    slow.join(60)
    # Counted until its thread was done, a quick request's master looked as busy as the slow
    # one's to the next connection, and about half of them went there.
    assert sum(pid == first[0]["pid"] for pid in quick) <= 2, (first, quick)


def test_a_killed_worker_is_logged_by_its_signal_and_replaced(node):
    victim = node.workers()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in node.workers() and len(node.workers()) == 2, 5), node.workers()
    line = node.says(rf"worker {victim} \(slot \d\) ")
    assert "killed by SIGKILL" in line and "unplanned" in line, line
    assert wait_for(node.worker_rendered, 60, 0.2), node.tail()


def test_a_killed_router_is_logged_by_its_signal_restarted_and_masters_reconnect(node):
    (router,) = node.router()
    with Load(node) as load:
        os.kill(router, signal.SIGKILL)
        line = node.says(rf"fastrouter \(pid {router}\) ")
        assert "killed by SIGKILL" in line and "unplanned" in line, line
        assert "exit code 0" not in line and "exited with 0" not in line
        assert wait_for(lambda: node.router() and node.router() != [router], 10), "router not restarted"
        # Masters render inline while they cannot reach it, then reconnect (client backoff <= 2 s).
        assert wait_for(node.worker_rendered, 60, 0.2), f"masters never used the new router:\n{node.tail()}"
    assert not load.failures, load.failures[:3]
    assert load.ok > 0


def test_a_stuck_worker_gets_sigabrt_writes_its_stack_and_is_replaced(node):
    before = set(node.workers())
    # The block sleeps for an hour in a worker (and not at all in a master): after its 1 s
    # timeout the master renders it itself, and the worker stays stuck in the job.
    status, body = node.get("/p/stuck/")
    assert status == 200 and "<div>stuck done</div>" in body, body
    line = node.says(r"silent for .* sending SIGABRT", timeout=60)
    stuck = int(re.search(r"worker (\d+) \(slot \d\)", line).group(1))
    assert stuck in before
    # faulthandler in the worker: its Python stack, down to the frame it is stuck in.
    assert wait_for(lambda: "in sleep_in_worker" in node.log(), 20), node.tail()
    assert "Fatal Python error: Aborted" in node.log()
    ended = node.says(rf"worker {stuck} \(slot \d\) killed by SIGABRT")
    assert "because it was stuck" in ended and "starting a new one" in ended, ended
    assert wait_for(lambda: stuck not in node.workers() and len(node.workers()) == 2, 20)
    assert wait_for(node.worker_rendered, 60, 0.2), node.tail()


def test_a_worker_that_ignores_sigabrt_gets_sigkill(node):
    victim = node.workers()[0]
    os.kill(victim, signal.SIGSTOP)  # stopped: no heartbeat, and SIGABRT stays pending
    try:
        line = node.says(rf"worker {victim} \(slot \d\) did not exit .* after SIGABRT: sending SIGKILL", timeout=60)
        assert line
        assert "killed by SIGKILL" in node.says(rf"worker {victim} \(slot \d\) killed by")
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGCONT)
    assert wait_for(lambda: victim not in node.workers() and len(node.workers()) == 2, 20)


def test_a_killed_arbiter_is_restarted_and_its_masters_go_with_it(node):
    (arbiter,) = node.arbiter()
    masters = node.masters()
    os.kill(arbiter, signal.SIGKILL)
    assert "killed by SIGKILL" in node.says(rf"gunicorn arbiter \(pid {arbiter}\) ")
    assert wait_for(lambda: not any(alive(pid) for pid in masters), 60), "masters outlived their arbiter"
    assert wait_for(lambda: node.arbiter() not in ([], [arbiter]) and len(node.masters()) == 2, 60), node.tail()
    assert wait_for(node.worker_rendered, 90, 0.2), node.tail()


def test_sighup_restarts_workers_and_masters_without_failing_a_page(node):
    assert wait_for(node.worker_rendered, 60, 0.2)
    workers, masters = set(node.workers()), set(node.masters())
    with Load(node) as load:
        assert wait_for(lambda: load.ok >= 2, 60)
        node.proc.send_signal(signal.SIGHUP)

        def replaced() -> bool:
            return not (set(node.workers()) & workers) and not (set(node.masters()) & masters) and len(node.workers()) == 2

        assert wait_for(replaced, 90, 0.2), (workers, node.workers(), masters, node.masters())
        served = load.ok
        assert wait_for(lambda: load.ok >= served + 3, 60)  # pages keep coming from the new set
    assert not load.failures, load.failures[:3]
    assert node.worker_rendered()


def test_sigterm_drains_pages_in_flight_and_leaves_nothing_behind(node):
    from parallel_render.client import StatusPage
    from parallel_render.protocol import parse_address

    node.everything()
    private = node.private_dir()
    status_page = StatusPage(parse_address(f"unix://{private}/router.sock"))
    results: list[tuple[int, str] | Exception] = []

    def slow_page() -> None:
        try:
            results.append(node.get("/p/slow/?sleep=2"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=slow_page) for _ in range(2)]
    for t in threads:
        t.start()

    def both_pages_sent_blocks() -> bool:
        load = status_page.read()
        return load is not None and load.in_flight + load.queued >= 5  # 4 blocks a page

    assert wait_for(both_pages_sent_blocks, 60), status_page.read()
    assert node.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(60)
    assert len(results) == 2
    for result in results:
        assert not isinstance(result, Exception), result
        assert good_page(*result)
    assert node.survivors() == []
    assert not os.path.exists(private)


@pytest.mark.parametrize("limit", [["--max-jobs", "3"], ["--max-memory", "1"]], ids=["max-jobs", "max-memory"])
def test_workers_are_recycled_without_failing_a_page(test_db, tmp_path, limit):
    running = NodeProcess("--masters", "1", "--workers", "2", *limit, log=tmp_path / "node.log", db=test_db).wait_serving()
    try:
        seen: set[int] = set(running.workers())
        for _ in range(12):
            status, body = running.get()
            assert good_page(status, body)
            now = running.workers()
            seen.update(now)
            # A slot has at most its worker, one replacement, and a retired one finishing its job.
            assert len(now) <= 3 * 2, now
        # Every page was whole, and the workers it started with were replaced along the way.
        assert wait_for(lambda: len(seen | set(running.workers())) > 2, 30), seen
        # Recycling is planned: no warning about it.
        assert not running.lines(r"unplanned"), running.lines(r"unplanned")
    finally:
        running.stop(signal.SIGTERM)
    assert running.survivors() == []


def test_sync_masters_serve_pages_rendered_by_workers(test_db, tmp_path):
    running = NodeProcess("--masters", "1", "--workers", "2", "--worker-class", "sync", log=tmp_path / "node.log",
                          db=test_db).wait_serving()
    try:
        status, body = running.get()
        assert good_page(status, body)
    finally:
        running.stop(signal.SIGTERM)
    assert running.survivors() == []


def test_plain_gunicorn_with_the_config_module_becomes_the_same_node(test_db, tmp_path):
    pidfile = tmp_path / "gunicorn.pid"
    running = NodeProcess(log=tmp_path / "node.log", db=test_db, command=[
        "-m", "gunicorn", "-c", "python:parallel_render.gunicorn_conf", "--bind", "{bind}", "-w", "1",
        "--pid", str(pidfile), "tests.wsgi:application"], env={"PARALLEL_RENDER_NODE_WORKERS": "2"}).wait_serving()
    try:
        # The process gunicorn started in is now the supervisor, gunicorn its child.
        assert "parallel_render.node" in cmdline(running.proc.pid)
        assert len(running.arbiter()) == 1 and len(running.masters()) == 1 and len(running.workers()) == 2
        assert pidfile.read_text().strip() == str(running.proc.pid)
    finally:
        assert running.stop(signal.SIGTERM) == 0
    assert running.survivors() == []
    assert not pidfile.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_no_orphans_when_the_node_is_interrupted_or_killed(test_db, tmp_path, monkeypatch, sig):
    # A temporary directory of this test's own: no other supervisor on the machine (they
    # clean up leftovers in theirs as they start) can remove this node's private directory.
    tmp = tempfile.mkdtemp(prefix="pr-tmp-")  # short: a Unix socket path has ~100 bytes
    try:
        running = NodeProcess("--masters", "1", "--workers", "2", log=tmp_path / "node.log", db=test_db,
                              env={"TMPDIR": tmp}).wait_serving()
        private = running.private_dir()
        assert os.path.dirname(private) == tmp
        assert len(running.everything()) == 5  # router, 2 workers, arbiter, 1 master
        running.stop(sig)
        assert running.survivors() == []
        if sig == signal.SIGKILL:
            # Nobody was left to remove the private directory: the next supervisor to start does.
            assert os.path.isdir(private)
            from parallel_render.cluster import LocalCluster

            monkeypatch.setattr(tempfile, "tempdir", tmp)
            with LocalCluster(0):
                assert not os.path.exists(private)
        else:
            assert not os.path.exists(private)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_second_sigterm_stops_at_once(test_db, tmp_path):
    running = NodeProcess("--masters", "1", "--workers", "1", log=tmp_path / "node.log", db=test_db).wait_serving()
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(_try(running.get, "/p/slow/?sleep=30")))
    thread.start()
    assert wait_for(lambda: _busy(running), 60)
    running.proc.send_signal(signal.SIGTERM)
    running.says(r"fastrouter: draining \(SIGTERM\)")  # the supervisor has begun to drain
    running.proc.send_signal(signal.SIGTERM)
    running.says(r"stopping at once \(a second SIGTERM\)")
    assert running.stop(timeout=30) == 0
    assert running.survivors() == []
    thread.join(60)


def _busy(node: NodeProcess) -> bool:
    from parallel_render.client import StatusPage
    from parallel_render.protocol import parse_address

    load = StatusPage(parse_address(f"unix://{node.private_dir()}/router.sock")).read()
    return load is not None and load.in_flight >= 1


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python warns about fork() in a threaded process from 3.12 on")
def test_no_fork_in_a_threaded_process_warning(test_db, tmp_path):
    running = NodeProcess("--masters", "2", "--workers", "1", log=tmp_path / "node.log", db=test_db,
                          env={"PYTHONWARNINGS": "always::DeprecationWarning"}).wait_serving()
    try:
        (arbiter,) = running.arbiter()
        os.kill(arbiter, signal.SIGTTIN)  # one more master: another fork
        assert wait_for(lambda: len(running.masters()) == 3, 60)
    finally:
        running.stop(signal.SIGTERM)
    assert "use of fork() may lead to deadlocks" not in running.log(), running.tail()


def test_leftovers_of_a_dead_supervisor_are_removed_and_a_live_ones_are_not(tmp_path):
    from parallel_render.supervisor import PrivateDir, remove_leftovers

    code = "from parallel_render.supervisor import PrivateDir; import sys, time; print(PrivateDir().path, flush=True); time.sleep(60)"
    mine = PrivateDir()
    try:
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                 env=node_env(None))
        try:
            dead = child.stdout.readline().strip()
        finally:
            child.kill()  # as SIGKILL leaves it: nobody removed its directory
            child.wait()
        assert os.path.isdir(dead) and os.path.isdir(mine.path)
        removed = remove_leftovers()
        assert dead in removed and not os.path.exists(dead)
        assert os.path.isdir(mine.path)  # its owner (this process) is alive
    finally:
        mine.remove()
    assert not os.path.exists(mine.path)


def test_exit_statuses_name_the_signal():
    from parallel_render.process import Exit

    assert str(Exit.from_returncode(-signal.SIGKILL)) == "killed by SIGKILL"
    assert str(Exit.from_returncode(-signal.SIGSEGV)) == "killed by SIGSEGV"
    assert str(Exit.from_returncode(3)) == "exit code 3"
    assert "0" not in str(Exit(unknown=True))


def test_affinity_is_applied_where_there_are_enough_cores(test_db, tmp_path):
    from parallel_render.layout import MIN_PINNED_CPUS, plan, usable_cpus

    cpus = usable_cpus()
    if len(cpus) < MIN_PINNED_CPUS:
        pytest.skip(f"{len(cpus)} usable CPUs: the layout pins nothing below {MIN_PINNED_CPUS} (runparallel --layout says so)")
    layout = plan(cpus, masters=2, workers=2)
    running = NodeProcess("--masters", "2", "--workers", "2", log=tmp_path / "node.log", db=test_db).wait_serving()
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
