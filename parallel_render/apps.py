from __future__ import annotations

from django.apps import AppConfig


class ParallelRenderConfig(AppConfig):
    name = "parallel_render"
    verbose_name = "Parallel render"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from parallel_render import checks, rendering, tracing  # noqa: F401  (checks registers the checks)
        from parallel_render.conf import clear_config

        setting_changed.connect(clear_config, dispatch_uid="parallel_render.clear_config")
        # After clear_config: spans for blocks while PARALLEL_RENDER['OTEL'] is on (docs/tracing.md).
        setting_changed.connect(tracing.sync, dispatch_uid="parallel_render.tracing.sync")
        tracing.sync()
        # Every render through the template backend stitches the blocks it sent.
        rendering.install()
