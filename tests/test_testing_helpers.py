"""parallel_render.testing, as a site's own test suite would use it."""

from __future__ import annotations

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
