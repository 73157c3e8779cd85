"""Per-block cost: `parallel_bench overhead`, and the caches that keep a block cheap."""

from __future__ import annotations

import datetime
import json
import tempfile
import uuid
import zoneinfo
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command
from django.template import engines
from django.test import override_settings
from django.utils import timezone, translation

from parallel_render.codec import Encoder
from parallel_render.fragments import (
    SkewError,
    engine_alias,
    render_captured,
    timezone_from_key,
    timezone_key,
    worker_block,
)
from parallel_render.templatetags.parallel import parallel_nodes
from parallel_render.worker import may_nest, render_job


def test_parallel_bench_overhead_reports_each_role(transactional_db, capsys):
    call_command("parallel_bench", "overhead", "--path", "/p/leak/?n=3", "--blocks", "4", "--pages", "3",
                 "--rounds", "1", "--json")
    result = json.loads(capsys.readouterr().out)
    us = result["us_per_block"]
    # Serially the router and the workers do nothing; in parallel every block costs them CPU.
    assert us["router"] > 0 and us["workers"] > 0, us
    assert result["cpu_ms_per_page"]["serial"]["workers"] < result["cpu_ms_per_page"]["parallel"]["workers"]
    assert us["total"] == pytest.approx(us["master"] + us["router"] + us["workers"])
    call_command("parallel_bench", "overhead", "--path", "/p/leak/?n=3", "--blocks", "4", "--pages", "2", "--rounds", "1")
    out = capsys.readouterr().out
    assert "| workers" in out and "| total" in out and "reproduce: python manage.py parallel_bench overhead" in out


# -- the worker's caches and shortcuts --------------------------------------------------------

GENERATED = Path(tempfile.gettempdir()) / "parallel_render_generated_templates"


def generated(text: str) -> tuple[str, Path]:
    GENERATED.mkdir(exist_ok=True)
    name = f"overhead_{uuid.uuid4().hex[:12]}.html"
    path = GENERATED / name
    path.write_text(text)
    return name, path


def job(name: str, digest: str, env: dict | None = None, alias: str = "django", **values) -> dict:
    env = {"ae": True, "l10n": None, "use_tz": True, "lang": "en", "tz": "Europe/Paris", "app": None,
           "has_req": False, **(env or {})}
    return {"v": 1, "e": alias, "t": name, "o": 0, "h": digest, "n": "t:0", "env": env,
            "c": {k: Encoder().encode(v, k) for k, v in values.items()}}


def digest_of(name: str, alias: str = "django") -> str:
    return parallel_nodes(engines[alias].engine.get_template(name))[0].digest


def reset_loaders() -> None:
    """What the autoreloader does when a template file changes."""
    for loader in engines["django"].engine.template_loaders:
        loader.reset()


def test_a_worker_refuses_the_old_block_once_its_template_changed():
    name, path = generated("{% load parallel %}{% parallel %}old {{ title }}{% endparallel %}")
    old = digest_of(name)
    assert render_job(job(name, old, title="T")) == ("old T", 0)
    assert render_job(job(name, old, title="U")) == ("old U", 0)  # the block found before
    path.write_text("{% load parallel %}{% parallel %}new {{ title }}{% endparallel %}")
    reset_loaders()
    with pytest.raises(SkewError, match="differs between master and worker"):
        render_job(job(name, old, title="T"))
    assert render_job(job(name, digest_of(name), title="T")) == ("new T", 0)


def test_a_block_found_for_one_engine_is_not_used_for_another(tmp_path):
    name, _path = generated("{% load parallel %}{% parallel %}one {{ title }}{% endparallel %}")
    one = digest_of(name)
    assert render_job(job(name, one, title="T")) == ("one T", 0)
    (tmp_path / name).write_text("{% load parallel %}{% parallel %}two {{ title }}{% endparallel %}")
    backends = [
        {"BACKEND": "django.template.backends.django.DjangoTemplates", "NAME": "django", "DIRS": [GENERATED]},
        {"BACKEND": "django.template.backends.django.DjangoTemplates", "NAME": "other", "DIRS": [tmp_path]},
    ]
    with override_settings(TEMPLATES=backends):
        # Same alias, new engine: its template is loaded and checked again, not taken from before.
        assert worker_block("django", name, 0, one)[0].engine is engines["django"].engine
        assert render_job(job(name, one, title="T")) == ("one T", 0)
        with pytest.raises(SkewError):
            render_job(job(name, one, alias="other", title="T"))
        assert render_job(job(name, digest_of(name, "other"), alias="other", title="T")) == ("two T", 0)


def test_each_job_renders_in_its_own_language_and_time_zone():
    name, _path = generated(
        "{% load parallel i18n tz %}{% parallel %}{% get_current_language as lang %}"
        "{% get_current_timezone as zone %}{{ lang }} {{ zone }} {{ when|date:'H:i' }}{% endparallel %}"
    )
    digest = digest_of(name)
    when = datetime.datetime(2024, 1, 2, 12, 0, tzinfo=datetime.timezone.utc)
    fr = job(name, digest, {"lang": "fr", "tz": "Asia/Tokyo"}, when=when)
    en = job(name, digest, {"lang": "en", "tz": "Europe/Paris"}, when=when)
    fixed = job(name, digest, {"lang": "de", "tz": timezone_key(datetime.timezone(datetime.timedelta(hours=-3), "X"))},
                when=when)
    assert render_job(fr)[0] == "fr Asia/Tokyo 21:00"
    assert render_job(en)[0] == "en Europe/Paris 13:00"
    assert render_job(fixed)[0] == "de X 09:00"
    assert render_job(fr)[0] == "fr Asia/Tokyo 21:00"


def test_the_master_renders_a_block_in_its_environment_and_restores_its_own():
    name, _path = generated("{% load parallel i18n %}{% parallel %}{% get_current_language as l %}{{ l }}{% endparallel %}")
    template = engines["django"].engine.get_template(name)
    node = parallel_nodes(template)[0]
    with translation.override("de"), timezone.override(zoneinfo.ZoneInfo("Asia/Tokyo")):
        env = job(name, node.digest, {"lang": "fr", "tz": "UTC"})["env"]
        assert render_captured(node, template, {}, env) == "fr"
        assert translation.get_language() == "de" and timezone.get_current_timezone() is zoneinfo.ZoneInfo("Asia/Tokyo")


@pytest.mark.parametrize(
    "tz", [zoneinfo.ZoneInfo("UTC"), datetime.timezone.utc, zoneinfo.ZoneInfo("Europe/Paris"),
           datetime.timezone(datetime.timedelta(hours=5, minutes=30), "IST")],
)
def test_time_zones_travel_as_themselves(tz):
    back = timezone_from_key(orjson.loads(orjson.dumps(timezone_key(tz))))
    assert type(back) is type(tz) and back == tz and back.tzname(None) == tz.tzname(None)
    if not isinstance(tz, datetime.timezone) or tz is datetime.timezone.utc:
        assert back is tz  # so a worker already in that zone keeps it


def test_an_engine_is_named_by_the_current_template_settings():
    engine = engines["django"].engine
    assert engine_alias(engine) == engine_alias(engine) == "django"
    backends = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "NAME": "renamed", "DIRS": [GENERATED]}]
    with override_settings(TEMPLATES=backends):
        assert engine_alias(engine) is None
        assert engine_alias(engines["renamed"].engine) == "renamed"
    assert engine_alias(engines["django"].engine) == "django"


@pytest.mark.parametrize(
    ("body", "nests"),
    [
        ("<li>{{ row.label }} {% if row.i %}#{{ row.i|add:1 }}{% endif %}</li>", False),
        ("{% for x in xs %}{% with y=x %}{% translate 'Hi' %}{{ y }}{% endwith %}{% endfor %}", False),
        ("{% parallel %}inner{% endparallel %}", True),
        ('{% include "t/_item.html" %}', True),
        ("{% for x in xs %}{% if x %}{% parallel %}{{ x }}{% endparallel %}{% endif %}{% endfor %}", True),
    ],
)
def test_a_job_gets_a_render_session_only_when_its_block_may_nest_another(body, nests):
    name, _path = generated("{% load parallel i18n %}{% parallel %}" + body + "{% endparallel %}")
    node = parallel_nodes(engines["django"].engine.get_template(name))[0]
    assert may_nest(node) is nests


@pytest.mark.parametrize("bench", ["overhead", "load"])
def test_a_missing_psutil_says_which_extra_to_install(monkeypatch, bench):
    import sys

    from django.core.management.base import CommandError

    monkeypatch.setitem(sys.modules, "psutil", None)  # as if it were not installed
    with pytest.raises(CommandError, match=r"psutil, which is not installed: pip install 'parallel_render\[node\]'"):
        call_command("parallel_bench", bench)
