"""The worker loop: take fragments from the router, render them, send back HTML."""

from __future__ import annotations

import logging
import os
import secrets
import select
import signal
import socket
import struct
import time
import traceback
from typing import Any

import orjson
from django.conf import settings
from django.core import signals
from django.template import Node

from parallel_render import codec, conf, fragments, policy, sealing, session, tracing
from parallel_render import protocol as p
from parallel_render.client import HandshakeError, RouterClient, open_connection, warn_if_exposed
from parallel_render.process import die_with_parent

logger = logging.getLogger("parallel_render")

# A file the node's supervisor gave this worker: its mtime is our heartbeat, so a worker
# stuck in one job (or stopped) is noticed, killed and replaced.
HEARTBEAT_ENV = "PARALLEL_RENDER_WORKER_HEARTBEAT"
# The node's slot this worker fills (0, 1, ...): its results carry it, so a master can count a
# slot's work across the workers that fill it in turn (metrics), where pids would pile up.
SLOT_ENV = "PARALLEL_RENDER_WORKER_SLOT"
HEARTBEAT_EVERY = 0.5
# How long a recv or send on the router socket may block before the loop looks up again
# (parent alive, heartbeat, told to stop). Kept in the kernel (SO_RCVTIMEO/SO_SNDTIMEO)
# rather than as a Python socket timeout, which would poll() before every recv and send.
SOCKET_WAKE = struct.pack("@ll", 1, 0)
# Jobs that follow each other closer than BURST_GAP are one Django request (request_started
# before the first, request_finished once none follows), for at most BURST_MAX: a page's
# blocks are parts of one request, and per-request work between two of them (with Django's
# default CONN_MAX_AGE=0, closing the database connection and opening a new one for the next
# block; closing memcached's sockets) cost a busy worker more CPU than many blocks render in.
# A worker that waited BURST_GAP for a job, or whose request is BURST_MAX old, ends it: its
# connections are closed as Django's settings say, at most one request's age later.
BURST_GAP = 0.05
BURST_MAX = 1.0
RECV_BUFFER = 1 << 20
READY_FRAME = p.encode(p.READY)


class Worker:
    """One worker process. `run()` returns when told to stop or after max_jobs jobs."""

    def __init__(
        self,
        address: str,
        max_jobs: int | None = None,
        parent_pid: int | None = None,
        heartbeat: str | None = None,
        nested: bool = True,
    ) -> None:
        self.address = p.parse_address(address)
        # Jobs are sealed for the router address as configured (docs/security.md).
        self.binding = sealing.node_binding(address)
        self.seen = sealing.ReplayGuard()
        self.refused = sealing.RefusalLog(f"worker {os.getpid()}")
        self._handshake_error = ""
        warn_if_exposed(self.address)
        self.max_jobs = max_jobs
        self.parent_pid = parent_pid
        self.heartbeat = heartbeat or os.environ.get(HEARTBEAT_ENV) or None
        self._beat_at = 0.0
        self.jobs_done = 0
        self.stopping = False
        self.busy = False
        self.waiting = False  # blocked in a receive or a back-off pause: a stop signal ends it at once
        # Between request_started and request_finished: a burst of jobs (BURST_GAP), begun then.
        self.in_request = False
        self.request_began = 0.0
        # Blocks nested in a job go out through this process's own master connection.
        self.nested_client = RouterClient(address) if nested else None
        self.pid = os.getpid()
        slot = os.environ.get(SLOT_ENV, "")
        self.slot = int(slot) if slot.isdigit() else None
        # Placeholders of nested blocks: a secret of this process and a job counter, so a job
        # costs no getrandom() yet no page can guess another job's placeholders.
        self._token_prefix = secrets.token_hex(12)
        # With PARALLEL_RENDER['OTEL'], each block renders in a span, the child of its master's.
        self.traced = tracing.worker_setup()
        # Cached blocks rendered in the last job, stored once its result is sent (the page
        # need not wait for the cache): (the job's store instruction, HTML).
        self.to_store: list[tuple[Any, str]] = []
        # The blocks (template, ordinal, source hash) this process has rendered: see _render_one.
        self.rendered_blocks: set[tuple[Any, Any, Any]] = set()
        # Its wait for a CPU, to tell what a render spent asleep (its "io"): see _render_one.
        self.run_queue = policy.RunQueueClock()
        self.measure_io = True
        # The language and time zone (a job's "env") the blocks of the current job left
        # active: the next block of a bundle with the same env need not activate them again.
        self.active_env: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        # Only a wait is cut short: elsewhere (a job, a connection being opened or closed) the
        # loop stops at its next check, so no socket is left half closed.
        if self.waiting:
            raise SystemExit(0)

    def run(self) -> None:
        if self.parent_pid:
            die_with_parent(self.parent_pid)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff = 0.05
        try:
            while not self.stopping:
                try:
                    # AUTH and READY go in one write; as long to answer as the router gives us.
                    sock = open_connection(self.address, p.ROLE_WORKER, READY_FRAME, timeout=2.0)
                except HandshakeError as exc:
                    # A router without this site's key gets no READY and never a job's result;
                    # one that refused ours says why. Said once per reason; tried again.
                    self._check_parent()
                    if str(exc) != self._handshake_error:
                        self._handshake_error = str(exc)
                        logger.error("worker %d: %s; not working for it (retrying)", self.pid, exc)
                    self._pause(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                except OSError as exc:
                    self._check_parent()
                    logger.debug("worker %d: router at %s not reachable (%s)", os.getpid(), self.address, exc)
                    self._pause(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                self._handshake_error = ""
                try:
                    self._serve(sock)
                except OSError as exc:
                    # The router went away while this worker was writing to it (a restart, a
                    # crash): connect again, as after any other loss of the connection.
                    logger.info("worker %d: router connection lost (%s); reconnecting", self.pid, exc)
                finally:
                    sock.close()
                    self.end_request()
                if self.max_jobs and self.jobs_done >= self.max_jobs:
                    return
        except SystemExit:
            return
        finally:
            if self.nested_client is not None:
                self.nested_client.close()

    def _pause(self, seconds: float) -> None:
        self.waiting = True
        try:
            time.sleep(seconds)
        finally:
            self.waiting = False

    def beat(self, force: bool = False) -> None:
        """Touch the heartbeat file: we are connected and not stuck in a job."""
        now = time.monotonic()
        if self.heartbeat and (force or now - self._beat_at >= HEARTBEAT_EVERY):
            self._beat_at = now
            try:
                os.utime(self.heartbeat)
            except OSError:
                pass

    def _check_parent(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            raise SystemExit(0)

    def _serve(self, sock: socket.socket) -> None:
        """Work on a connection that has completed the handshake and sent READY."""
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, SOCKET_WAKE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SOCKET_WAKE)
        self.beat(force=True)
        reader = p.FrameReader()
        # One buffer for the life of the connection: recv(1 MB) would map and unmap a fresh
        # megabyte for every job.
        buffer = bytearray(RECV_BUFFER)
        view = memoryview(buffer)
        while not self.stopping:
            self.waiting = True
            try:
                if self.in_request and not select.select([sock], [], [], BURST_GAP)[0]:
                    self.waiting = False
                    self.end_request()  # no job followed: the request is over
                    self.waiting = True
                size = sock.recv_into(buffer)
            except BlockingIOError:  # SO_RCVTIMEO: nothing for a while
                self._check_parent()
                self.beat()
                continue
            except OSError as exc:
                logger.warning("worker %d: router connection failed: %s", self.pid, exc)
                return
            finally:
                self.waiting = False
            if not size:
                logger.info("worker %d: router closed the connection", self.pid)
                return
            for frame in reader.feed(view[:size]):
                if frame.type == p.JOB:
                    self.beat()
                    self.busy = True
                    try:
                        result = self.handle(frame.payload, frame.timeout_ms)
                    finally:
                        self.busy = False
                    self.jobs_done += 1
                    last = bool(self.max_jobs and self.jobs_done >= self.max_jobs) or self.stopping
                    out = p.encode(p.RESULT, frame.job_id, result)
                    sock.sendall(out if last else out + READY_FRAME)
                    self.store_fragments()
                    if last:
                        return
                elif frame.type == p.PROTOCOL_ERROR:
                    logger.error("worker %d: router says: %s", self.pid, frame.payload.decode("utf-8", "replace"))
                    return

    def handle(self, payload: bytes, timeout_ms: int = 0) -> bytes:
        """Render a job, one block or a bundle of cheap ones, and return the sealed result.

        A job that does not open, has expired or was seen before is refused without being
        read: the answer says so (sealed, when the job opened) and its master renders it.
        """
        try:
            job = self.seal.open(payload, sealing.KIND_JOB)
            self.seen.admit(job)
        except sealing.Refused as exc:
            self.refused(exc, "a job")
            if isinstance(exc, sealing.Unopenable):
                return b""  # nothing to seal an answer for: the master cannot open it and renders the job
            refusal = {"ok": False, "master_only": True, "n": None, "pid": self.pid, "ms": 0.0,
                       "error": f"the worker refused the job: {exc.kind}"}
            return self.seal.seal(sealing.KIND_RESULT, job.identity, job.expiry_ms, orjson.dumps(refusal))
        started, at = time.perf_counter(), time.monotonic()
        if not self.in_request:
            self.in_request = True
            self.request_began = at
            signals.request_started.send(sender=self.__class__)
        failed = True
        try:
            try:
                body = orjson.loads(job.body)
            except Exception as exc:
                result = self._failure(exc)
                result["n"] = None
            else:
                deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
                token = f"{self._token_prefix}{self.jobs_done:08x}"
                self.active_env = None  # a job activates its env, whatever ran before it
                render = self._render_traced if self.traced else self._render_one
                if isinstance(body, dict) and isinstance(body.get("bundle"), list):
                    # A bundle's blocks are cheaper than a block thread is worth: their sleep
                    # is not measured (two reads of schedstat each).
                    self.measure_io = False
                    try:
                        parts = [render(sub, deadline, f"{token}{k:04x}") for k, sub in enumerate(body["bundle"])]
                    finally:
                        self.measure_io = True
                    result = {"ok": True, "bundle": parts}
                else:
                    result = render(body, deadline, token)
            failed = not result.get("ok") or any(not part.get("ok") for part in result.get("bundle", ()))
        finally:
            if failed or time.monotonic() - self.request_began >= BURST_MAX:
                # A block that failed may have left a database connection unusable: its
                # request ends now, so Django closes what it must before the next job.
                self.end_request()
        result["pid"] = self.pid
        if self.slot is not None:
            result["slot"] = self.slot
        # When it began, on the clock the machine's processes share: the master's waterfall.
        result["at"] = at
        # A block's own "ms" is its rendering (the master's cost model); a bundle's is the job's.
        result.setdefault("ms", (time.perf_counter() - started) * 1000)
        sealed = self.seal.seal(sealing.KIND_RESULT, job.identity, job.expiry_ms, orjson.dumps(result))
        limit = min(conf.get_config()["MAX_PAYLOAD"], p.MAX_FRAME)
        if len(sealed) > limit:
            # The router would refuse the frame (and drop this connection): say so instead,
            # and let the master render the block (every block of a bundle).
            too_big = {"ok": False, "master_only": True, "n": result.get("n"), "pid": self.pid,
                       "ms": result["ms"], "error": f"result of {len(sealed)} bytes exceeds MAX_PAYLOAD ({limit})"}
            sealed = self.seal.seal(sealing.KIND_RESULT, job.identity, job.expiry_ms, orjson.dumps(too_big))
        return sealed

    def store_fragments(self) -> None:
        """Store the cached blocks the last job rendered (parallel_render.cache)."""
        if self.to_store:
            from parallel_render import cache

            stores, self.to_store = self.to_store, []
            for instruction, html in stores:
                cache.store_from_job(instruction, html)

    def end_request(self) -> None:
        """Send request_finished for the burst of jobs since request_started, if one is open."""
        if self.in_request:
            self.in_request = False
            signals.request_finished.send(sender=self.__class__)

    @property
    def seal(self) -> sealing.Sealer:
        """The Sealer of this site's current SECRET_KEY for this worker's router."""
        return sealing.sealer(self.binding)

    def _render_one(self, job: Any, deadline: float | None, token: str) -> dict[str, Any]:
        queued = self.run_queue.read() if self.measure_io else None
        started = policy.start_measuring()
        nonce = job.get("n") if isinstance(job, dict) else None
        env = job.get("env") if isinstance(job, dict) else None
        # A bundle's blocks come from one page and mostly share their env: activated once.
        fresh = env is None or env != self.active_env
        self.active_env = None
        try:
            html, nested = render_job(job, self.nested_client, deadline, token, activate=fresh)
            self.active_env = env
            result: dict[str, Any] = {"ok": True, "html": html, "nested": nested}
            if "cache" in job:
                self.to_store.append((job["cache"], html))
        except Exception as exc:
            result = self._failure(exc)
        result["n"] = nonce
        # Of its time, on the CPU: what the master weighs against its own renders of the block
        # (policy.idle_needed).
        result["ms"], result["cpu"] = policy.measured(started)
        if queued is not None and (now_queued := self.run_queue.read()) is not None:
            # Neither on a CPU nor waiting for one: asleep on I/O. The master sends a block
            # that mostly sleeps to its block threads when it keeps it (ParallelNode.waits).
            result["io"] = max(0.0, result["ms"] - result["cpu"] - (now_queued - queued))
        block = (job.get("t"), job.get("o"), job.get("h")) if isinstance(job, dict) else None
        if result["ok"] and block not in self.rendered_blocks:
            # Its first render in this process also loaded its templates and opened what it
            # reads: a cost the master's renders of it never pay again, so the master leaves
            # its CPU time out of the comparison. (With 8 workers a block's first 8 renders
            # can all be first ones; their median kept blocks out of workers for good.)
            self.rendered_blocks.add(block)
            result["cold"] = True
        return result

    def _render_traced(self, job: Any, deadline: float | None, token: str) -> dict[str, Any]:
        return tracing.render_traced(self._render_one, job, deadline, token, pid=self.pid)

    def _failure(self, exc: Exception) -> dict[str, Any]:
        logger.info("worker %d: block failed: %s: %s", self.pid, type(exc).__name__, exc)
        return failure(exc)


def failure(exc: Exception) -> dict[str, Any]:
    """The result of a block whose render raised exc (in a worker, or a master's block thread)."""
    result: dict[str, Any] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if isinstance(exc, (fragments.SkewError, codec.RemoteAttributeError)):
        # Not the block's fault: it needs the master (other code, or something that
        # was not sent), so the master renders it rather than show its fallback.
        result["master_only"] = True
        if isinstance(exc, codec.SideEffect):
            result["effect"] = True  # the master keeps this block from now on
    if settings.DEBUG:
        result["traceback"] = traceback.format_exc()
    return result


def render_job(
    job: dict[str, Any], nested: RouterClient | None = None, deadline: float | None = None, token: str | None = None,
    activate: bool = True,
) -> tuple[str, int]:
    """The block's HTML, and how many blocks nested in it went to other workers.

    activate=False: the job's language and time zone are the active ones already (the
    block before it in a bundle had the same).

    With a client, blocks nested in this one go to workers that are idle right now, and
    are stitched in here; the others render in this worker, as inline blocks do. token
    names their placeholders (by default a fresh random one).
    """
    if job.get("v") != 1:
        raise ValueError(f"unsupported job version {job.get('v')!r}")
    template, node = fragments.worker_block(job["e"], job["t"], job["o"], job["h"])
    # The master's language and time zone, for the context processors run here too.
    if activate:
        fragments.activate_env(job["env"])
    decoder = codec.Decoder()
    values = {name: decoder.decode(value) for name, value in job["c"].items()}
    if "req" in job:
        values = codec.run_worker_processors(decoder.decode(job["req"]), values)
    if nested is None or not may_nest(node):
        return fragments.render_captured(node, template, values, job["env"], override=False), 0
    named = {"token": token} if token is not None else {}
    current = session.RenderSession(None, nested, nested=True, deadline=deadline, **named)
    activated = session.activate(current)
    try:
        html = fragments.render_captured(node, template, values, job["env"], override=False)
    finally:
        session.deactivate(activated)
        current.forget_frames()
    if not current.fragments:
        return html, 0
    from parallel_render.middleware import stitch_text

    return stitch_text(current, html), len(current.fragments)


def may_nest(node: Any) -> bool:
    """Whether rendering this block may render another {% parallel %} block, which then goes
    to a worker of its own: only then does the job need a render session.

    A block made only of text, variables and Django tags that render no other template
    cannot; anything else (a nested block, an include, a custom tag) may. A block nested
    where no session is active renders here, inline, so either answer gives the same HTML.
    """
    found = getattr(node, "_may_nest", None)
    if found is None:
        found = node._may_nest = any(type(n) not in _PLAIN_NODES for n in node.nodelist.get_nodes_by_type(Node))
    return found


def _plain_nodes() -> frozenset[type]:
    from django.template import base, defaulttags
    from django.templatetags import i18n, l10n, tz

    return frozenset((
        base.TextNode, base.VariableNode, defaulttags.ForNode, defaulttags.IfNode, defaulttags.WithNode,
        defaulttags.CommentNode, defaulttags.AutoEscapeControlNode, defaulttags.FilterNode,
        defaulttags.SpacelessNode, defaulttags.VerbatimNode, defaulttags.LoadNode, defaulttags.CsrfTokenNode,
        defaulttags.NowNode, defaulttags.FirstOfNode, defaulttags.URLNode, defaulttags.WidthRatioNode,
        defaulttags.TemplateTagNode, i18n.TranslateNode, i18n.BlockTranslateNode, i18n.LanguageNode,
        l10n.LocalizeNode, tz.LocalTimeNode, tz.TimezoneNode,
    ))


_PLAIN_NODES = _plain_nodes()
