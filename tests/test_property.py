"""Property: for generated templates and contexts, the parallel page is the serial page."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import tempfile
from pathlib import Path

import pytest
from django.test import Client
from django.utils.safestring import mark_safe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.testapp import views
from tests.testapp.models import Article, Author

GENERATED = Path(tempfile.gettempdir()) / "parallel_render_generated_templates"

EXPRESSIONS = [
    "{{ s }}", "{{ s|upper }}", "{{ s|default:'x' }}", "{{ n }}", "{{ n|add:2 }}", "{{ f }}", "{{ d }}",
    "{{ dt|date:'Y-m-d H:i e' }}", "{{ dt }}", "{{ lst|join:',' }}", "{{ lst|length }}", "{{ dct.k }}",
    "{{ dct }}", "{{ safe }}", "{{ safe|escape }}", "{{ none }}", "{{ none|default_if_none:'-' }}", "{{ b }}",
    "{{ obj.title }}", "{{ obj.author.name }}", "{{ obj.price }}", "{{ missing }}", "{{ missing.x|default:'m' }}",
    "{{ tup.0 }}", "{{ s|truncatechars:3 }}", "{{ s|linebreaksbr }}", "{{ n|floatformat:2 }}",
    "{{ qs|length }}", "{% for a in qs %}{{ a.title }}/{{ a.author.name }};{% endfor %}", "{{ qs.count }}",
    "{{ obj.tags.all|join:',' }}", "{{ dt|date:'DATETIME_FORMAT' }}", "{{ n|filesizeformat }}",
    "{% url 'page' name=s|slugify|default:'x' %}", "{{ request.path }}", "{{ user.is_authenticated }}",
]
TEXT = st.sampled_from(["", " ", "<p>", "</p>", "a & b", "\n", "é", "[", "]"])


def node(depth: int) -> st.SearchStrategy[str]:
    leaf = st.one_of(TEXT, st.sampled_from(EXPRESSIONS))
    if depth >= 3:
        return leaf
    body = st.lists(st.deferred(lambda: node(depth + 1)), max_size=4).map("".join)
    return st.one_of(
        leaf,
        leaf,
        body.map(lambda b: f"{{% parallel %}}{b}{{% endparallel %}}"),
        body.map(lambda b: f"{{% parallel %}}{b}{{% endparallel %}}"),
        body.map(lambda b: f"{{% parallel with s=n|stringformat:'s' only %}}{b}{{% endparallel %}}"),
        st.tuples(body, body).map(lambda t: f"{{% parallel timeout=5 %}}{t[0]}{{% fallback %}}{t[1]}{{% endparallel %}}"),
        body.map(lambda b: f"{{% for x in lst %}}{{{{ x }}}}{{{{ forloop.counter }}}}{b}{{% empty %}}none{{% endfor %}}"),
        st.tuples(body, body).map(lambda t: f"{{% if b and n > 2 %}}{t[0]}{{% else %}}{t[1]}{{% endif %}}"),
        body.map(lambda b: f"{{% with s=s|lower n=n|add:1 %}}{b}{{% endwith %}}"),
        body.map(lambda b: f"{{% autoescape off %}}{b}{{% endautoescape %}}"),
        body.map(lambda b: f"{{% load i18n %}}{{% language 'fr' %}}{b}{{% endlanguage %}}"),
        body.map(lambda b: f"{{% load tz %}}{{% timezone 'America/New_York' %}}{b}{{% endtimezone %}}"),
        body.map(lambda b: f"{{% load tz %}}{{% localtime off %}}{b}{{% endlocaltime %}}"),
        body.map(lambda b: f"{{% load l10n %}}{{% localize off %}}{b}{{% endlocalize %}}"),
        body.map(lambda b: f"{{% filter lower %}}{b}{{% endfilter %}}"),
        body.map(lambda b: f"{{% spaceless %}}<p> {b} </p>{{% endspaceless %}}"),
        st.just('{% include "hyp/inc.html" %}'),
        st.just("{% firstof missing s as chosen %}{{ chosen }}"),
        st.just("{% for x in lst %}{% cycle 'odd' 'even' %}{% endfor %}"),
    )


CONTEXTS = st.fixed_dictionaries(
    {
        "s": st.text(alphabet="ab<>&\"' é\n", max_size=8),
        "n": st.integers(-5, 10**6),
        "f": st.floats(allow_nan=False, allow_infinity=False, width=32),
        "d": st.decimals(places=2, allow_nan=False, allow_infinity=False, min_value=-1000, max_value=1000),
        "dt": st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2030, 1, 1),
                           timezones=st.just(datetime.timezone.utc)),
        "lst": st.lists(st.one_of(st.integers(0, 99), st.text("xy<", max_size=3)), max_size=4),
        "dct": st.dictionaries(st.sampled_from(["k", "j"]), st.integers(0, 9), max_size=2),
        "safe": st.text(alphabet="<b>i/", max_size=6).map(mark_safe),
        "none": st.none(),
        "b": st.booleans(),
        "tup": st.tuples(st.integers(0, 9), st.text("q", max_size=2)),
    }
)


@pytest.fixture
def article(parallel):
    author = Author.objects.create(name="Zoë <z>")
    for i in range(3):
        Article.objects.create(title=f"T & t{i}", body="", price=decimal.Decimal("3.10") * i, author=author)
    return Article.objects.select_related("author").first()


@settings(max_examples=int(__import__("os").environ.get("HYP_EXAMPLES", "200")), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(template=st.lists(node(0), min_size=1, max_size=6).map("".join), context=CONTEXTS)
def test_parallel_page_equals_serial_page(article, template, context):
    source = "{% load parallel %}" + template
    name = "gen_" + hashlib.sha256(source.encode()).hexdigest()[:20] + ".html"
    GENERATED.mkdir(exist_ok=True)
    (GENERATED / name).write_text(source)
    views.GENERATED_CONTEXT = dict(context, obj=article, qs=Article.objects.filter(price__gt=0))
    client = Client()
    serial = client.get(f"/gen/{name}", HTTP_X_PARALLEL_RENDER="serial")
    response = client.get(f"/gen/{name}")
    assert response.status_code == serial.status_code == 200
    assert response.content.decode() == serial.content.decode(), (source, response.headers.get("Server-Timing"))
    DISPATCHED["pages"] += 1
    DISPATCHED["blocks"] += response.headers.get("Server-Timing", "").count(" pid ")


DISPATCHED = {"pages": 0, "blocks": 0}


def test_the_property_run_really_sent_blocks_to_workers():
    """Guards the property above against passing only because everything rendered inline."""
    assert DISPATCHED["pages"] >= 20
    print(DISPATCHED)
    assert DISPATCHED["blocks"] >= DISPATCHED["pages"] // 2, DISPATCHED


PIECES = st.sampled_from(["<!--pr:", "-->", ":", "1", "12", "٣", "x", "<", "-", "<!--pr:tok:", "<!--pr:tok:7-->"])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join), st.dictionaries(st.integers(0, 20), st.sampled_from(["A", "", "<b>"])))
def test_placeholders_are_replaced_as_the_regular_expression_would(text, html):
    """RenderSession.replace_placeholders splits on the page's prefix instead of compiling a
    pattern for every page's token: same placeholders found, same text out."""
    import re

    from parallel_render.session import RenderSession

    current = RenderSession(None, None, token="tok")
    expected = re.sub(r"<!--pr:tok:(\d+)-->", lambda m: html.get(int(m.group(1)), m.group(0)), text)
    assert current.replace_placeholders(text, html) == expected
