"""parallel_render.testing, as a site's own test suite would use it."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from parallel_render.testing import assert_parallel_equals_serial, parallel_workers, worker_rendered


def test_helpers_start_workers_on_the_test_database_and_compare_pages(transactional_db):
    from tests.testapp.models import Author

    Author.objects.create(name="Only in the test database")
    with parallel_workers(1) as cluster:
        response = assert_parallel_equals_serial(Client(), "/p/exact/")
        assert set(worker_rendered(response)) == set(cluster.worker_pids)
        assert "Only in the test database" in response.content.decode()
        with pytest.raises(AssertionError, match="no block was rendered by a worker"):
            assert_parallel_equals_serial(Client(), "/p/unsafe/?unsendable=1")
        assert_parallel_equals_serial(Client(), "/p/unsafe/?unsendable=1", require_parallel=False)


class _Recording:
    """A test client that keeps every response, to see how each request was rendered."""

    def __init__(self) -> None:
        self.client = Client()
        self.responses: list = []

    def get(self, *args, **kwargs):
        response = self.client.get(*args, **kwargs)
        self.responses.append(response)
        return response


@pytest.mark.parametrize("header", ["X-Site-Serial", None])
def test_the_serial_baseline_is_serial_whatever_the_serial_header_is(parallel, settings, header):
    from django.test import override_settings

    from parallel_render.testing import serially

    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SERIAL_HEADER": header, "SERVER_TIMING": True}):
        recording = _Recording()
        assert_parallel_equals_serial(recording, "/p/exact/")
        serial, parallel_page = recording.responses
        assert not worker_rendered(serial), "the baseline was rendered by workers"
        assert worker_rendered(parallel_page)
        with serially():
            assert not worker_rendered(Client().get("/p/exact/"))


def test_serial_request_headers_follow_the_setting_or_say_why_not(settings):
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from parallel_render.testing import serial_request_headers

    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SERIAL_HEADER": "X-Site-Serial"}):
        assert serial_request_headers() == {"X-Site-Serial": "serial"}
    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SERIAL_HEADER": None}):
        with pytest.raises(ImproperlyConfigured, match="SERIAL_HEADER'\\] is empty"):
            serial_request_headers()


def test_in_process_commands_work_on_a_site_that_does_not_allow_testserver(parallel, capsys):
    """A fresh startproject has ALLOWED_HOSTS = []; the in-process page renders must not answer 400."""
    from django.core.management import call_command
    from django.test import override_settings

    with override_settings(ALLOWED_HOSTS=["example.com"], DEBUG=False):
        call_command("parallel_check", "--url", "/p/exact/", no_color=True)
        rendered = capsys.readouterr().out.split("rendering /p/exact/\n", 1)[1]
        # The blocks the page sends, each reported as sent (the dry run takes every job).
        assert re.search(r"^  t/exact\.html:6 +parallel  \(x5\)$", rendered, re.M), rendered
        assert "inline" not in rendered, rendered
        call_command("parallel_bench", "page", "/p/exact/", "--requests", "2")
        assert "speed-up" in capsys.readouterr().out


def test_bench_page_that_does_not_answer_200_is_a_clear_error(parallel):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match=r"answered 404 in .* mode; the page must answer 200"):
        call_command("parallel_bench", "page", "/no/such/page/", "--requests", "1")
