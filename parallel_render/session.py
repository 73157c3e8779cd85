"""The per-request render session: which fragments went to workers and where they go back."""

from __future__ import annotations

import contextvars
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parallel_render import sealing
from parallel_render.client import RouterClient, RouterUnavailable


@dataclass
class Pending:
    index: int
    job_id: int
    node: Any  # ParallelNode
    values: dict[str, Any]  # the master's own objects, for an inline rescue
    env: dict[str, Any]
    template: Any  # the django.template.Template the block belongs to
    nonce: str
    submitted: float
    deadline: float
    nested: bool = False
    # A block sent in a bundle: its place in the bundle's job (None for a job of its own).
    part: int | None = None
    # Why a bundled block never went out (its job id stays 0); the master renders it.
    unsent: str = ""
    # What its job was sealed with (docs/security.md): only a result sealed with the same
    # identity and expiry is this job's answer.
    identity: bytes = b""
    expiry_ms: int = 0
    # time.monotonic() when its tag began rendering; 0.0 unless block_finished has receivers.
    began: float = 0.0
    # A cached block (parallel_render.cache.Lookup): looked up with the page's other cached
    # blocks before it goes out; `job` encodes its job, sent on a miss (None: the master renders
    # a miss itself, for the reason in `unsent`).
    cache: Any = None
    job: Callable[[], dict[str, Any]] | None = None
    # On a streamed page: a block the dispatch policy kept in the master, rendered there after
    # the first byte (parallel_render.streaming.defer) instead of before it.
    deferred: bool = False
    # A block kept in the master and rendered by one of its block threads (parallel_render.
    # threads): the future of its result; its job_id stays 0.
    local: Any = None


@dataclass
class RenderSession:
    request: Any
    client: RouterClient
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    fragments: list[Pending] = field(default_factory=list)
    inline: list[tuple[str, str]] = field(default_factory=list)  # (block label, reason)
    started: float = field(default_factory=time.monotonic)
    # Set in a worker: blocks nested in the one it renders go out at high priority, only to
    # a worker that is idle right now, and never past the outer job's own deadline.
    nested: bool = False
    deadline: float | None = None
    # Cheap blocks waiting to go out together as one job: their fragments and encoded jobs.
    bundle: list[tuple[Pending, bytes]] = field(default_factory=list)
    bundle_ms: float = 0.0
    bundle_bytes: int = 0
    # Fragments gathered so far (every render stitches its own before it returns): their
    # HTML by index, their Server-Timing entries, and how many of `fragments` that covers.
    html: dict[int, str] = field(default_factory=dict)
    timings: list[str] = field(default_factory=list)
    resolved: int = 0
    # block_finished records of gathered blocks, sent once their HTML is in the page.
    held: list = field(default_factory=list)
    # False for a dry run (parallel_check --url): renders leave their placeholders.
    stitch: bool = True
    # Cached blocks not looked up yet: one get_many for them all when the page is gathered.
    lookups: list[Pending] = field(default_factory=list)
    # True while a streamed page's template renders (parallel_render.streaming).
    streaming: bool = False
    # What enclosure_reason found above the frames of the nodes enclosing its blocks, by frame.
    enclosures: dict[Any, str | None] = field(default_factory=dict)

    def unresolved(self) -> bool:
        """Whether some block went out (or waits in the bundle) and has not been gathered."""
        return len(self.fragments) > self.resolved or bool(self.bundle)

    def forget_frames(self) -> None:
        """Drop the frames `enclosures` holds once the page's templates have rendered: they
        reach up the stack to the frame holding this session, a cycle that would keep the
        request and its response alive until the cyclic garbage collector runs."""
        self.enclosures.clear()

    def blocks_out(self) -> int:
        """This page's blocks with workers or queued for them (sent, or in the open bundle) and
        not gathered yet."""
        return sum(1 for f in self.fragments[self.resolved:] if f.job_id) + len(self.bundle)

    def blocks_in_threads(self) -> int:
        """This page's blocks in the master's block threads (threads.py), not finished yet."""
        return sum(1 for f in self.fragments[self.resolved:] if f.local is not None and not f.local.done())

    def add_to_bundle(self, pending: Pending, body: bytes, cost_ms: float, full_ms: float) -> None:
        """Add a cheap block to the open bundle; send the bundle once it holds full_ms of work
        (or half the largest job the client may send)."""
        self.bundle.append((pending, body))
        self.bundle_ms += cost_ms
        self.bundle_bytes += len(body)
        if self.bundle_ms >= full_ms or self.bundle_bytes > self.client.max_payload // 2:
            self.send_bundle()

    def drop_bundle(self) -> None:
        """Forget the open bundle (the page failed before it went out)."""
        self.bundle, self.bundle_ms, self.bundle_bytes = [], 0.0, 0

    def send_bundle(self) -> None:
        """Submit the open bundle as one job: {"v": 1, "bundle": [block job, ...]}."""
        if not self.bundle:
            return
        parts, self.bundle, self.bundle_ms, self.bundle_bytes = self.bundle, [], 0.0, 0
        body = b'{"v":1,"bundle":[' + b",".join(b for _p, b in parts) + b"]}"
        timeout = max(min(pending.deadline for pending, _b in parts) - time.monotonic(), 0.001)
        sealed, identity, expiry = sealing.seal_job(self.client.binding, body, timeout)
        try:
            job_id, why = self.client.submit(sealed, timeout), ""
        except (RouterUnavailable, ValueError) as exc:
            job_id, why = 0, str(exc)
        for k, (pending, _b) in enumerate(parts):
            pending.job_id, pending.part, pending.unsent = job_id, k, why
            pending.identity, pending.expiry_ms = identity, expiry

    def placeholder(self, index: int) -> str:
        # Only characters that HTML escaping, JSON encoding and URL-safe contexts leave alone.
        return f"<!--pr:{self.token}:{index}-->"

    def pattern(self) -> re.Pattern[bytes]:
        return re.compile(rb"<!--pr:" + self.token.encode() + rb":(\d+)-->")

    def replace_placeholders(self, text: str, html: dict[int, str]) -> str:
        """text with each of this session's placeholders whose index html has replaced by it.

        What re.sub on "<!--pr:TOKEN:(digits)-->" would do, without compiling a pattern for each
        page's token (tens of µs, a block's whole budget on a small page): the prefix cannot
        overlap itself, so a split on it finds the same placeholders.
        """
        prefix = f"<!--pr:{self.token}:"
        parts = text.split(prefix)
        if len(parts) == 1:
            return text
        out = [parts[0]]
        for part in parts[1:]:
            end = part.find("-->")
            digits = part[:end]
            found = html.get(int(digits)) if 0 < end <= 12 and digits.isdecimal() else None
            if found is None:
                out += (prefix, part)
            else:
                out += (found, part[end + 3:])
        return "".join(out)


_current: contextvars.ContextVar[RenderSession | None] = contextvars.ContextVar(
    "parallel_render_session", default=None
)


def current() -> RenderSession | None:
    return _current.get()


def activate(session: RenderSession | None) -> contextvars.Token:
    return _current.set(session)


def deactivate(token: contextvars.Token) -> None:
    _current.reset(token)
