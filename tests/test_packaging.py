"""The package where the fastrouter cannot be built: it installs, says why, and renders inline.

A wheel is built from this checkout with the C++ compiler made unavailable (CXX=/bin/false),
installed into a fresh venv (the core dependencies only, no [node] extra), and a small site
is run there: `manage.py check` names the reason, `runserver` starts no router and serves
pages whose every block rendered inline, byte for byte the serial page, and `runparallel`
names the extra it needs. A router that fails to compile gives a pure-Python wheel. The
wheel that carries the router is built, repaired and run by scripts/package.sh.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = """
from pathlib import Path
BASE = Path(__file__).resolve().parent.parent
SECRET_KEY = "packaging-test"
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "site_pkg.urls"
INSTALLED_APPS = ["parallel_render", "django.contrib.staticfiles"]
MIDDLEWARE = ["parallel_render.middleware.ParallelRenderMiddleware"]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [BASE / "templates"]}]
DATABASES = {}
STATIC_URL = "static/"
USE_TZ = True
PARALLEL_RENDER = {"WORKERS": 2, "MIN_BLOCK_MS": 0, "ADAPTIVE": False}
"""

URLS = """
import os
from django.shortcuts import render
from django.urls import path
from parallel_render.signals import NO_SESSION, block_finished

outcomes = []

def note(sender, record, **kwargs):
    outcomes.append(f"{record.outcome}: {'no render session' if record.reason == NO_SESSION else record.reason}")

block_finished.connect(note, weak=False)

CONTEXT = {"title": "<Fish & chips>", "items": ["cod", "haddock", "plaice"]}

def page(request, name):
    outcomes.clear()
    response = render(request, name, CONTEXT)
    response["X-Blocks"] = " | ".join(outcomes)
    response["X-Pid"] = str(os.getpid())
    return response

urlpatterns = [path("<str:name>", page)]
"""

# The page, and the same page written without the plugin's tags: what plain Django renders.
PAGE = """{% load parallel %}<h1>{{ title }}</h1>
<ul>{% for item in items %}{% parallel %}<li>{{ forloop.counter }}. {{ item|upper }}</li>{% endparallel %}
{% endfor %}</ul>{% parallel timeout=2 with n=items|length %}<p>{{ n }} kinds</p>{% fallback %}<p>none</p>{% endparallel %}
"""
SERIAL = """<h1>{{ title }}</h1>
<ul>{% for item in items %}<li>{{ forloop.counter }}. {{ item|upper }}</li>
{% endfor %}</ul>{% with n=items|length %}<p>{{ n }} kinds</p>{% endwith %}
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what points at the checkout, its router or its settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PARALLEL_RENDER", "DJANGO_", "PYTHON")) and k not in ("CXX", "CC")}
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def pip_wheel(tmp: Path, *config: str, **env: str) -> subprocess.CompletedProcess:
    """`pip wheel` of this checkout as `pip install .` builds it, verbose, into tmp/dist.

    With this environment's scikit-build-core (the test extra) rather than a fresh one in an
    isolated environment: scripts/package.sh builds in isolation.
    """
    settings = [arg for setting in (f"build-dir={tmp / 'build'}", *config) for arg in ("-C", setting)]
    return run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
                "-v", *settings, "-w", str(tmp / "dist"), str(ROOT)], cwd=tmp, env=clean_env(**env), check=False)


def build_wheel(tmp: Path, *config: str, **env: str) -> tuple[Path, str]:
    """The wheel pip_wheel() built, and pip's verbose log."""
    proc = pip_wheel(tmp, *config, **env)
    if proc.returncode != 0:
        pytest.fail(f"pip wheel exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    (wheel,) = (tmp / "dist").glob("parallel_render-*.whl")
    return wheel, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def no_compiler(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("no-compiler")
    wheel, log = build_wheel(tmp, CXX="/bin/false")
    python = tmp / "venv" / "bin" / "python"
    venv.create(tmp / "venv", with_pip=False)
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile", "--disable-pip-version-check",
         str(wheel)], cwd=tmp)
    site = tmp / "site"
    (site / "site_pkg").mkdir(parents=True)
    (site / "templates").mkdir()
    (site / "site_pkg" / "__init__.py").write_text("")
    (site / "site_pkg" / "settings.py").write_text(SETTINGS)
    (site / "site_pkg" / "urls.py").write_text(URLS)
    (site / "templates" / "page.html").write_text(PAGE)
    (site / "templates" / "serial.html").write_text(SERIAL)
    (site / "manage.py").write_text(
        "import sys\nfrom django.core.management import execute_from_command_line\nexecute_from_command_line(sys.argv)\n")
    env = clean_env(DJANGO_SETTINGS_MODULE="site_pkg.settings")
    return {"wheel": wheel, "log": log, "python": python, "site": site, "env": env}


def test_without_a_compiler_the_build_says_why_and_the_wheel_has_no_router(no_compiler):
    assert re.match(r"parallel_render-[^-]+-py3-none-linux_[a-z0-9_]+\.whl$", no_compiler["wheel"].name)
    log = " ".join(no_compiler["log"].split())  # CMake wraps its warnings
    assert "the fastrouter is NOT built: no working C++ compiler was found" in log
    assert "every {% parallel %} block renders inline" in log
    names = zipfile.ZipFile(no_compiler["wheel"]).namelist()
    assert "parallel_render/bin/fastrouter-not-built.txt" in names
    assert not [n for n in names if n.endswith(("/fastrouter", "/fastrouter_bench"))]


def test_without_a_compiler_the_install_imports_and_check_says_why(no_compiler):
    python, site, env = no_compiler["python"], no_compiler["site"], no_compiler["env"]
    where = run([str(python), "-c", "import parallel_render; print(parallel_render.__file__)"], cwd=site, env=env)
    assert where.stdout.startswith(str(python.parent.parent)), where.stdout  # the venv's copy, not this checkout
    check = run([str(python), "manage.py", "check"], cwd=site, env=env)
    out = " ".join((check.stdout + check.stderr).split())
    assert ("parallel_render.W005) Every {% parallel %} block renders inline: the fastrouter was not built when "
            "parallel_render was installed: no working C++ compiler was found when the package was built "
            "(CXX=/bin/false).") in out
    assert "HINT: Install a C++17 compiler" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, deadline: float) -> tuple[str, dict[str, str]]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode(), dict(response.headers)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_without_a_compiler_runserver_renders_every_block_inline(no_compiler):
    python, site, env = no_compiler["python"], no_compiler["site"], no_compiler["env"]
    port = free_port()
    proc = subprocess.Popen([str(python), "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"], cwd=site,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        page, headers = get(f"http://127.0.0.1:{port}/page.html", deadline)
        serial, _ = get(f"http://127.0.0.1:{port}/serial.html", deadline)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert page == serial
    assert "<h1>&lt;Fish &amp; chips&gt;</h1>" in page and "<li>3. PLAICE</li>" in page and "<p>3 kinds</p>" in page
    assert int(headers["X-Pid"]) == proc.pid  # rendered by the server itself
    assert headers["X-Blocks"].split(" | ") == ["inline: no render session"] * 4
    output = " ".join(output.split())
    assert ("parallel_render: {% parallel %} blocks render inline: the fastrouter was not built when parallel_render "
            "was installed: no working C++ compiler was found") in output
    assert "parallel_render.W005" in output


def test_without_the_node_extra_runparallel_names_it(no_compiler):
    python, site, env = no_compiler["python"], no_compiler["site"], no_compiler["env"]
    proc = run([str(python), "manage.py", "runparallel"], cwd=site, env=env, check=False)
    assert proc.returncode == 1
    assert ('CommandError: runparallel needs gunicorn and psutil, not installed here: '
            'pip install "parallel_render[node]" installs them.') in proc.stderr


def test_a_router_that_fails_to_compile_leaves_a_pure_python_wheel(tmp_path):
    # A compiler that works, and a flag only the router's own sources get, which it refuses:
    # CMake finds nothing wrong up front, the compilation fails.
    wheel, log = build_wheel(tmp_path, "cmake.define.FASTROUTER_SANITIZE=no-such-sanitizer")
    assert re.match(r"parallel_render-[^-]+-py3-none-any\.whl$", wheel.name)
    assert "retrying due to override" in log
    assert "the fastrouter failed to build" in " ".join(log.split())
    names = zipfile.ZipFile(wheel).namelist()
    assert "parallel_render/__init__.py" in names and not [n for n in names if "/bin/" in n]


def test_a_build_that_requires_the_router_fails_without_a_compiler(tmp_path):
    proc = pip_wheel(tmp_path, CXX="/bin/false", PARALLEL_RENDER_REQUIRE_FASTROUTER="1")
    assert proc.returncode != 0
    assert "cannot build the fastrouter: no working C++ compiler was found" in " ".join((proc.stdout + proc.stderr).split())
    assert not list((tmp_path / "dist").glob("*.whl"))


# The check itself, in this process, for the cases a build here cannot produce.


@pytest.fixture
def w005(monkeypatch, settings):
    """parallel_render.W005 as `manage.py check` would report it, with no router configured."""
    from django.core.checks import run_checks

    from parallel_render import conf

    monkeypatch.delenv(conf.ENV_ROUTER, raising=False)
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ROUTER": None}

    def messages():
        return [m for m in run_checks() if m.id == "parallel_render.W005"]

    return messages


def test_check_is_silent_where_the_router_runs(w005):
    assert w005() == []


def test_check_names_a_router_binary_that_does_not_run(w005, monkeypatch, tmp_path):
    from parallel_render import conf

    binary = tmp_path / "fastrouter"
    binary.write_text("#!/bin/sh\necho 'cannot execute binary file: Exec format error' >&2\nexit 126\n")
    binary.chmod(0o755)
    monkeypatch.setenv(conf.ENV_BINARY, str(binary))
    (message,) = w005()
    assert message.msg == (f"Every {{% parallel %}} block renders inline: the fastrouter at {binary} does not run: "
                           "cannot execute binary file: Exec format error.")
    assert "FASTROUTER_BINARY" in message.hint


def test_check_off_linux_says_so_and_how_to_silence_it(w005, monkeypatch):
    import platform

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    (message,) = w005()
    assert message.msg == ("Every {% parallel %} block renders inline: the fastrouter runs on Linux only (it uses "
                           "epoll and prctl), and this is Darwin.")
    assert "SILENCED_SYSTEM_CHECKS" in message.hint


def test_check_is_silent_where_no_router_is_wanted(w005, monkeypatch, settings):
    monkeypatch.setattr(sys, "platform", "darwin")
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ENABLED": False}
    assert w005() == []
    settings.PARALLEL_RENDER = {**settings.PARALLEL_RENDER, "ENABLED": True, "ROUTER": "unix:///tmp/elsewhere.sock"}
    assert w005() == []
