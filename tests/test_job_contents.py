"""A job carries only what its block can read (docs/what-a-job-carries.md).

Two kinds of test: the jobs a real master makes for a page, captured as the master encodes
them (before sealing, so they can be read) and searched for what must never travel; and the
same pages through the real router and workers, byte for byte against the serial page.
"""

from __future__ import annotations

import contextlib
import re

import orjson
import pytest
from django import template
from django.conf import settings
from django.contrib.auth.models import User
from django.middleware.csrf import _unmask_cipher_token
from django.shortcuts import render
from django.template import Engine, engines
from django.test import Client, override_settings
from django.urls import include, path
from django.utils.crypto import get_random_string

from parallel_render import analysis, codec, inspection, session
from parallel_render.templatetags import parallel as parallel_tags
from tests.conftest import block_pids, rescued
from tests.testapp.models import Article, Author

SERIAL = {"HTTP_X_PARALLEL_RENDER": "serial"}
PASSWORD = "correct horse battery staple"
CSRF_SECRET = get_random_string(32)


class ForgedQuerySet(codec.RemoteQuerySet):
    """In the master an ordinary queryset of articles; in a job, the SQL of whoever forged it."""

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            self._result_cache = list(Article.objects.order_by("id"))
            self._prefetch_done = True


def forged(sql: str) -> ForgedQuerySet:
    qs = ForgedQuerySet(model=Article, using="default")
    qs._remote = (sql, [], [])
    return qs


def jobs_page(request, name):
    if "cart" in request.GET:
        request.session["cart"] = int(request.GET["cart"])
    request.session.get("cart")  # the view loads the session, as many views do
    context = {
        "authors": Author.objects.order_by("id"),
        "first_author": Author.objects.order_by("id").first(),
        "article_qs": Article.objects.order_by("id"),
        "forged": forged(request.GET.get("sql", "DELETE FROM testapp_article")),
    }
    return render(request, f"t/jobs_{name}.html", context)


urlpatterns = [path("jobs/<str:name>/", jobs_page), path("", include("tests.testapp.urls"))]
pytestmark = pytest.mark.urls(__name__)


@pytest.fixture
def member(transactional_db, settings):
    """A logged-in client with a session (holding a cart), a CSRF cookie and a theme cookie."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast to make
    user = User.objects.create_user("ann", "ann@example.com", PASSWORD, first_name="Ann", last_name="Lee")
    author = Author.objects.create(name="Author <One>", email="secret-author@example.com")
    Article.objects.create(title="First", body="", author=author)
    Article.objects.create(title="Second", body="", author=author)
    client = Client()
    client.force_login(user)
    client.cookies["theme"] = "dark"
    client.cookies[settings.CSRF_COOKIE_NAME] = CSRF_SECRET
    client.cookies["signed"] = "value:1vJ3kX:" + "a" * 43  # as django.core.signing signs
    client.get("/jobs/session/?cart=3", **SERIAL)
    user.refresh_from_db()
    return client, user


def secrets_of(client: Client, user: User) -> dict[str, str]:
    """What must never appear in a job, by what it is."""
    from django.contrib.sessions.models import Session

    session_id = client.cookies[settings.SESSION_COOKIE_NAME].value
    data = Session.objects.get(session_key=session_id).get_decoded()
    return {
        "password hash": user.password,
        "session id": session_id,
        "CSRF secret": CSRF_SECRET,
        "session auth hash": data["_auth_user_hash"],
        "signed cookie": "a" * 43,
    }


@contextlib.contextmanager
def captured_jobs():
    """Every job body the master encodes while rendering, as (job dict, bytes), no router.

    Taken where the tag serializes a job, before it is sealed: what the worker would open.
    """
    jobs: list[tuple[dict, bytes]] = []
    real = parallel_tags.orjson

    class Recorder:
        JSONEncodeError = real.JSONEncodeError
        loads = staticmethod(real.loads)

        @staticmethod
        def dumps(obj, *args, **kwargs):
            out = real.dumps(obj, *args, **kwargs)
            if isinstance(obj, dict) and "c" in obj:
                jobs.append((obj, out))
            return out

    client = inspection._RecordingClient()
    current = session.RenderSession(None, client, stitch=False)  # type: ignore[arg-type]
    token = session.activate(current)
    parallel_tags.orjson = Recorder  # type: ignore[assignment]
    try:
        with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "ENABLED": False}):
            yield jobs
    finally:
        parallel_tags.orjson = real
        session.deactivate(token)


def job_for(client: Client, url: str) -> tuple[dict, bytes]:
    with captured_jobs() as jobs:
        response = client.get(url)
    assert response.status_code == 200
    assert len(jobs) == 1, f"{url}: {len(jobs)} jobs"
    return jobs[0]


def assert_nothing_secret(body: bytes, secrets: dict[str, str]) -> None:
    for what, value in secrets.items():
        assert value.encode() not in body, f"the job carries the {what}"


def same(client: Client, url: str, sent: bool = True, **extra):
    """The page through the workers is the serial page; with sent, a worker rendered its block."""
    serial = client.get(url, **SERIAL, **extra)
    response = client.get(url, **extra)
    assert response.status_code == serial.status_code == 200
    assert response.content.decode() == serial.content.decode()
    if sent:
        assert block_pids(response) and not rescued(response), response.headers.get("Server-Timing")
    return response


def fresh_templates() -> None:
    for loader in engines["django"].engine.template_loaders:
        getattr(loader, "reset", lambda: None)()


# -- what the analysis sees -----------------------------------------------------------------


def reads_of(source: str) -> analysis.Analysis:
    engine = engines["django"].engine
    template = engine.from_string("{% load parallel %}{% parallel %}" + source + "{% endparallel %}")
    (node,) = parallel_tags.parallel_nodes(template).values()
    return node.get_analysis(engine)


def test_the_analysis_records_what_is_read_under_each_name():
    found = reads_of(
        "{{ request.COOKIES.theme }}{% if request.session.cart %}{{ user.username|upper }}{% endif %}"
        "{% for a in articles %}{{ a.title }}{% endfor %}{% with c=request.META %}{{ c.X }}{% endwith %}"
        "{{ x|default:user.email }}"
    )
    assert found.read_paths() == [
        "a.title", "articles", "c.X", "request.COOKIES.theme", "request.META", "request.session.cart",
        "user.email", "user.username", "x",
    ]
    assert {"title", "username", "email", "theme", "cart", "COOKIES"} <= found.attrs
    # A name read whole anywhere is read whole.
    assert reads_of("{{ user.username }}{{ user }}").read_paths() == ["user"]


register = template.Library()


@register.inclusion_tag("form.html")
def form_tag():
    return {}


@register.inclusion_tag("plain.html")
def plain_tag():
    return {}


def test_csrf_token_is_read_by_csrf_token_tags_and_inclusion_tags_that_render_it():
    assert "csrf_token" in reads_of("{% csrf_token %}").names
    assert "csrf_token" in reads_of("{{ csrf_token }}").names
    engine = Engine(
        libraries={"parallel": "parallel_render.templatetags.parallel", "jobtags": __name__},
        loaders=[("django.template.loaders.locmem.Loader", {
            "form.html": "<form>{% csrf_token %}</form>", "plain.html": "<p>{{ anything }}</p>",
        })],
    )

    def names(source: str) -> set[str]:
        template = engine.from_string("{% load parallel jobtags %}{% parallel %}" + source + "{% endparallel %}")
        (node,) = parallel_tags.parallel_nodes(template).values()
        return node.get_analysis(engine).names

    # Django hands csrf_token to every inclusion tag's template: only one that renders it needs it.
    assert "csrf_token" in names("{% form_tag %}")
    assert "csrf_token" not in names("{% plain_tag %}")


# -- what a job carries ---------------------------------------------------------------------


def test_a_block_reading_one_cookie_carries_that_cookie_only(member):
    client, user = member
    job, body = job_for(client, "/jobs/cookie/")
    request = job["c"]["request"]
    assert request["COOKIES"] == {"v": {"theme": "dark"}, "a": ["nothing"]}
    assert "session" not in request and "user" not in request
    assert "CSRF_COOKIE" not in request["META"]["v"]
    assert_nothing_secret(body, secrets_of(client, user))


def test_a_block_reading_every_cookie_carries_none_of_the_protected_ones(member):
    client, user = member
    job, body = job_for(client, "/jobs/cookies_all/")
    cookies = job["c"]["request"]["COOKIES"]
    assert cookies["v"] == {"theme": "dark"}
    assert cookies["w"] == sorted([settings.CSRF_COOKIE_NAME, settings.SESSION_COOKIE_NAME, "signed"])
    assert_nothing_secret(body, secrets_of(client, user))


@pytest.mark.parametrize("name", ["session_cookie", "session_key", "user_password", "meta_cookie"])
def test_a_block_naming_a_credential_renders_inline(member, name, caplog):
    client, _user = member
    fresh_templates()
    caplog.set_level("INFO", logger="parallel_render")
    with captured_jobs() as jobs:
        response = client.get(f"/jobs/{name}/")
    assert response.status_code == 200 and not jobs
    assert "renders inline" in caplog.text and "never travel" in caplog.text


def test_a_block_reading_one_session_key_carries_that_key_only(member):
    client, user = member
    job, body = job_for(client, "/jobs/session/")
    request = job["c"]["request"]
    assert request["session"] == {"v": {"cart": 3}, "a": ["nothing"]}
    assert "COOKIES" not in request
    assert_nothing_secret(body, secrets_of(client, user))


def test_a_block_reading_some_fields_of_the_user_carries_those_fields(member):
    client, user = member
    job, body = job_for(client, "/jobs/user/")
    sent = job["c"]["user"]
    assert sent["f"] == {"id": user.pk, "username": "ann"}
    assert "password" in sent["w"] and "email" in sent["w"] and "last_login" in sent["w"]
    assert b"ann@example.com" not in body
    assert_nothing_secret(body, secrets_of(client, user))


def test_a_user_read_whole_travels_without_its_password(member):
    client, user = member
    job, body = job_for(client, "/jobs/user_whole/")
    sent = job["c"]["user"]
    assert sent["f"]["email"] == "ann@example.com" and sent["w"] == ["password"]
    assert_nothing_secret(body, secrets_of(client, user))


def test_the_csrf_token_travels_masked_and_never_the_cookie_or_the_secret(member):
    client, user = member
    job, body = job_for(client, "/jobs/csrf/")
    token = job["c"]["csrf_token"]
    assert _unmask_cipher_token(token) == CSRF_SECRET
    assert set(job["c"]) == {"csrf_token"}
    assert_nothing_secret(body, secrets_of(client, user))


def test_the_request_for_worker_context_processors_carries_no_credential(member):
    client, user = member
    with captured_jobs() as jobs:
        client.get("/p/processors/", **{"HTTP_USER_AGENT": "ua"})
    ((job, body),) = [(j, b) for j, b in jobs if "site_info" in j["c"]]
    request = job["req"]
    assert request["COOKIES"]["v"] == {"theme": "dark"}
    assert request["session"]["v"]["cart"] == 3 and request["session"]["w"] == ["_auth_user_hash"]
    assert "password" in request["user"]["w"]
    assert_nothing_secret(body, secrets_of(client, user))


def test_fields_the_site_marks_sensitive_never_travel(member, settings, monkeypatch):
    client, _user = member
    author = Author.objects.get()
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "SENSITIVE_FIELDS": ["testapp.Author.email"]}
    assert codec.sensitive_fields(Author) == {"email"}
    sent = codec.Encoder().encode(author, "author")
    assert "email" not in sent["f"] and sent["w"] == ["email"]
    rebuilt = codec.Decoder().decode(orjson.loads(orjson.dumps(sent)))
    assert rebuilt.name == author.name
    with pytest.raises(codec.RemoteAttributeError, match=r"testapp\.Author\.email was not sent"):
        rebuilt.email  # noqa: B018
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "SENSITIVE_FIELDS": []}
    assert "email" in codec.Encoder().encode(author, "author")["f"]
    # The model's own list, as a class attribute.
    monkeypatch.setattr(Author, "PARALLEL_RENDER_SENSITIVE_FIELDS", ("email",), raising=False)
    codec.clear_sensitive_cache()
    try:
        assert "email" not in codec.Encoder().encode(author, "author")["f"]
        with pytest.raises(codec.Unsendable, match="sensitive"):
            codec.Encoder().encode(Author.objects.values("name", "email"), "rows")
        with captured_jobs() as jobs:
            client.get("/jobs/author/")
        bodies = b"".join(body for _job, body in jobs)
        assert len(jobs) == 2 and b"secret-author@example.com" not in bodies
    finally:
        monkeypatch.undo()
        codec.clear_sensitive_cache()


def test_a_password_never_travels_in_rows_of_users(member):
    _client, user = member
    with pytest.raises(codec.Unsendable, match=r"auth\.User\.password, a sensitive field"):
        codec.Encoder().encode(User.objects.values(), "users")
    with pytest.raises(codec.Unsendable, match="sensitive"):
        codec.Encoder().encode(User.objects.values_list("username", "password"), "users")
    assert codec.Encoder().encode(User.objects.values_list("username", flat=True), "users")["rows"] == ["ann"]
    users = list(User.objects.all())
    body = orjson.dumps(codec.Encoder().encode({"users": users, "again": users[0]}, "v"))
    assert user.password.encode() not in body and b"ann@example.com" in body


def test_a_block_whose_lookups_name_a_sensitive_field_keeps_its_users_home(member):
    _client, user = member
    found = reads_of("{% for u in users %}{{ u.password }}{% endfor %}")
    for users in (User.objects.all(), list(User.objects.all()), [user]):
        with pytest.raises(codec.NeverSent, match=r"auth\.User\.password, a sensitive field"):
            codec.Encoder(found).encode(users, "users")
    assert codec.Encoder(reads_of("{% for u in users %}{{ u.username }}{% endfor %}")).encode([user], "users")


def test_session_models_never_carry_their_key_or_data(member):
    from django.contrib.sessions.models import Session

    _client, _user = member
    stored = Session.objects.get()
    sent = codec.Encoder().encode(stored, "s")
    body = orjson.dumps(sent)
    assert stored.session_key.encode() not in body and stored.session_data.encode() not in body


# -- the same pages, through the workers ----------------------------------------------------


def test_pages_reading_cookies_session_and_user_fields_are_exact(parallel, member):
    client, _user = member
    assert "theme=dark none=" in same(client, "/jobs/cookie/").content.decode()
    assert "cart=3 none=" in same(client, "/jobs/session/").content.decode()
    assert "ann True" in same(client, "/jobs/user/").content.decode()
    assert "ann ann@example.com Ann Lee" in same(client, "/jobs/user_whole/").content.decode()
    response = same(client, "/jobs/meta/?q=1", HTTP_X_TEST="x-test", HTTP_USER_AGENT="agent")
    assert "x-test|agent|testserver|False|/jobs/meta/?q=1" in response.content.decode()


def test_what_the_worker_was_not_sent_makes_the_master_render_the_block(parallel, member):
    client, _user = member
    # Every cookie, the session and CSRF cookies among them: the worker has only the others.
    response = same(client, "/jobs/cookies_all/", sent=False)
    assert f"{settings.SESSION_COOKIE_NAME}=" in response.content.decode()
    assert rescued(response) and "request.COOKIES" in rescued(response)[0]
    # has_usable_password reads the password, which the worker's user never had.
    response = same(client, "/jobs/user_method/", sent=False)
    assert "ann True" in response.content.decode()
    assert rescued(response) and "auth.User.password was not sent" in rescued(response)[0]


@pytest.mark.parametrize("name", ["session_cookie", "session_key", "user_password", "meta_cookie"])
def test_pages_naming_a_credential_are_exact(parallel, member, name):
    client, _user = member
    response = same(client, f"/jobs/{name}/", sent=False)
    assert not block_pids(response)


def test_site_marked_fields_pages_are_exact(parallel, member, settings):
    client, _user = member
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "SENSITIVE_FIELDS": ["testapp.Author.email"]}
    fresh_templates()
    response = same(client, "/jobs/author/", sent=False)
    assert "Author &lt;One&gt;|Author &lt;One&gt; |secret-author@example.com" in response.content.decode()
    # The name and the list go to workers; the block reading the e-mail stays here.
    assert len(block_pids(response)) == 2 and not rescued(response)


def test_csrf_token_rendered_by_a_worker_is_the_masters_token(parallel, member):
    client, _user = member
    pattern = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
    serial = client.get("/jobs/csrf/", **SERIAL).content.decode()
    response = client.get("/jobs/csrf/")
    assert block_pids(response) and not rescued(response)
    page = response.content.decode()
    # Tokens are masked afresh for every page; unmasked, both are the cookie's secret.
    assert _unmask_cipher_token(pattern.search(page).group(1)) == CSRF_SECRET
    assert pattern.sub(lambda m: _unmask_cipher_token(m.group(1)), page) == pattern.sub(
        lambda m: _unmask_cipher_token(m.group(1)), serial
    )


# -- querysets run read-only ----------------------------------------------------------------


WRITES = [
    "DELETE FROM testapp_article",
    "UPDATE testapp_article SET title = 'owned'",
    'SELECT "testapp_article"."id" FROM "testapp_article"; DELETE FROM testapp_article',
    "WITH x AS (SELECT 1) DELETE FROM testapp_article",
    "INSERT INTO testapp_article (title, body, price, author_id) SELECT title, body, price, author_id FROM testapp_article",
    'SELECT "id", "title" FROM testapp_article -- ; DELETE',
    "SELECT [x'] ; DELETE FROM testapp_article; --'",
    "select * from testapp_article where 1 = 1 union select * from testapp_article into outfile '/tmp/x'",
]


def articles_state() -> list[tuple]:
    return list(Article.objects.order_by("id").values_list("id", "title"))


@pytest.mark.parametrize("sql", WRITES)
def test_a_queryset_that_is_not_one_select_is_refused_and_changes_nothing(member, sql):
    before = articles_state()
    qs = codec.Decoder().decode({"$qs": "testapp.article", "db": "default", "sql": sql, "params": [], "prefetch": []})
    with pytest.raises(codec.RemoteQueryRefused):
        list(qs)
    assert articles_state() == before


def test_the_database_itself_refuses_writes_while_a_queryset_runs(member):
    from django.db import OperationalError, connection

    from parallel_render import readonly

    before = articles_state()
    with readonly.read_only(connection), pytest.raises(OperationalError, match="readonly"):
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM testapp_article")
    assert articles_state() == before
    # Restored afterwards: this connection writes again.
    Article.objects.filter(title="First").update(title="First!")
    assert Article.objects.filter(title="First!").exists()


@pytest.mark.parametrize(
    ("sql", "vendor"),
    [
        ("SELECT \"a\" FROM \"t\" WHERE \"b\" LIKE %s ESCAPE '\\'", "sqlite"),
        ("SELECT \"a;b\" FROM \"t\" WHERE \"c\" = 'it''s; DELETE'", "postgresql"),
        ("SELECT `a` FROM `t` WHERE `b` = 'x\\' ; still quoted'", "mysql"),
        ("SELECT DISTINCT \"t\".\"id\" FROM \"t\" ORDER BY \"t\".\"id\" DESC LIMIT 21", "oracle"),
    ],
)
def test_what_django_compiles_passes_the_select_check(sql, vendor):
    from parallel_render import readonly

    readonly.check_select(sql, vendor)


@pytest.mark.parametrize(
    ("sql", "vendor"),
    [
        ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "postgresql"),
        ("SELECT $$;$$; DELETE FROM t", "postgresql"),
        ("SELECT E'\\'; DELETE FROM t; --'", "postgresql"),
        (r"SELECT 'a\\'; DELETE FROM t; -- '", "mysql"),
        (r"SELECT 'x\'; DELETE FROM t", "sqlite"),
        ("SELECT * FROM t FOR UPDATE", "postgresql"),
        ("SELECT 1 # comment", "mysql"),
        ("  select 1; ", "sqlite"),
        ("SELECT 'unterminated", "sqlite"),
    ],
)
def test_the_select_check_refuses_tricks_of_other_databases(sql, vendor):
    from parallel_render import readonly

    with pytest.raises(readonly.QueryRefused):
        readonly.check_select(sql, vendor)


def test_a_forged_queryset_is_refused_by_the_worker_and_the_master_renders_the_block(parallel, member):
    before = articles_state()
    response = same(member[0], "/jobs/forged/", sent=False)
    assert "First;Second;" in response.content.decode()
    assert rescued(response) and "refused" in rescued(response)[0]
    assert articles_state() == before


def test_a_real_queryset_still_runs_in_a_worker(parallel, member):
    response = same(member[0], "/jobs/qs/")
    assert "First;Second; 2" in response.content.decode()


# -- settings and checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["testapp.Nope.email"], "there is no model 'testapp.Nope'"),
        (["testapp.Author.phone"], "testapp.Author has no field 'phone'"),
    ],
)
def test_sensitive_fields_setting_is_checked(entries, message):
    from django.core.checks import run_checks

    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SENSITIVE_FIELDS": entries}):
        errors = [e for e in run_checks() if e.id == "parallel_render.E002"]
    assert len(errors) == 1 and message in errors[0].msg and errors[0].hint


def test_sensitive_fields_setting_must_be_a_list_of_dotted_names():
    from django.core.checks import run_checks

    with override_settings(PARALLEL_RENDER={**settings.PARALLEL_RENDER, "SENSITIVE_FIELDS": ["email"]}):
        errors = [e for e in run_checks() if e.id == "parallel_render.E001"]
    assert errors and "SENSITIVE_FIELDS" in errors[0].msg


def test_a_models_own_sensitive_fields_are_checked(monkeypatch):
    from django.core.checks import run_checks

    monkeypatch.setattr(Author, "PARALLEL_RENDER_SENSITIVE_FIELDS", ("phone",), raising=False)
    errors = [e for e in run_checks() if e.id == "parallel_render.E003"]
    assert len(errors) == 1 and "'phone'" in errors[0].msg and errors[0].obj is Author
