"""Settings of the parallel_render demo site: a Quora-like question page.

Environment variables:

- ``DEMO_DEBUG``      ``1``/``0`` (default ``1``)
- ``DEMO_DB_PATH``    path of the SQLite database (default ``<repo>/demo.sqlite3``)
- ``DEMO_WORKERS``    workers ``runserver`` starts (default 8)
- ``DEMO_ADAPTIVE``   ``0`` sends every block and waits for the workers, to compare with the
  default load-aware dispatch (``PARALLEL_RENDER['ADAPTIVE']``)
- ``DEMO_MEMCACHED``  ``host:port[,host:port...]``: use memcached (pymemcache) as the cache
- ``DEMO_REDIS``      ``redis://host:port/db``: use Redis (django-redis) as the cache
- ``DEMO_SECRET_KEY`` the secret key (a fixed, insecure default is used otherwise)
- ``DEMO_TOOLBAR``    ``0`` leaves django-debug-toolbar out; by default it is installed when
  ``DEBUG`` is on and the package is (the ``[toolbar]`` extra), and shown on pages opened
  with ``?toolbar=1``, with parallel_render's panel

When both ``DEMO_MEMCACHED`` and ``DEMO_REDIS`` are set, memcached is the ``default`` cache
and Redis is available as the ``redis`` alias.
"""

import os
from pathlib import Path


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in {"", "0", "false", "no", "off"}


BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get(
    "DEMO_SECRET_KEY",
    "django-insecure-parallel-render-demo-only-never-use-this-key-in-production",
)

DEBUG = _env_flag("DEMO_DEBUG", True)

ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    # Before staticfiles: parallel_render's runserver wraps the next one in this list.
    "parallel_render",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "demo_site.qa",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "parallel_render.middleware.ParallelRenderMiddleware",
]



def _has_toolbar() -> bool:
    if not (DEBUG and _env_flag("DEMO_TOOLBAR", True)):
        return False
    try:
        import debug_toolbar  # noqa: F401
    except ImportError:
        return False
    return True


# django-debug-toolbar with parallel_render's panel, on pages opened with ?toolbar=1: its
# own instrumentation slows the master, so the demo's numbers are read without it.
TOOLBAR = _has_toolbar()
if TOOLBAR:
    from debug_toolbar.settings import PANELS_DEFAULTS

    INSTALLED_APPS.append("debug_toolbar")
    # Outside ours, so the toolbar sees the page once its blocks are stitched in.
    MIDDLEWARE.insert(0, "debug_toolbar.middleware.DebugToolbarMiddleware")
    DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "parallel_render.debug_toolbar.ParallelRenderPanel"]
    DEBUG_TOOLBAR_CONFIG = {"SHOW_TOOLBAR_CALLBACK": "demo_site.qa.views.show_toolbar"}

ROOT_URLCONF = "demo_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.debug",
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "demo_site.wsgi.application"
ASGI_APPLICATION = "demo_site.asgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DEMO_DB_PATH") or BASE_DIR / "demo.sqlite3",
        # Masters and workers read the same file at once; wait for locks instead of failing.
        "OPTIONS": {"timeout": 20},
    }
}


def _caches() -> dict:
    caches: dict = {}
    memcached = os.environ.get("DEMO_MEMCACHED", "").strip()
    redis_url = os.environ.get("DEMO_REDIS", "").strip()
    if memcached:
        locations = [loc.strip() for loc in memcached.split(",") if loc.strip()]
        caches["default"] = {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": locations if len(locations) > 1 else locations[0],
            "KEY_PREFIX": "demo",
        }
    if redis_url:
        caches["redis" if caches else "default"] = {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": redis_url,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
            "KEY_PREFIX": "demo",
        }
    if not caches:
        caches["default"] = {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "parallel-render-demo",
        }
    return caches


CACHES = _caches()

PARALLEL_RENDER = {
    "WORKERS": int(os.environ.get("DEMO_WORKERS", "8")),
    "ADAPTIVE": _env_flag("DEMO_ADAPTIVE", True),
    "TIMEOUT": 5.0,
    # ``?serial=1`` renders the page serially, for side-by-side comparisons.
    "SERIAL_QUERY_PARAM": "serial",
    # The page's timing table reads the per-block Server-Timing header, even with DEBUG off.
    "SERVER_TIMING": True,
}

AUTH_PASSWORD_VALIDATORS: list = []

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "simple": {
            "format": "{asctime} {levelname} [{name}] pid={process} {message}",
            "style": "{",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "simple"},
    },
    "loggers": {
        "parallel_render": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "demo_site": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
