"""Values survive the trip to a worker, or are refused with a message naming them."""

from __future__ import annotations

import datetime
import decimal
import uuid
import zoneinfo

import orjson
import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import RequestFactory
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext_lazy

from parallel_render.codec import Decoder, Encoder, RemoteAttributeError, Unsendable, ValueCodec
from tests.testapp.models import Article, Author, Tag


def trip(value):
    return Decoder().decode(orjson.loads(orjson.dumps(Encoder().encode(value, "v"))))


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -5, 2**70, 1.5, "text", "", [1, [2, "3"]], (1, (2, None)),
        {"a": {"b": [1, {"c": 2}]}, "$d": "tag-like key"}, {"$s": "looks like a tag"},
        decimal.Decimal("12.3400"), datetime.date(2024, 2, 29), datetime.time(12, 30, 1, 5),
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6), datetime.timedelta(days=-1, seconds=5),
        datetime.datetime(2024, 1, 2, 3, 4, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.timezone(datetime.timedelta(hours=-3), "X")),
        uuid.UUID(int=5), float("inf"),
    ],
)
def test_round_trip_keeps_type_and_value(value):
    out = trip(value)
    assert out == value and type(out) is type(value)
    if isinstance(value, datetime.datetime) and value.tzinfo:
        assert out.tzname() == value.tzname()


def test_nan_and_safe_strings():
    assert trip(float("nan")) != trip(float("nan"))
    safe = trip(mark_safe("<b>x</b>"))
    assert type(safe) is SafeString and safe == "<b>x</b>"
    assert type(trip("<b>x</b>")) is str


def test_lazy_translation_is_resolved_in_the_master():
    assert trip(gettext_lazy("Hello")) == "Hello"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "v is a builtins.object"),
        ({1: "x"}, "key 1 is not a string"),
        ({"ok": [1, {2, 3}]}, r"v\.ok\[1\] is a builtins.set"),
        (lambda x: x, "builtins.function, which cannot be sent to a worker: calling it without arguments failed"),
    ],
)
def test_unsendable_values_are_named(value, message):
    with pytest.raises(Unsendable, match=message):
        Encoder().encode(value, "v")


@pytest.mark.django_db
def test_models_with_related_and_prefetched_caches_rebuild_without_queries(django_assert_num_queries):
    author = Author.objects.create(name="Ann")
    tag = Tag.objects.create(name="t")
    article = Article.objects.create(title="A", body="b", price=decimal.Decimal("1.50"), author=author)
    article.tags.add(tag)
    article = Article.objects.select_related("author").prefetch_related("tags").get()
    article.note = "extra attribute"
    with django_assert_num_queries(0):
        out = trip([article, article])
        rebuilt = out[0]
        assert out[1] is rebuilt
        assert rebuilt.pk == article.pk and rebuilt.title == "A" and rebuilt.price == decimal.Decimal("1.50")
        assert rebuilt.author.name == "Ann" and [t.name for t in rebuilt.tags.all()] == ["t"]
        assert rebuilt.note == "extra attribute" and not rebuilt._state.adding


@pytest.mark.django_db
def test_querysets_run_in_the_worker_or_travel_evaluated(django_assert_num_queries):
    author = Author.objects.create(name="Ann")
    for i in range(3):
        Article.objects.create(title=f"A{i}", body="", price=i, author=author)
    lazy = trip(Article.objects.filter(price__gte=1).order_by("-price"))
    with django_assert_num_queries(1):
        assert [a.title for a in lazy] == ["A2", "A1"] and lazy.count() == 2
    with pytest.raises(RemoteAttributeError):
        lazy.filter(title="A1")
    evaluated = Article.objects.select_related("author")
    list(evaluated)
    with django_assert_num_queries(0):
        assert [a.author.name for a in trip(evaluated)] == ["Ann"] * 3
    assert list(trip(Article.objects.none())) == []
    # A worker passing a queryset it was sent on to a nested block sends the same query.
    with django_assert_num_queries(1):
        assert trip(trip(Article.objects.filter(price__gte=1))).count() == 2
    assert list(trip(Article.objects.values_list("title", flat=True))) == ["A0", "A1", "A2"]


def test_request_and_user():
    request = RequestFactory().get("/a/b/?x=1&x=2&y=3", HTTP_USER_AGENT="ua")
    request.user = AnonymousUser()
    rebuilt = trip(request)
    assert rebuilt.path == "/a/b/" and rebuilt.GET.getlist("x") == ["1", "2"]
    assert rebuilt.headers["User-Agent"] == "ua" and rebuilt.user.is_anonymous
    assert rebuilt.get_full_path() == "/a/b/?x=1&x=2&y=3"
    # What the master's request never had is an AttributeError there too (URLNode relies on it).
    with pytest.raises(AttributeError):
        rebuilt.current_app  # noqa: B018
    from django.contrib.sessions.backends.signed_cookies import SessionStore

    request.session = SessionStore()  # the master has one, not loaded: not sent
    with pytest.raises(RemoteAttributeError):
        trip(request).session  # noqa: B018


def test_a_rebuilt_request_refuses_changes_that_only_the_masters_request_would_keep():
    """Session writes and messages (added or read) make the block the master's (SideEffect)."""
    from django.contrib import messages
    from django.contrib.messages.storage.fallback import FallbackStorage
    from django.contrib.sessions.backends.signed_cookies import SessionStore

    from parallel_render.codec import SideEffect

    request = RequestFactory().get("/")
    request.session = SessionStore()
    request.session["seen"] = 1  # loaded: it travels
    request._messages = FallbackStorage(request)
    rebuilt = trip(request)
    assert rebuilt.session["seen"] == 1 and messages.get_level(rebuilt) == messages.get_level(request)
    for change in (
        lambda: rebuilt.session.__setitem__("seen", 2),
        lambda: rebuilt.session.pop("seen"),
        lambda: rebuilt.session.update(seen=3),
        lambda: messages.info(rebuilt, "hello"),
        lambda: list(messages.get_messages(rebuilt)),
    ):
        with pytest.raises(SideEffect):
            change()
    assert rebuilt.session["seen"] == 1
    # A master request without the messages app: the worker fails as the master would.
    del request._messages
    with pytest.raises(messages.MessageFailure):
        messages.info(trip(request), "hello")


class Money:
    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (other.cents, other.currency)


class MoneyCodec(ValueCodec):
    type = Money
    tag = "money"

    def encode(self, value):
        return [value.cents, value.currency]

    def decode(self, data):
        return Money(*data)


def test_site_codecs_for_its_own_types(settings):
    with pytest.raises(Unsendable):
        trip(Money(5, "EUR"))
    settings.PARALLEL_RENDER = {"VALUE_CODECS": ["tests.test_codec.MoneyCodec"]}
    assert trip({"price": Money(5, "EUR")}) == {"price": Money(5, "EUR")}


def test_callables_are_called_once_as_templates_would():
    calls = []

    def latest():
        calls.append(1)
        return [1, 2]

    assert trip(latest) == [1, 2] and calls == [1]

    def needs_args(x):
        return x

    with pytest.raises(Unsendable, match="calling it without arguments failed"):
        trip(needs_args)

    def delete():
        pass

    delete.alters_data = True
    with pytest.raises(Unsendable, match="alters data"):
        trip(delete)


def test_loaded_session_travels_and_unloaded_one_does_not(rf):
    from django.contrib.sessions.backends.signed_cookies import SessionStore

    request = rf.get("/")
    request.session = SessionStore()
    with pytest.raises(RemoteAttributeError):
        trip(request).session  # noqa: B018
    request.session["cart"] = 3
    assert trip(request).session["cart"] == 3


def test_plain_values_inside_containers_keep_their_types():
    value = {"s": "x", "safe": mark_safe("<b>"), "big": 2**70, "inf": float("inf"), "none": None, "yes": True,
             "list": ["a", mark_safe("<i>"), False, None, (1, "b"), 2**70]}
    out = trip(value)
    assert out == value
    assert type(out["safe"]) is SafeString and type(out["list"][1]) is SafeString and type(out["s"]) is str
    assert type(out["list"][4]) is tuple and type(out["big"]) is int
