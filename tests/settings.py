"""Settings for the test suite. Workers started by the tests use them too."""

import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "Europe/Paris"
USE_I18N = True
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("fr", "French"), ("de", "German")]

INSTALLED_APPS = [
    "parallel_render",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "parallel_render.middleware.ParallelRenderMiddleware",
]
ROOT_URLCONF = "tests.testapp.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The second directory holds templates the property-based tests write at run time.
        "DIRS": [BASE_DIR / "templates", Path(tempfile.gettempdir()) / "parallel_render_generated_templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.debug",
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tests.testapp.context_processors.site_info",
            ],
        },
    }
]
# Workers are separate processes, so the test database must be a file they can open:
# the fixtures export its path in PR_TEST_DB once pytest-django has created it.
_db = os.environ.get("PR_TEST_DB") or os.path.join(tempfile.gettempdir(), f"parallel_render_tests_{os.getpid()}.sqlite3")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _db,
        "TEST": {"NAME": _db},
        "OPTIONS": {"timeout": 20},
    }
}
# PR_TEST_CACHE names a real memcached (memcached://host:port) or Redis (redis://...) server.
_cache = os.environ.get("PR_TEST_CACHE", "")
if _cache.startswith("memcached://"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                          "LOCATION": _cache[len("memcached://"):]}}
elif _cache.startswith("redis://"):
    CACHES = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": _cache}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
# MIN_BLOCK_MS 0: every block goes to a worker, however cheap, so the tests exercise them.
PARALLEL_RENDER = {
    "TIMEOUT": 5.0,
    "WORKERS": 2,
    "MIN_BLOCK_MS": 0,
    # Every sendable block goes to a worker, so tests can check where blocks render;
    # tests/test_dispatch.py covers the adaptive policy production runs.
    "ADAPTIVE": False,
    "SERVER_TIMING": True,
    "WORKER_CONTEXT_PROCESSORS": ["tests.testapp.context_processors.site_info"],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"parallel_render": {"handlers": ["console"], "level": "WARNING"}},
}

# PR_TEST_METRICS_PORT: a node started by tests/test_metrics.py counts its blocks for Prometheus
# and serves them on this port.
if os.environ.get("PR_TEST_METRICS_PORT"):
    INSTALLED_APPS.append("parallel_render.metrics")
    PARALLEL_RENDER["METRICS_PORT"] = int(os.environ["PR_TEST_METRICS_PORT"])

# PR_TEST_OTEL_SPANS: workers started by tests/test_tracing.py trace their blocks and append
# their spans to this file, one JSON line each (tests/otel_export.py).
if os.environ.get("PR_TEST_OTEL_SPANS"):
    PARALLEL_RENDER["OTEL"] = True
    PARALLEL_RENDER["OTEL_WORKER_SETUP"] = "tests.otel_export.setup"
