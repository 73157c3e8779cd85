"""Which {% parallel %} blocks of a project run in parallel, and why the others cannot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.template import engines
from django.template.backends.django import DjangoTemplates


@dataclass
class BlockReport:
    template: str
    line: int
    reason: str | None  # None: the block can run in parallel
    # What the block reads, as dotted paths (request.COOKIES.theme, user.username; user: read whole).
    names: list[str] = field(default_factory=list)
    # A cached block: the per-request values it reads that no key= names (parallel_render.cache).
    unkeyed: list[str] = field(default_factory=list)

    @property
    def cache_warning(self) -> str | None:
        if not self.unkeyed:
            return None
        return f"cached, but reads {', '.join(self.unkeyed)} without a key= naming it"

    @property
    def status(self) -> str:
        return "parallel" if self.reason is None else f"inline: {self.reason}"


def template_names(backend: Any) -> Iterator[str]:
    """Every file under a backend's template directories (app directories included), by name."""
    seen = set()
    for directory in backend.template_dirs:
        directory = str(directory)
        for root, _dirs, files in os.walk(directory):
            for filename in sorted(files):
                name = os.path.relpath(os.path.join(root, filename), directory).replace(os.sep, "/")
                if name not in seen:
                    seen.add(name)
                    yield name


def _might_use_tag(engine: Any, name: str) -> bool:
    for loader in engine.template_loaders:
        try:
            for origin in loader.get_template_sources(name):
                try:
                    return "parallel" in loader.get_contents(origin)
                except Exception:  # missing in this loader; the next may have it
                    continue
        except Exception:
            continue
    return False


def project_blocks() -> Iterator[BlockReport]:
    """Static report for every block in every Django engine's templates."""
    from parallel_render.cache import unkeyed_reads
    from parallel_render.templatetags.parallel import parallel_nodes

    for backend in engines.all():
        if not isinstance(backend, DjangoTemplates):
            continue
        engine = backend.engine
        for name in template_names(backend):
            if not _might_use_tag(engine, name):
                continue
            try:
                template = engine.get_template(name)
            except Exception as exc:
                yield BlockReport(name, 0, f"the template does not compile: {type(exc).__name__}: {exc}")
                continue
            for node in sorted(parallel_nodes(template).values(), key=lambda n: (n.line, n.ordinal)):
                if node.template_name != name:
                    continue
                analysis = node.get_analysis(engine)
                yield BlockReport(name, node.line, node.static_reason or analysis.reason, analysis.read_paths(),
                                  unkeyed_reads(node, engine))


class _RecordingClient:
    """Stands in for the router during a dry run: accepts every job, answers none."""

    max_payload = 1 << 62
    binding = b"parallel_check dry run"  # jobs are sealed as for a router, and never sent

    def __init__(self) -> None:
        self.jobs = 0

    def submit(self, payload: bytes, timeout: float, **flags: bool) -> int:
        self.jobs += 1
        return self.jobs

    def load(self) -> None:
        return None  # an idle router: every block that can be sent is


def url_blocks(path: str) -> list[tuple[str, str]]:
    """Render path in-process and report, per block rendering, "parallel" or "inline: why".

    This sees what only rendering can: values that cannot be sent, enclosing tags in other
    templates, renders that are not for a response.
    """
    from django.test import Client, override_settings

    from parallel_render import conf, session
    from parallel_render.testing import test_host_allowed

    client = _RecordingClient()
    current = session.RenderSession(None, client, stitch=False)  # type: ignore[arg-type]
    token = session.activate(current)
    try:
        settings_now = dict(conf.get_config())
        settings_now.pop("ROUTER", None)
        with override_settings(PARALLEL_RENDER={**settings_now, "ENABLED": False}), test_host_allowed():
            response = Client().get(path)
    finally:
        session.deactivate(token)
        current.forget_frames()
    if response.status_code != 200:
        raise ValueError(f"{path} answered {response.status_code}")
    results = [(f.node.label, "parallel") for f in current.fragments]
    results += [(label, f"inline: {why}") for label, why in current.inline]
    return sorted(results)
