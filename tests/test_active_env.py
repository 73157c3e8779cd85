"""A master reads the active language and time zone before every block it sends
(fragments.capture_env). It reads them from asgiref's context variable directly, which skips
the exception asgiref raises and catches when none is active; these tests hold that read to
Django's own answer in every state a page can be in: nothing active, activated, overridden,
deactivated, in another thread, in an asyncio task, and without USE_I18N."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import random
import threading
import zoneinfo

import asgiref
import pytest
from asgiref.local import Local
from django.utils import timezone, translation

from parallel_render import fragments


def same_as_django() -> None:
    assert fragments.current_language() == translation.get_language()
    assert fragments.current_timezone() is timezone.get_current_timezone()


@pytest.fixture(autouse=True)
def nothing_active():
    translation.deactivate()
    timezone.deactivate()
    yield
    translation.deactivate()
    timezone.deactivate()


@pytest.mark.skipif(tuple(int(n) for n in asgiref.__version__.split(".")[:2]) < (3, 8),
                    reason="asgiref before 3.8 keeps its Locals otherwise: Django's reads are used")
def test_the_installed_asgiref_is_read_directly():
    # Otherwise every read falls back to Django's (right, but 3 µs slower per miss): a new
    # asgiref layout needs fragments._local_reader taught.
    language, zone = fragments._readers()
    assert language is not None and zone is not None


def test_every_state_of_a_page_reads_as_django_reads_it():
    same_as_django()
    assert fragments.current_language() == "en"
    assert fragments.current_timezone() is timezone.get_default_timezone()
    translation.activate("fr")
    timezone.activate(zoneinfo.ZoneInfo("Asia/Tokyo"))
    same_as_django()
    assert (fragments.current_language(), str(fragments.current_timezone())) == ("fr", "Asia/Tokyo")
    with translation.override("de"), timezone.override(datetime.timezone(datetime.timedelta(hours=-3), "X")):
        same_as_django()
        assert fragments.current_language() == "de"
        with translation.override(None):  # deactivate_all(): get_language() is None
            same_as_django()
            assert fragments.current_language() is None
        same_as_django()
    same_as_django()
    translation.deactivate()
    timezone.deactivate()
    same_as_django()
    assert fragments.current_language() == "en"


def test_a_thread_reads_its_own_state_not_the_one_that_started_it():
    translation.activate("fr")
    timezone.activate(zoneinfo.ZoneInfo("Asia/Tokyo"))
    seen: list[tuple] = []

    def read() -> None:
        seen.append(((fragments.current_language(), fragments.current_timezone()),
                     (translation.get_language(), timezone.get_current_timezone())))
        translation.activate("de")
        seen.append(((fragments.current_language(),), (translation.get_language(),)))

    plain = threading.Thread(target=read)
    plain.start()
    plain.join()
    # A thread that starts with a copy of the context (Python 3.14's thread_inherit_context,
    # on by default in free-threaded builds). What it sees depends on asgiref's version
    # (recent ones keep a value to the thread that set it); the read must see the same.
    inherited = threading.Thread(target=contextvars.copy_context().run, args=(read,))
    inherited.start()
    inherited.join()
    assert all(ours == django for ours, django in seen), seen
    assert seen[:2] == [(("en", timezone.get_default_timezone()),) * 2, (("de",),) * 2]
    same_as_django()


def test_asyncio_tasks_read_as_django_reads_them():
    async def page(language: str) -> tuple:
        translation.activate(language)
        await asyncio.sleep(0)
        return fragments.current_language(), translation.get_language()

    async def two_pages() -> list:
        return await asyncio.gather(page("fr"), page("de"))

    for ours, django in asyncio.run(two_pages()):
        assert ours == django


def test_random_sequences_of_activations_read_as_django_reads_them():
    rng = random.Random(8)
    zones = [zoneinfo.ZoneInfo("Asia/Tokyo"), zoneinfo.ZoneInfo("America/Lima"), datetime.timezone.utc]
    steps = [
        lambda: translation.activate(rng.choice(["en", "fr", "de", "pt-br"])),
        translation.deactivate,
        translation.deactivate_all,
        lambda: timezone.activate(rng.choice(zones)),
        timezone.deactivate,
    ]
    for _ in range(500):
        rng.choice(steps)()
        same_as_django()


def test_without_i18n_the_language_is_django_s(settings):
    settings.USE_I18N = False
    fragments._readers.cache_clear()
    try:
        assert fragments._readers()[0] is None
        same_as_django()
        translation.activate("fr")
        same_as_django()
    finally:
        settings.USE_I18N = True
        fragments._readers.cache_clear()


def test_a_local_laid_out_otherwise_is_left_to_django():
    assert fragments._local_reader(Local(thread_critical=True)) is None
    assert fragments._local_reader(object()) is None
