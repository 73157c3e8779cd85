"""The per-request render session: which fragments went to workers and where they go back."""

from __future__ import annotations

import contextvars
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from parallel_render.client import RouterClient


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
    # Expected cost (ms) of the cheap blocks submitted since the last write to the router.
    deferred_ms: float = 0.0

    def placeholder(self, index: int) -> str:
        # Only characters that HTML escaping, JSON encoding and URL-safe contexts leave alone.
        return f"<!--pr:{self.token}:{index}-->"

    def pattern(self) -> re.Pattern[bytes]:
        return re.compile(rb"<!--pr:" + self.token.encode() + rb":(\d+)-->")

    def text_pattern(self) -> re.Pattern[str]:
        return re.compile(r"<!--pr:" + self.token + r":(\d+)-->")


_current: contextvars.ContextVar[RenderSession | None] = contextvars.ContextVar(
    "parallel_render_session", default=None
)


def current() -> RenderSession | None:
    return _current.get()


def activate(session: RenderSession | None) -> contextvars.Token:
    return _current.set(session)


def deactivate(token: contextvars.Token) -> None:
    _current.reset(token)
