from __future__ import annotations

from django.apps import AppConfig


class MetricsConfig(AppConfig):
    name = "parallel_render.metrics"
    label = "parallel_render_metrics"
    verbose_name = "Parallel render metrics"

    def ready(self) -> None:
        from parallel_render.metrics import install

        install()
