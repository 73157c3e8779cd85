"""Where blocks render under load: the router's status page, the dispatch policy, and the
master taking back the blocks no worker has started (with a real router)."""

from __future__ import annotations

import itertools
import math
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from django.template import Template
from django.test import Client

from parallel_render import conf, cpus, policy
from parallel_render import protocol as p
from parallel_render.client import RouterClient, RouterLoad, open_connection
from parallel_render.cluster import LocalCluster
from parallel_render.templatetags.parallel import COST_SAMPLES, parallel_nodes
from parallel_render.testing import parallel_workers, serially
from tests.conftest import block_pids, blocks_of, rescued, run_concurrently, thread


@pytest.fixture(autouse=True)
def cpu(tmp_path, monkeypatch):
    """The CPUs' idle time the policy reads, as this test sets it: all idle unless a test
    says otherwise, whatever else this machine is running."""
    path = tmp_path / "uptime"
    now = [1000.0]
    idle_seconds = [0.0]

    def left_idle(share: float) -> None:
        """From now on, this share of the CPUs' time is idle (read in steps shorter than QUIET,
        so the average is of it alone)."""
        room._read_at = None
        room.idle = None
        step = room.QUIET / 2
        for _ in range(3):
            path.write_text(f"{now[0]:.3f} {idle_seconds[0]:.4f}\n")
            room.sample()
            now[0] += step
            idle_seconds[0] += share * room.cores * step
        path.write_text(f"{now[0]:.3f} {idle_seconds[0]:.4f}\n")

    room = policy.CpuRoom(cpus.UptimeIdle(str(path), cores=2), clock=lambda: now[0])
    room.now = now
    room.left_idle = left_idle
    left_idle(1.0)
    monkeypatch.setattr(policy, "cpu_room", room)
    return room


def load(**fields: int) -> RouterLoad:
    values = {"workers": 4, "idle": 0, "queued": 0, "in_flight": 4, "service_us": 20_000, "wait_us": 0,
              "updated_us": 0, "pid": 1, "stopping": 0}
    values.update(fields)
    return RouterLoad(**values)


# -- the policy ---------------------------------------------------------------------------


def test_without_a_status_page_every_block_is_sent():
    assert policy.should_send(None, None)
    assert policy.should_send(None, 0.1)


def test_an_idle_worker_takes_the_block():
    assert policy.should_send(load(idle=2, queued=1), None)
    assert policy.should_send(load(idle=1, queued=0), None, nested=True)


def test_no_workers_or_a_stopping_router_renders_here():
    assert not policy.should_send(load(workers=0, idle=0), 50.0)
    assert not policy.should_send(load(idle=3, stopping=1), 50.0)


def test_a_block_that_would_wait_longer_than_it_takes_renders_here():
    # 4 workers, 20 ms per job, 3 jobs ahead: this one starts in about (3 + 1) * 20 / 4 = 20 ms.
    busy = load(queued=3)
    assert policy.should_send(busy, 30.0)
    assert not policy.should_send(busy, 10.0)
    # Unmeasured blocks and nested blocks (which may not queue) never wait behind others.
    assert not policy.should_send(busy, None)
    assert not policy.should_send(load(queued=0), 500.0, nested=True)


def test_the_idle_share_is_read_from_proc_uptime_and_averaged(cpu):
    cpu.left_idle(0.5)
    assert cpu.sample() == pytest.approx(0.5)
    assert cpu.has_room(0.4) and not cpu.has_room(0.6)
    # Reads closer together than SAMPLE_EVERY share one; a later one moves the average toward
    # what it saw, the more the longer since the last one.
    with open(cpu.counter.path, "w") as f:
        f.write(f"{cpu.now[0] + 0.02:.2f} {cpu._idle_seconds:.2f}\n")  # 20 ms, none of it idle
    cpu.now[0] += cpu.SAMPLE_EVERY / 2
    assert cpu.sample() == pytest.approx(0.5)
    cpu.now[0] += 0.02 - cpu.SAMPLE_EVERY / 2
    weight = 1 - math.exp(-0.02 / cpu.MEMORY)
    assert cpu.sample() == pytest.approx(0.5 + weight * (0.0 - 0.5))
    cpu.left_idle(0.0)  # a while of busy CPUs: the past is forgotten
    assert cpu.sample() == pytest.approx(0.0, abs=0.01)
    assert policy.CpuRoom(cpus.UptimeIdle("/nonexistent/uptime")).has_room(1.0)  # unreadable: never a reason


def quiet_spell(cpu, seconds: float = 1.0) -> None:
    """No read for `seconds`, every CPU idle all along."""
    idle_seconds = cpu._idle_seconds + seconds * cpu.cores
    cpu.now[0] += seconds
    with open(cpu.counter.path, "w") as f:
        f.write(f"{cpu.now[0]:.3f} {idle_seconds:.4f}\n")


def test_after_a_quiet_spell_the_average_starts_afresh(cpu):
    # A burst of pages on a node that was idle: the spell's idle time says nothing of them.
    cpu.left_idle(0.0)
    quiet_spell(cpu)
    assert cpu.sample() is None and cpu.has_room(1.0)  # not known yet: as with no counter
    cpu.now[0] += 0.02  # the burst's first 20 ms, every CPU busy
    assert cpu.sample() == pytest.approx(0.0, abs=1e-6)  # read as busy at once
    # Blended in, the spell would still read as most of the CPUs idle for about 0.2 s.
    blended = policy.CpuRoom(cpu.counter, clock=lambda: cpu.now[0])
    blended.QUIET = math.inf
    cpu.left_idle(0.0)
    blended.sample()
    quiet_spell(cpu)
    assert blended.sample() > 0.99
    cpu.now[0] += 0.02
    assert blended.sample() > 0.8


def test_the_real_proc_uptime_gives_a_share():
    room = policy.CpuRoom()
    room.sample()
    time.sleep(room.SAMPLE_EVERY * 3)
    assert 0.0 <= room.sample() <= 1.0


def test_a_block_needs_more_idle_cpu_the_more_a_worker_renders_it_over_the_master(cpu):
    assert policy.idle_needed(10.0, 10.0) == policy.IDLE_SHARE
    assert policy.idle_needed(10.0, 8.0) == policy.IDLE_SHARE  # cheaper there: no less than the floor
    assert policy.idle_needed(10.0, 15.0) == pytest.approx(policy.IDLE_SHARE + 0.5 * policy.IDLE_PER_EXTRA)
    assert policy.idle_needed(1.0, 100.0) == policy.IDLE_MOST
    unknown = policy.IDLE_SHARE + policy.DEFAULT_EXTRA * policy.IDLE_PER_EXTRA
    assert policy.idle_needed(None, 10.0) == policy.idle_needed(10.0, None) == pytest.approx(unknown)

    idle = load(idle=2, queued=0)
    cpu.left_idle(0.6)
    assert policy.should_send(idle, 20.0, here_cpu_ms=18.0, sent_cpu_ms=18.0)
    cpu.left_idle(policy.IDLE_SHARE / 2)  # the CPUs are busy
    assert not policy.should_send(idle, 20.0, here_cpu_ms=18.0, sent_cpu_ms=18.0)
    assert not policy.should_send(idle, 20.0)  # not measured: as busy for it
    assert policy.should_send(None, 20.0)  # a TCP router's workers have CPUs of their own
    cpu.left_idle(policy.IDLE_SHARE + 0.1)
    assert policy.should_send(idle, 20.0, here_cpu_ms=10.0, sent_cpu_ms=10.0)
    assert not policy.should_send(idle, 20.0, here_cpu_ms=10.0, sent_cpu_ms=20.0)  # twice the CPU in a worker


def test_a_block_keeps_its_cpu_here_and_in_workers_apart():
    node = parallel_nodes(Template("{% load parallel %}{% parallel %}x{% endparallel %}"))[0]
    node.observe(40.0, 10.0)
    node.observe(30.0, 14.0, sent=True)
    assert (node.cost_ms, node.here_cpu_ms, node.sent_cpu_ms) == (35.0, 10.0, 14.0)
    node.observe(30.0)  # CPU time not known: the medians stay
    assert (node.here_cpu_ms, node.sent_cpu_ms) == (10.0, 14.0)


def test_measuring_counts_this_threads_cpu():
    started = policy.start_measuring()
    end = time.thread_time() + 0.02
    while time.thread_time() < end:
        pass
    time.sleep(0.05)
    ms, cpu_ms = policy.measured(started)
    assert ms >= 70 and 19 <= cpu_ms < ms


# -- a worker the test controls, on a real router ---------------------------------------------


class EchoWorker:
    """A worker peer that answers each JOB with its payload and records what it was given."""

    def __init__(self, address: str, hold: threading.Event | None = None) -> None:
        self.sock = open_connection(p.parse_address(address), p.ROLE_WORKER, p.encode(p.READY))
        self.sock.settimeout(None)
        self.hold = hold
        self.seen: list[bytes] = []
        self.holding = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        reader = p.FrameReader()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            for frame in reader.feed(data):
                if frame.type != p.JOB:
                    continue
                self.seen.append(frame.payload)
                if self.hold is not None:
                    self.holding.set()
                    self.hold.wait(10)
                try:
                    self.sock.sendall(p.encode(p.RESULT, frame.job_id, frame.payload) + p.encode(p.READY))
                except OSError:
                    return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def router():
    with LocalCluster(0) as cluster:
        yield cluster


def test_the_status_page_follows_the_router(router):
    client = RouterClient(router.address)
    first = client.load()
    assert first is not None and first.workers == 0 and first.pid == router.router.pid
    hold = threading.Event()
    worker = EchoWorker(router.address, hold)
    try:
        wait_for(lambda: client.load().idle == 1)
        ids = [client.submit(b"job", 5.0) for _ in range(3)]
        wait_for(lambda: (client.load().queued, client.load().in_flight, client.load().idle) == (2, 1, 0))
        hold.set()
        answers = client.collect(ids, time.monotonic() + 5)
        assert [answers[i].type for i in ids] == [p.RESULT] * 3
        wait_for(lambda: client.load().service_us > 0 and client.load().queued == 0)
    finally:
        hold.set()
        worker.close()
        client.close()


def test_a_tcp_router_has_no_status_page():
    with LocalCluster(0, address="tcp://127.0.0.1:0") as cluster:
        assert RouterClient(cluster.address).load() is None


def test_a_queued_job_is_taken_back_and_a_started_one_is_not(router):
    client = RouterClient(router.address)
    hold = threading.Event()
    worker = None
    try:
        a, b, c = (client.submit(name, 5.0) for name in (b"a", b"b", b"c"))
        deadline = time.monotonic() + 5
        assert client.withdraw([c], deadline) == {c: True}
        worker = EchoWorker(router.address, hold)
        worker.holding.wait(5)
        assert worker.seen == [b"a"]
        # With the worker: its answer follows. Still queued: taken. Both in one round trip.
        assert client.withdraw([b, a], deadline) == {a: False, b: True}
        hold.set()
        answers = client.collect([a], deadline)
        assert answers[a].type == p.RESULT and answers[a].payload == b"a"
        assert client.withdraw([a], deadline) == {a: None}  # answered already
        time.sleep(0.1)
        assert worker.seen == [b"a"]  # b and c never reached a worker
        stats = client.stats()
        assert (stats["withdrawn"], stats["withdraw_missed"]) == (2, 1)
    finally:
        hold.set()
        if worker is not None:
            worker.close()
        client.close()


def test_take_back_races_workers_starting_the_same_jobs(router):
    """Threads sharing one connection submit and at once take back, while two workers take
    jobs as fast as they can: every job ends exactly once, by a worker or by its master."""
    workers = [EchoWorker(router.address), EchoWorker(router.address)]
    client = RouterClient(router.address)
    taken: list[bytes] = []
    answered: dict[bytes, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def master(n: int) -> None:
        rng = random.Random(n)
        for i in range(300):
            name = f"{n}-{i}".encode()
            ids = {client.submit(name + b"-" + bytes([k + 48]), 5.0): name + b"-" + bytes([k + 48])
                   for k in range(3)}
            if rng.random() < 0.5:
                time.sleep(rng.random() / 5000)
            deadline = time.monotonic() + 5
            newest = sorted(ids, reverse=True)
            outcome = client.withdraw(newest[:1], deadline)
            outcome.update(client.withdraw(newest[1:], deadline))
            out = [ids[job_id] for job_id, taken_back in outcome.items() if taken_back is True]
            rest = [job_id for job_id in ids if ids[job_id] not in out]
            got = client.collect(rest, deadline)
            with lock:
                taken.extend(out)
                for job_id in rest:
                    answer = got.get(job_id)
                    if answer is None or answer.type != p.RESULT:
                        errors.append(f"{ids[job_id]!r}: {answer}")
                    else:
                        answered[ids[job_id]] = answer.payload

    threads = [threading.Thread(target=master, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(0.2)
        seen = [job for w in workers for job in w.seen]
        assert not errors, errors[:5]
        assert all(payload == job for job, payload in answered.items())
        assert len(seen) == len(set(seen)) == len(answered), "a job reached a worker twice or was lost"
        assert not set(seen) & set(taken), "a job was taken back and rendered by a worker too"
        assert len(taken) + len(answered) == 4 * 300 * 3
        # Both outcomes happened many times, so the race was really run.
        assert len(taken) > 50 and len(answered) > 50, (len(taken), len(answered))
        stats = client.stats()
        assert stats["withdrawn"] == len(taken)
        assert stats["jobs_live"] == 0 or stats["queued"] == 0
    finally:
        client.close()
        for w in workers:
            w.close()


# -- whole pages ----------------------------------------------------------------------------


@pytest.fixture
def adaptive(settings):
    """The policy production runs (the suite's settings send every block, to check where they render)."""
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ADAPTIVE": True}


@pytest.fixture
def tcp_worker(adaptive, django_db_setup, django_db_blocker, transactional_db):
    # A TCP router publishes no status page, so the master sends every block and takes back
    # at the end what the only worker has not started.
    with parallel_workers(1, address="tcp://127.0.0.1:0") as cluster:
        yield cluster


def test_the_master_takes_back_what_its_worker_has_not_started(tcp_worker):
    client = Client()
    with serially():
        serial = client.get("/p/takeback/?sleep=0.15")
    response = client.get("/p/takeback/?sleep=0.15")
    assert response.content == serial.content
    for letter in "abcd":
        assert response.content.count(f"<div>{letter} ".encode()) == 1
    how = rescued(response)
    assert how and all(reason == "taken back" for reason in how), how
    assert block_pids(response) == [tcp_worker.worker_pids[0]] * (4 - len(how))
    assert 1 <= len(how) <= 3


@pytest.fixture
def unix_workers(adaptive, django_db_setup, django_db_blocker, transactional_db):
    # A router of this test's own, so its moving averages start from this test's jobs.
    with parallel_workers(2) as cluster:
        yield cluster


def while_every_worker_is_busy(client: Client, router: RouterClient, path: str, busy_for: float):
    """The page at path, fetched while another request keeps every worker busy for busy_for
    seconds, and how many jobs the router was sent meanwhile.

    The busy page decides each of its blocks as it reaches it, sending some and queueing more
    right after: the count starts once the router has had no new job for STEADY seconds, so
    that it counts this page's jobs only."""
    busy = thread(lambda: Client().get(f"/p/slow/?sleep={busy_for}"))
    busy.start()
    try:
        wait_for(lambda: router.load().idle == 0)
        before = submitted_once_steady(router)
        response = client.get(path)
        after = router.stats()["submitted"]
    finally:
        busy.join(30)
    return response, after - before


STEADY = 0.1


def submitted_once_steady(router: RouterClient) -> int:
    """The router's count of jobs submitted, once it has not changed for STEADY seconds."""
    last, since = router.stats()["submitted"], time.monotonic()
    while time.monotonic() - since < STEADY:
        time.sleep(0.01)
        now = router.stats()["submitted"]
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_block_that_would_only_wait_renders_in_place_without_being_sent(unix_workers, settings):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "MASTER_THREADS": 0}
    client = Client()
    router = RouterClient(unix_workers.address)
    client.get("/p/slow/?sleep=0.4")  # the workers' jobs take 0.4 s: the router's service average
    client.get("/p/takeback/?sleep=0.02")  # these blocks cost 20 ms: their own average
    with serially():
        serial = client.get("/p/takeback/?sleep=0.02")
    response, sent = while_every_worker_is_busy(client, router, "/p/takeback/?sleep=0.02", busy_for=1)
    assert response.content == serial.content
    # A worker would start these after ~(0 + 1) x 400 ms / 2 workers, far longer than the 20 ms
    # they take: the master rendered all four in place and sent none.
    assert sent == 0
    assert [r.outcome for r in blocks_of(response)] == ["inline"] * 4


def measured_blocks_that_wait(client: Client):
    """The router's jobs measured at 400 ms and the takeback page's blocks at 100 ms, nearly all
    of it asleep (they wait); the page rendered serially."""
    client.get("/p/slow/?sleep=0.4")
    for _ in range(2):
        client.get("/p/takeback/?sleep=0.1")
    with serially():
        return client.get("/p/takeback/?sleep=0.1")


def test_blocks_that_wait_and_stay_in_the_master_wait_together_in_its_threads(unix_workers, blocks):
    client = Client()
    router = RouterClient(unix_workers.address)
    serial = measured_blocks_that_wait(client)
    try:
        response, sent = while_every_worker_is_busy(client, router, "/p/takeback/?sleep=0.1", busy_for=1.5)
    finally:
        router.close()
    assert response.content == serial.content
    assert sent == 0  # none went to the router
    records = blocks_of(response)
    assert len(records) == 4 and not block_pids(response)
    # Rendered by the master's block threads (or, not started yet when the page was done,
    # taken back by the page's own thread), from their jobs, as a worker renders them.
    in_threads = [r for r in records if r.outcome == "inline"]
    assert in_threads and all(r.reason == "no idle worker: rendered in a thread of the master" for r in in_threads)
    assert all(r.outcome == "inline" or r.reason == "taken back" for r in records)
    # Their sleeps overlapped: the page did not wait for them one after another.
    spans = sorted((r.render_start_ms, r.render_start_ms + r.render_ms) for r in records)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert "master thread render" in response.headers["Server-Timing"]


def test_with_every_cpu_busy_blocks_that_wait_render_in_place_not_in_threads(unix_workers, cpu):
    client = Client()
    for _ in range(3):  # measured: each sleeps 50 ms, so it waits
        client.get("/p/takeback/?sleep=0.05")
    with serially():
        serial = client.get("/p/takeback/?sleep=0.05")
    cpu.left_idle(policy.THREAD_IDLE_SHARE / 2)
    response = client.get("/p/takeback/?sleep=0.05")
    assert response.content == serial.content
    records = blocks_of(response)
    # A thread would only take CPU time from the other pages of this master: all four stayed
    # with the page's own thread, in place.
    assert [r.outcome for r in records] == ["inline"] * 4
    assert all(r.reason == "every CPU busy" for r in records)


def test_with_busy_cpus_a_page_keeps_out_only_its_share_of_the_workers(cpu, monkeypatch):
    assert [policy.share_of_workers(8, pages) for pages in (0, 1, 3, 4, 16)] == [8, 8, 3, 2, 1]
    # This process is the master in slot 0 of a node; the master in slot 1 has one page.
    node = policy.NodePages(4)
    node.claim(0)
    monkeypatch.setattr(policy.pages_in_flight, "node", node)
    node.counts[1] = 1
    eight = load(workers=8, idle=4)

    def never() -> int:
        raise AssertionError("a page's blocks are counted only when its share matters")

    cpu.left_idle(0.0)
    with policy.pages_in_flight:  # 2 pages on the node, 4 workers each
        assert list(node.counts) == [1, 1, 0, 0] and policy.pages_in_flight.on_node() == 2
        assert not policy.holds_its_share(eight, lambda: 3) and policy.holds_its_share(eight, lambda: 4)
        node.counts[1] = 3  # the other master is crowded: 4 on the node, 2 workers each, here too
        assert not policy.holds_its_share(eight, lambda: 1) and policy.holds_its_share(eight, lambda: 2)
        cpu.left_idle(policy.FAIR_IDLE_SHARE + 0.05)  # idle CPU: a page takes what is free
        assert not policy.holds_its_share(eight, never)
        assert not policy.holds_its_share(None, never)  # no status page: nothing to share out
    assert node.counts[0] == 0
    node.clear(1)  # the other master exited
    cpu.left_idle(0.0)
    with policy.pages_in_flight:  # the only page on the node takes every worker
        assert not policy.holds_its_share(eight, never)
    monkeypatch.setattr(policy.pages_in_flight, "node", None)  # runserver: the only master
    with policy.pages_in_flight, policy.pages_in_flight:
        assert policy.pages_in_flight.on_node() == 2
        assert policy.holds_its_share(eight, lambda: 4) and not policy.holds_its_share(eight, lambda: 3)


def test_with_busy_cpus_a_page_keeps_in_threads_only_its_share_of_its_masters_threads(cpu, monkeypatch):
    monkeypatch.setattr(policy.pages_in_flight, "node", None)

    def never() -> int:
        raise AssertionError("a page's blocks in threads are counted only when its share matters")

    cpu.left_idle(0.0)
    with policy.pages_in_flight:  # the master's only page takes every thread
        assert not policy.holds_its_threads(4, never)
        with policy.pages_in_flight, policy.pages_in_flight, policy.pages_in_flight:  # 4 pages: a thread each
            assert policy.holds_its_threads(4, lambda: 1) and not policy.holds_its_threads(4, lambda: 0)
            cpu.left_idle(policy.FAIR_IDLE_SHARE + 0.05)  # idle CPU: a page takes what is free
            assert not policy.holds_its_threads(4, never)
            cpu.left_idle(0.0)
        with policy.pages_in_flight:  # 2 pages: two threads each
            assert policy.holds_its_threads(4, lambda: 2) and not policy.holds_its_threads(4, lambda: 1)


def test_beside_other_pages_of_its_master_a_page_renders_one_block_at_a_time_in_threads(unix_workers, cpu, monkeypatch):
    monkeypatch.setattr(policy.pages_in_flight, "node", None)
    client = Client()
    router = RouterClient(unix_workers.address)
    serial = measured_blocks_that_wait(client)
    busy = thread(lambda: Client().get("/p/slow/?sleep=1.5"))
    busy.start()
    try:
        wait_for(lambda: router.load().idle == 0)  # every worker busy: the blocks are kept
        # The CPUs are busy enough for shares to matter, not for threads to be refused, and
        # three other pages are in flight in this master: the page's share is one of its 4
        # threads.
        cpu.left_idle((policy.THREAD_IDLE_SHARE + policy.FAIR_IDLE_SHARE) / 2)
        with policy.pages_in_flight, policy.pages_in_flight, policy.pages_in_flight:
            response = client.get("/p/takeback/?sleep=0.1")
    finally:
        busy.join(30)
        router.close()
    assert response.content == serial.content
    records = blocks_of(response)
    in_threads = [r for r in records if r.reason.endswith(": rendered in a thread of the master")]
    in_place = [r for r in records if r.outcome == "inline" and r not in in_threads]
    assert len(in_threads) + len(in_place) + len(rescued(response)) == 4, [(r.outcome, r.reason) for r in records]
    assert in_threads and in_place, [(r.outcome, r.reason) for r in records]
    # Its blocks in threads ran one after another: never two of its threads at once.
    spans = sorted((r.render_start_ms, r.render_start_ms + r.render_ms) for r in in_threads)
    assert all(later[0] >= earlier[1] - 1.0 for earlier, later in itertools.pairwise(spans)), spans


def test_the_masters_of_a_node_count_each_others_pages_in_shared_memory():
    # As in a node: the counts are mapped, then a master is forked (in a fresh interpreter with
    # one thread, as gunicorn's arbiter is), claims its slot and publishes its pages.
    script = """
import os
from parallel_render.policy import NodePages
node = NodePages(2)
node.claim(0)
ready, done = os.pipe(), os.pipe()
pid = os.fork()
if pid == 0:
    node.claim(1)
    node.publish(3)
    os.write(ready[1], b"x")
    os.read(done[0], 1)
    os._exit(0)
os.read(ready[0], 1)
node.publish(2)
seen = node.total(2)
os.write(done[1], b"x")
os.waitpid(pid, 0)
node.clear(1)
print(seen, node.total(2))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["5", "2"], out  # both masters' pages, then the exited one's gone
    beyond = policy.NodePages(2)
    beyond.claim(5)  # more masters than slots: its own pages still count
    assert beyond.total(4) == 4


def test_a_master_with_more_requests_in_flight_than_another_lets_it_accept_first():
    from parallel_render.balance import NO_MASTER, NodeRequests

    table = NodeRequests(4)
    assert not table.busier_than_another()  # not a node's master
    table.claim(0)
    table.counts[1] = 0  # another master, idle
    assert not table.busier_than_another()  # nothing in flight here
    table.change(1)
    assert list(table.counts) == [1, 0, NO_MASTER, NO_MASTER] and table.busier_than_another()
    table.counts[1] = 1
    assert not table.busier_than_another()  # as busy as the other
    table.change(1)
    assert table.busier_than_another()
    table.clear(1)  # the other master exited: slots without a master are not less busy
    assert not table.busier_than_another()
    table.change(-2)
    assert table.counts[0] == 0


def test_a_request_counts_from_the_application_call_until_its_response_is_closed(monkeypatch):
    from gunicorn.workers.gthread import ThreadWorker

    from parallel_render import balance

    table = balance.NodeRequests(2)
    table.claim(0)
    seen_at_close = []

    class Response(list):  # streamed
        def close(self) -> None:  # Django's close: request_finished and the rest
            seen_at_close.append(table.counts[0])

    def application(environ, start_response):
        if environ.get("fail"):
            raise RuntimeError("the view failed")
        return environ.get("response") or Response([b"page"])

    counted = balance.CountedApplication(application, table)
    response = counted({}, None)
    assert table.counts[0] == 1 and list(response) == [b"page"]
    response.close()
    assert table.counts[0] == 0 and seen_at_close == [0]  # released first, then the response's own close
    response.close()  # released once
    assert table.counts[0] == 0
    with pytest.raises(RuntimeError):
        counted({"fail": True}, None)
    assert table.counts[0] == 0
    whole = Response([b"page"])
    whole.streaming = False  # a Django HttpResponse: rendered, only its writing is left
    assert counted({"response": whole}, None) is whole and table.counts[0] == 0

    # In a master: a connection counts once it is queued for a thread, before its request is
    # read; the thread's application call adopts that count, and the response's close ends it.
    # A file the server sends with sendfile() is returned as it is, and released when the
    # thread's handle() is done with the connection.
    class FileWrapper:
        pass

    class Conn:
        pass

    sent = FileWrapper()
    monkeypatch.setattr(balance, "node_requests", table)
    worker = balance.BalancedThreadWorker.__new__(balance.BalancedThreadWorker)
    queued: list = []
    monkeypatch.setattr(ThreadWorker, "enqueue_req", lambda self, conn: queued.append(conn))
    during = []

    def handle(self, conn):
        during.append(table.counts[0])
        response = counted(conn.environ, None)
        during.append(table.counts[0])
        if not isinstance(response, FileWrapper):
            response.close()
        during.append(table.counts[0])
        return True

    monkeypatch.setattr(ThreadWorker, "handle", handle)
    page, file = Conn(), Conn()
    page.environ, file.environ = {}, {"wsgi.file_wrapper": FileWrapper, "response": sent}
    for conn in (page, file):
        worker.enqueue_req(conn)
    assert table.counts[0] == 2  # two connections queued, no request read yet
    assert worker.handle(page) is True and during == [2, 2, 1] and table.counts[0] == 1
    assert worker.handle(file) is True and during[3:] == [1, 1, 1] and table.counts[0] == 0
    assert worker.handle(page) is True and during[6:] == [0, 1, 0]  # a kept-alive request counts anew


def test_a_busier_master_accepts_only_what_no_less_busy_master_took_in_time(monkeypatch):
    import socket

    from gunicorn.workers.gthread import ThreadWorker

    from parallel_render import balance

    table = balance.NodeRequests(2)
    table.claim(0)
    table.counts[1] = 0  # another master, idle
    table.change(1)  # this one serves a request
    accepted = []
    monkeypatch.setattr(ThreadWorker, "accept", lambda self, listener: accepted.append(listener.accept()[0]))
    monkeypatch.setattr(balance, "node_requests", table)
    worker = balance.BalancedThreadWorker.__new__(balance.BalancedThreadWorker)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        address = listener.getsockname()
        with socket.create_connection(address), socket.create_connection(address):
            time.sleep(0.05)
            listener.accept()[0].close()  # the idle master took the first connection
            started = time.monotonic()
            worker.accept(listener)  # so this master accepts the second, after waiting for it
            assert time.monotonic() - started >= balance.ACCEPT_WAIT and len(accepted) == 1
            accepted.pop().close()
            assert worker.accept(listener) is None and not accepted  # none waits: nothing to accept
    table.change(-1)


def test_a_page_that_holds_its_share_leaves_the_rest_of_the_workers_to_the_pages_beside_it(
    unix_workers, cpu, monkeypatch
):
    from django.template.loader import get_template

    client = Client()
    path = "/p/takeback/?sleep=0.05"
    for _ in range(3):
        client.get(path)  # measured in workers: each sleeps 50 ms, so it waits
    for node in parallel_nodes(get_template("t/takeback.html").template).values():
        node.here_cpu_ms = node.sent_cpu_ms  # as cheap here as there: sent whenever a tenth is idle
    with serially():
        serial = client.get(path)
    # This page and one other in this master (the `with` below), two in another master: four
    # pages on the node share its two workers, one each; a fifth of the CPUs' time idle.
    node = policy.NodePages(2)
    node.claim(0)
    node.counts[1] = 2
    monkeypatch.setattr(policy.pages_in_flight, "node", node)
    cpu.left_idle((policy.IDLE_SHARE + policy.FAIR_IDLE_SHARE) / 2)
    with policy.pages_in_flight:
        response = client.get(path)
        assert policy.pages_in_flight.count == 1  # the page counted itself while it rendered
    with pytest.raises(ValueError):
        client.get("/p/raise_after/?n=2")  # a page whose view raises after its blocks went out
    assert policy.pages_in_flight.count == 0
    assert response.content == serial.content
    records = blocks_of(response)
    assert [r.outcome for r in records].count("sent") == 1
    kept = [r for r in records if r.outcome != "sent"]
    assert len(kept) == 3
    # Kept, they wait in the master's block threads, as any kept block that waits would, up
    # to the page's share of them (2 of the 4 for the master's two pages); the rest render in
    # place (or, not started when the page was done, are taken back by the page's own thread).
    why = "its page holds its share of the workers"
    in_threads = [r for r in kept if r.reason == f"{why}: rendered in a thread of the master"]
    assert 1 <= len(in_threads) <= 2, kept
    assert all(r.reason in (why, f"{why}: rendered in a thread of the master", "taken back") for r in kept), kept


def test_a_block_goes_to_a_master_thread_only_when_it_sleeps_at_least_as_long_as_it_computes():
    from parallel_render.templatetags.parallel import ParallelNode

    node = ParallelNode.__new__(ParallelNode)
    node.cost_ms = node.here_cpu_ms = node.sent_cpu_ms = node.io_ms = None
    node._samples, node._here_samples, node._sent_samples, node._io_samples = [], [], [], []
    assert not node.waits()  # not measured
    for _ in range(COST_SAMPLES):
        # A master's renders of a block that computes, slowed by its other threads: they
        # say nothing of what it sleeps (that lock's wait looks the same).
        node.observe(40.0, 11.0)
    assert not node.waits()
    for _ in range(COST_SAMPLES):  # a worker measured it: 11 ms of CPU, 29 waiting for one
        node.observe(40.0, 11.0, sent=True, io_ms=0.0)
    assert not node.waits()
    for _ in range(COST_SAMPLES):  # a block that sleeps 11 ms and computes 3
        node.observe(14.0, 3.0)
        node.observe(14.5, 3.5, sent=True, io_ms=11.0)
    assert node.waits() and node.io_ms == pytest.approx(11.0)
    node._samples[:] = [0.5] * COST_SAMPLES
    node.observe(0.5, 0.1)
    assert not node.waits()  # too cheap for a thread: its job would cost more than it saves


def test_a_worker_tells_the_time_a_block_slept_from_its_wait_for_a_cpu(parallel):
    """A real worker's result: a block that sleeps reports the sleep, one that computes none."""
    from django.template.loader import get_template

    client = Client()
    for _ in range(3):
        client.get("/p/takeback/?sleep=0.03")
        client.get("/p/cpu_bound/?ms=15")
    (sleeps,) = parallel_nodes(get_template("t/takeback.html").template).values()
    (computes,) = parallel_nodes(get_template("t/cpu_bound.html").template).values()
    assert sleeps.io_ms >= 25.0 and sleeps.waits()
    assert computes.io_ms < 5.0 and not computes.waits()


def test_with_the_cpus_busy_blocks_render_in_place(unix_workers, cpu):
    client = Client()
    router = RouterClient(unix_workers.address)
    for _ in range(3):  # the blocks' costs as the workers report them
        client.get("/p/cpu_bound/?ms=15")
    with serially():
        serial = client.get("/p/cpu_bound/?ms=15")
    cpu.left_idle(0.0)
    before = router.stats()
    response = client.get("/p/cpu_bound/?ms=15")
    after = router.stats()
    assert response.content == serial.content
    assert after["submitted"] == before["submitted"]  # all four rendered here, none sent
    assert not block_pids(response)
    cpu.left_idle(1.0)  # room again: the blocks go
    response = client.get("/p/cpu_bound/?ms=15")
    assert response.content == serial.content and block_pids(response)
    router.close()


def test_with_a_page_for_every_cpu_blocks_that_compute_stay_and_blocks_that_wait_go(
    unix_workers, cpu, monkeypatch
):
    from django.template.loader import get_template

    client = Client()
    for _ in range(3):  # measured in workers: one computes, the other sleeps
        client.get("/p/cpu_bound/?ms=15")
        client.get("/p/takeback/?sleep=0.03")
    with serially():
        serial = {path: client.get(path).content for path in ("/p/cpu_bound/?ms=15", "/p/takeback/?sleep=0.03")}
    # Two CPUs (the cpu fixture), and with this page two on the node: one in another master.
    node = policy.NodePages(2)
    node.claim(0)
    node.counts[1] = 1
    monkeypatch.setattr(policy.pages_in_flight, "node", node)
    cpu.left_idle(policy.FAIR_IDLE_SHARE / 2)  # busy, with room enough for any block to be sent
    (block,) = parallel_nodes(get_template("t/cpu_bound.html").template).values()
    (sleeper,) = parallel_nodes(get_template("t/takeback.html").template).values()
    for each in (block, sleeper):
        each.here_cpu_ms = each.sent_cpu_ms  # as cheap here as there: sent whenever a tenth is idle
    computes = client.get("/p/cpu_bound/?ms=15")  # each page counts itself in its master's slot
    waits = client.get("/p/takeback/?sleep=0.03")
    assert computes.content == serial["/p/cpu_bound/?ms=15"] and waits.content == serial["/p/takeback/?sleep=0.03"]
    assert {(r.outcome, r.reason) for r in blocks_of(computes)} == {("inline", "every CPU has a page")}
    # The blocks that wait are not kept for it (past the page's share of the two workers,
    # they wait in block threads of the master).
    assert "sent" in {r.outcome for r in blocks_of(waits)}
    assert all(r.reason != "every CPU has a page" for r in blocks_of(waits))

    def goes() -> bool:
        """Whether the page's blocks go to the workers (those no worker started in time, the
        page takes back)."""
        block.here_cpu_ms = block.sent_cpu_ms  # as cheap here as there: sent whenever a tenth is idle
        records = blocks_of(client.get("/p/cpu_bound/?ms=15"))
        return "sent" in {r.outcome for r in records} and all(r.reason != "every CPU has a page" for r in records)

    node.counts[1] = 0  # alone on the node: a CPU is its own, and its blocks go
    assert goes()
    node.counts[1] = 1
    cpu.left_idle(policy.FAIR_IDLE_SHARE + 0.05)  # two pages, but their CPUs often idle
    assert goes()


def test_no_page_gets_another_requests_blocks_while_masters_take_blocks_back(parallel, adaptive):
    def fetch(path: str) -> tuple[str, str]:
        response = Client().get(path)
        return response.content.decode(), response.headers.get("Server-Timing", "")

    assert not run_concurrently(fetch, clients=12, rounds=3, n=8)[:2]
    assert run_concurrently.pids <= set(parallel.worker_pids)


def test_without_adaptive_every_block_waits_for_a_worker(tcp_worker, settings):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ADAPTIVE": False}
    response = Client().get("/p/takeback/?sleep=0.05")
    assert not rescued(response)
    assert block_pids(response) == [tcp_worker.worker_pids[0]] * 4


# -- cheap blocks share a job ---------------------------------------------------------------


def test_cheap_blocks_travel_together_in_one_job(parallel):
    client = Client()
    router = RouterClient(parallel.address)
    path = "/p/bundle/?marker=m&n=12"
    for _ in range(3):
        client.get(path)  # measures the blocks: each costs far less than a job's worth (1 ms)
    with serially():
        serial = client.get(path)
    before = router.stats()
    response = client.get(path)
    after = router.stats()
    assert response.content == serial.content
    assert len(block_pids(response)) == 12 and not rescued(response)
    assert after["submitted"] - before["submitted"] < 12
    assert len(set(block_pids(response))) <= after["submitted"] - before["submitted"]


def test_a_bundle_renders_each_block_in_its_own_language_and_time_zone(parallel):
    """A worker activates a bundle's language and time zone once for blocks that share them,
    and again for each block whose differ: here they alternate."""
    client = Client()
    path = "/p/bundle_env/?n=10"
    for _ in range(3):
        client.get(path)  # measured: cheap, so they travel in bundles
    with serially():
        serial = client.get(path)
    router = RouterClient(parallel.address)
    before = router.stats()
    response = client.get(path)
    after = router.stats()
    assert response.content == serial.content
    body = response.content.decode()
    assert "<i>0 lundi 16:08 Oui</i>" in body and "<i>1 Monday 09:08 Yes</i>" in body
    assert len(block_pids(response)) == 10 and not rescued(response)
    assert after["submitted"] - before["submitted"] < 10  # some blocks shared a job


def test_a_failing_block_in_a_bundle_costs_only_itself(parallel, settings):
    settings.DEBUG = False
    client = Client()
    for _ in range(3):
        client.get("/p/bundle/?marker=m&n=8")
    response = client.get("/p/bundle/?marker=m&n=8&fail=3")
    body = response.content.decode()
    assert "<i>sorry 3</i>" in body
    assert all(f"<i>m-{i}</i>" in body for i in range(8) if i != 3)
    assert len(block_pids(response)) == 7
    assert rescued(response) == ["worker error: ValueError: boom"]


def test_a_restarted_router_is_read_from_its_new_status_page(router):
    client = RouterClient(router.address)
    first = client.load()
    assert first is not None and first.pid == router.router.pid
    router.router.kill()  # no drain: its page stays behind, no longer written
    # Until the supervisor's new router takes the path over, the old page reads as stale.
    wait_for(lambda: (load := client.load()) is not None and load.pid != first.pid, timeout=15)
    assert client.load().pid == router.router.pid


def test_the_default_min_block_ms_keeps_cheap_blocks_in_the_master_once_measured(parallel, settings):
    """The test settings send every block (MIN_BLOCK_MS=0); a site gets the default, 1 ms."""
    from django.test import override_settings

    config = {k: v for k, v in settings.PARALLEL_RENDER.items() if k != "MIN_BLOCK_MS"}
    with override_settings(PARALLEL_RENDER=config):
        assert conf.get_config()["MIN_BLOCK_MS"] == 1.0
        client = Client()
        first = client.get("/p/mixed_cost/?marker=m")
        assert len(block_pids(first)) == 2  # nothing measured yet: both go to workers
        for _ in range(3):
            later = client.get("/p/mixed_cost/?marker=m")
            assert later.content == first.content
        assert len(block_pids(later)) == 1, later.headers.get("Server-Timing")  # the 20 ms block still goes; the cheap one stays
        assert "<b>m</b>" in later.content.decode()


def test_a_blocks_cost_forgets_a_cold_first_render_within_three_samples():
    from django.template import engines

    template = engines["django"].from_string("{% load parallel %}{% parallel %}x{% endparallel %}")
    (node,) = [n for n in template.template.nodelist if type(n).__name__ == "ParallelNode"]
    assert node.cost_ms is None
    for ms, expected in [(120.0, 120.0), (0.3, 60.15), (0.2, 0.3), (0.4, 0.35), (0.3, 0.3), (0.3, 0.3), (50.0, 0.3)]:
        node.observe(ms)
        assert node.cost_ms == pytest.approx(expected)


@pytest.fixture
def every_block_to_one_worker(settings, django_db_setup, django_db_blocker, transactional_db):
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ADAPTIVE": False, "MIN_BLOCK_MS": 0}
    with parallel_workers(1) as cluster:  # a new worker: it has rendered nothing yet
        yield cluster


def test_a_workers_first_render_of_a_block_is_left_out_of_its_cpu_in_workers(every_block_to_one_worker):
    # A worker's first render of a block also loads its templates: with 8 workers a block's
    # first 8 renders can all be first ones, and their median, far above the master's, kept
    # the block out of workers for good (idle_needed). Only the worker's later renders count.
    from django.template.loader import get_template

    (node,) = parallel_nodes(get_template("t/cpu_bound.html").template).values()
    node._sent_samples.clear()
    node.sent_cpu_ms = None
    with serially():
        serial = Client().get("/p/cpu_bound/?ms=5")
    response = Client().get("/p/cpu_bound/?ms=5")
    assert response.content == serial.content
    assert block_pids(response) == [every_block_to_one_worker.worker_pids[0]] * 4
    # Four renders in the worker, the first of them its first of this block: three samples.
    assert len(node._sent_samples) == 3, node._sent_samples
    assert node.sent_cpu_ms == pytest.approx(sorted(node._sent_samples)[1])
    response = Client().get("/p/cpu_bound/?ms=5")  # the worker knows the block now: all four count
    assert block_pids(response) and len(node._sent_samples) == min(7, COST_SAMPLES)
