"""{% parallel cache=S key=... %}: a page's cached blocks in one get_many, against real memcached
and Redis servers, a real router and real workers (docs/cache.md)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid

import pytest
from django.core import checks
from django.template import TemplateSyntaxError, engines
from django.test import Client, override_settings

from parallel_render import cache as fragment_cache
from parallel_render import conf
from parallel_render.testing import parallel_workers, serially
from tests.conftest import blocks_of, thread
from tests.servers import free_port, server

# Short socket timeouts: a cache that stops answering must cost a page little.
TIMEOUTS = {
    "memcached": {"connect_timeout": 0.3, "timeout": 0.3},
    "redis": {"SOCKET_CONNECT_TIMEOUT": 0.3, "SOCKET_TIMEOUT": 0.3},
}


def cache_settings(kind: str, url: str) -> dict:
    if kind == "memcached":
        return {
            "default": {
                "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                "LOCATION": url[len("memcached://") :],
                "OPTIONS": TIMEOUTS[kind],
            }
        }
    return {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "OPTIONS": TIMEOUTS[kind]}}


def tally(name: str) -> int:
    """How many times the blocks that {% tally name %} have rendered, in any process."""
    try:
        with open(os.path.join(tempfile.gettempdir(), f"pr-tally-{name}")) as f:
            return len(f.read())
    except FileNotFoundError:
        return 0


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module", params=["memcached", "redis"])
def cached_node(request, cluster, django_db_setup, django_db_blocker):
    """A real cache server, and a router with two workers whose default cache is that server.

    After the suite's own cluster (`cluster`) has started: parallel_workers() points this
    process back at the router it found when it ends, which must be that one."""
    from django.conf import settings

    kind = request.param
    with server(kind) as url:
        env = {"PR_TEST_DB": str(settings.DATABASES["default"]["NAME"]), "PR_TEST_CACHE": url, "PR_ROLE": "worker"}
        with override_settings(CACHES=cache_settings(kind, url)), parallel_workers(2, env=env) as cluster:
            yield kind, url, cluster


@pytest.fixture
def node(cached_node, transactional_db):
    cluster = cached_node[2]
    cluster.wait_ready()
    fragment_cache.reset()
    return cached_node


def outcomes(response) -> list[str]:
    return [r.outcome for r in blocks_of(response)]


def test_a_warm_page_is_one_get_many_and_no_worker(node):
    m = marker()
    path = f"/p/frag_cache/?n=6&marker={m}"
    cold = Client().get(path)
    assert cold.status_code == 200
    assert outcomes(cold) == ["sent"] * 6 and tally(m) == 6
    assert "".join(f"<i>{i} item {i}</i>" for i in range(6)) in cold.content.decode()
    time.sleep(0.1)  # the workers store after they answer
    before = fragment_cache.round_trips()
    warm = Client().get(path)
    assert fragment_cache.round_trips() - before == 1  # one get_many: the version and six blocks
    assert outcomes(warm) == ["cached"] * 6 and tally(m) == 6
    assert warm.content == cold.content
    assert "fragment cache hit" in warm.headers["Server-Timing"]


def test_serial_and_parallel_pages_read_and_fill_the_same_cache(node):
    m = marker()
    path = f"/p/frag_cache/?n=3&marker={m}"
    with serially():
        serial = Client().get(path)  # fills the cache: each block a lookup, a render, a store
    assert tally(m) == 3
    parallel = Client().get(path)
    assert outcomes(parallel) == ["cached"] * 3 and tally(m) == 3
    assert parallel.content == serial.content
    m = marker()
    path = f"/p/frag_cache/?n=3&marker={m}"
    parallel = Client().get(path)
    assert tally(m) == 3
    time.sleep(0.1)
    with serially():
        serial = Client().get(path, headers={"X-Parallel-Render": "serial"})
    assert serial.content == parallel.content and tally(m) == 3


def test_key_values_and_bump_make_new_entries(node):
    m = marker()
    Client().get(f"/p/frag_cache/?n=3&marker={m}")
    time.sleep(0.1)
    # One more item: only its block (a new key= value) renders.
    page = Client().get(f"/p/frag_cache/?n=4&marker={m}")
    assert outcomes(page) == ["cached", "cached", "cached", "sent"] and tally(m) == 4
    time.sleep(0.1)
    fragment_cache.bump()
    page = Client().get(f"/p/frag_cache/?n=4&marker={m}")
    assert outcomes(page) == ["sent"] * 4 and tally(m) == 8


def test_concurrent_misses_of_one_key_render_once(node):
    m = marker()
    path = f"/p/frag_cache/?n=1&sleep=0.4&marker={m}"
    pages: list[bytes] = []

    def fetch() -> None:
        pages.append(Client().get(path).content)

    threads = [thread(fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pages) == 6 and len(set(pages)) == 1
    assert tally(m) == 1, f"{tally(m)} renders of one key for 6 concurrent pages"


def test_blocks_a_worker_cannot_render_still_use_the_cache(node):
    m = marker()
    path = f"/p/frag_cache_inline/?marker={m}&unsendable=1"
    first = Client().get(path)
    assert tally(m) == 3
    assert "<u>0 " in first.content.decode() and "<B>INSIDE FILTER" in first.content.decode()
    second = Client().get(path)
    assert second.content == first.content and tally(m) == 3
    assert outcomes(second) == ["cached"] * 3


def test_a_fallback_is_never_cached(node):
    m = marker()
    path = f"/p/frag_cache_inline/?marker={m}&fail=1"
    first = Client().get(path)
    assert "<s>fallback</s>" in first.content.decode()
    second = Client().get(f"/p/frag_cache_inline/?marker={m}&fail=0")
    # The failed block renders again (its key does not name `fail`): its own HTML this time.
    assert "<s>own " in second.content.decode()


def _page_time(path: str) -> tuple[int, float, bytes]:
    started = time.monotonic()
    response = Client().get(path)
    return response.status_code, time.monotonic() - started, response.content


@pytest.mark.parametrize("kind", ["memcached", "redis"])
def test_a_cache_that_dies_or_never_answers_does_not_fail_a_page(kind, parallel, caplog):
    """The server is killed mid-run; then the cache points at a port where nothing listens, and
    at one that accepts connections and never answers: every page is whole, and quick."""
    m = marker()
    path = f"/p/frag_cache/?n=3&marker={m}"
    with server(kind) as url, override_settings(CACHES=cache_settings(kind, url)):
        fragment_cache.reset()
        assert Client().get(path).status_code == 200
        time.sleep(0.1)
        with serially():
            expected = Client().get(path).content
    # The server is gone (its context ended: terminated): the same settings, a dead server.
    for location in [url, f"{url.split('://')[0]}://127.0.0.1:{free_port()}"]:
        with override_settings(CACHES=cache_settings(kind, location)):
            fragment_cache.reset()
            status, seconds, content = _page_time(path)
            assert status == 200 and content == expected and seconds < 1.5
            # While the cache is down, pages do not even try it.
            before = fragment_cache.round_trips()
            status, seconds, content = _page_time(path)
            assert status == 200 and content == expected and fragment_cache.round_trips() == before
            with serially():
                assert _page_time(path)[2] == expected
    assert "fragment cache 'default' failed" in caplog.text
    # A server that accepts and never answers: bounded by the cache's socket timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        with override_settings(CACHES=cache_settings(kind, f"{url.split('://')[0]}://127.0.0.1:{port}")):
            fragment_cache.reset()
            status, seconds, content = _page_time(path)
            assert status == 200 and content == expected and seconds < 2.0


def test_bump_keys_and_seconds():
    class Node:
        template_name, ordinal, digest = "t/x.html", 3, "abc"

    env = {"lang": "en", "tz": "UTC", "ae": True, "l10n": None, "use_tz": True}
    key = fragment_cache.block_key(Node, [1, "a"], env)
    assert key.startswith(fragment_cache.KEY_PREFIX) and len(key) < 250
    assert key == fragment_cache.block_key(Node, [1, "a"], dict(env))
    assert key != fragment_cache.block_key(Node, [1, "b"], env)
    assert key != fragment_cache.block_key(Node, [1, "a"], {**env, "lang": "fr"})
    assert key != fragment_cache.block_key(Node, [1, "a"], {**env, "tz": "Europe/Paris"})
    assert fragment_cache.block_key(Node, ["1"], env) != fragment_cache.block_key(Node, [1], env)
    assert fragment_cache.seconds(0) is None and fragment_cache.seconds(None) is None
    assert fragment_cache.seconds("30") == 30.0
    with pytest.raises(ValueError):
        fragment_cache.seconds(-1)


def test_the_tag_checks_its_cache_arguments():
    engine = engines["django"]
    for source, message in [
        ("{% parallel key=a %}x{% endparallel %}", "needs cache=SECONDS"),
        ("{% parallel cache=-5 %}x{% endparallel %}", "positive number of seconds"),
        ("{% parallel cache=1 cache=2 %}x{% endparallel %}", "cache= twice"),
    ]:
        with pytest.raises(TemplateSyntaxError, match=message):
            engine.from_string("{% load parallel %}" + source)


def test_the_setting_names_a_cache():
    with override_settings(PARALLEL_RENDER={"CACHE": "nope"}):
        errors = [e for e in checks.run_checks() if e.id == "parallel_render.E001"]
        assert errors and "PARALLEL_RENDER['CACHE'] must name a cache in CACHES ('default')" in errors[0].msg
    with override_settings(PARALLEL_RENDER={"CACHE": None}):
        assert conf.get_config()["CACHE"] is None and not fragment_cache.usable()


def test_parallel_check_warns_of_a_cached_block_reading_the_user_without_a_key(capsys):
    from django.core.management import call_command

    with override_settings(DEBUG=True):
        found = [e for e in checks.run_checks(tags=["templates"]) if e.id == "parallel_render.W006"]
    labels = {e.msg.split(" at ")[1].split(" is cached")[0]: e.msg for e in found}
    assert "t/frag_cache_user.html:2" in labels and "t/frag_cache_user.html:3" not in labels
    assert "reads user without a key= naming it" in labels["t/frag_cache_user.html:2"]
    call_command("parallel_check")
    out = capsys.readouterr().out
    assert "cached, but reads user without a key= naming it" in out


def test_a_down_cache_never_holds_a_serial_page_twice(db):
    """Without a router: the serial path alone, against a port where nothing listens."""
    port = free_port()
    with override_settings(CACHES=cache_settings("redis", f"redis://127.0.0.1:{port}/0")), serially():
        fragment_cache.reset()
        m = marker()
        response = Client().get(f"/p/frag_cache/?n=2&marker={m}")
        assert response.status_code == 200 and tally(m) == 2


def test_a_fragment_cache_without_socket_timeouts_is_reported():
    for kind in ("memcached", "redis"):
        settings_dict = cache_settings(kind, f"{kind}://127.0.0.1:1")
        with override_settings(CACHES=settings_dict):
            assert not [e for e in checks.run_checks() if e.id == "parallel_render.W007"]
        del settings_dict["default"]["OPTIONS"]
        with override_settings(CACHES=settings_dict):
            found = [e for e in checks.run_checks() if e.id == "parallel_render.W007"]
        assert len(found) == 1 and "has no " in found[0].msg and "OPTIONS[" in found[0].hint


def test_a_streamed_page_looks_its_cached_blocks_up_before_its_first_byte(node):
    m = marker()
    path = f"/st/frag_cache/?n=3&marker={m}"
    first = Client().get(path)
    body = b"".join(first.streaming_content)
    assert tally(m) == 3 and b"<i>2 item 2</i>" in body
    time.sleep(0.1)
    second = Client().get(path)
    assert b"".join(second.streaming_content) == body
    assert outcomes(second) == ["cached"] * 3 and tally(m) == 3


def test_the_cache_bench_prints_its_table(transactional_db):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    path = f"/p/frag_cache/?n=3&marker={marker()}"
    call_command("parallel_bench", "cache", path, "--requests", "2", "--workers", "1", "--backend", "redis", stdout=out)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.getvalue().splitlines() if "|" in line}
    warm = [c.strip() for c in rows[("redis", "warm")].split("|")]
    assert warm[7] == "1.00" and warm[8] == "3.00"  # one round trip, every block from the cache
    assert [c.strip() for c in rows[("redis", "cold")].split("|")][9] == "3.00"  # every block sent


def test_a_process_local_cache_is_filled_by_the_master(parallel):
    """A LocMemCache: workers render the misses, the master stores them before the page returns.

    The cache is named here: this module's cached_node may still be up (pytest keeps a module's
    parametrized fixture until its last user), and then the default cache is its shared server,
    which the workers fill only after they have answered."""
    local = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": marker()}}
    m = marker()
    path = f"/p/frag_cache/?n=3&marker={m}"
    with override_settings(CACHES=local):
        fragment_cache.reset()
        assert not fragment_cache.is_shared(fragment_cache.backend())
        cold = Client().get(path)
        assert outcomes(cold) == ["sent"] * 3
        warm = Client().get(path)
    assert outcomes(warm) == ["cached"] * 3 and warm.content == cold.content and tally(m) == 3


def test_a_cached_block_nested_in_a_sent_one_is_looked_up_by_its_worker(node):
    m = marker()
    path = f"/p/frag_cache_nested/?marker={m}"
    first = Client().get(path)
    assert f"<o><n>{m}</n></o>" in first.content.decode() and tally(m) == 1
    time.sleep(0.1)
    second = Client().get(path)
    assert second.content == first.content and tally(m) == 1
    assert outcomes(second) == ["sent"]  # the outer block; its worker found the inner one cached


def test_a_lock_belongs_to_one_version_of_an_entry(node):
    key = fragment_cache.KEY_PREFIX + marker()
    holder = fragment_cache.Lookup(key, 60)
    holder.version, _hits = fragment_cache.lookup([key])
    assert fragment_cache.take_lock(holder, 5)
    assert not fragment_cache.take_lock(fragment_cache.Lookup(key, 60, holder.version), 5)
    fragment_cache.bump()
    after = fragment_cache.Lookup(key, 60)
    after.version, _hits = fragment_cache.lookup([key])
    assert after.version != holder.version and fragment_cache.take_lock(after, 5)
    fragment_cache.store(after, "<p>new</p>")
    fragment_cache.store(holder, "<p>old</p>")  # the older render finishing late is a miss for the new version
    assert fragment_cache.lookup([key])[1] == {}
