"""The test settings with a small MAX_PAYLOAD, for workers that must refuse big results."""

from tests.settings import *  # noqa: F403

PARALLEL_RENDER = {**PARALLEL_RENDER, "MAX_PAYLOAD": 4000}  # noqa: F405
