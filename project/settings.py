"""Demo project settings.

With no environment, everything is embedded: SQLite in ``var/`` and kombu's filesystem transport as
the broker, so ``make demo`` needs no servers. ``DATABASE_URL`` (PostgreSQL) and
``CELERY_BROKER_URL`` (RabbitMQ or Redis) switch to real servers, as ``make test`` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import dj_database_url
import django
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DEMO_VAR_DIR", BASE_DIR / "var"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
# Off unless asked: with DEBUG on, Django keeps every SQL statement in memory (a worker slows down).
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "supervisor_app",
    "project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "project.wsgi.application"

# ---------------------------------------------------------------- database driver and pooling
# The ways projects connect to PostgreSQL, chosen from the environment so that the tests can start
# workers, supervisors and a dispatching process with each (tests/integration/test_drivers.py, the
# README's "Where it runs"). Unset, the demo uses psycopg 3 with client-side binding and persistent
# connections (10 minutes).
#   DEMO_PG_DRIVER=psycopg2                 psycopg2 instead of psycopg 3
#   DEMO_PG_SERVER_SIDE_BINDING=1           OPTIONS["server_side_binding"] (psycopg 3: extended protocol)
#   DEMO_PG_PREPARE_THRESHOLD=<n>           OPTIONS["prepare_threshold"] (psycopg 3 prepares a statement from
#                                           its n-th execution on; Django's default: never, for poolers)
#   DEMO_PG_POOL=1                          OPTIONS["pool"] (psycopg 3 + psycopg-pool; needs CONN_MAX_AGE 0)
#   DEMO_CONN_MAX_AGE=0|<seconds>|none      CONN_MAX_AGE (none: never closed)
#   DEMO_PG_DISABLE_SERVER_SIDE_CURSORS=1   DISABLE_SERVER_SIDE_CURSORS (PgBouncer in transaction mode)
#   DEMO_ATOMIC_REQUESTS=1                  ATOMIC_REQUESTS (each request one transaction)
_PG_DRIVER = os.environ.get("DEMO_PG_DRIVER", "psycopg")
if _PG_DRIVER not in ("psycopg", "psycopg2"):
    raise ImproperlyConfigured(f"DEMO_PG_DRIVER must be psycopg or psycopg2, got {_PG_DRIVER!r}")
if _PG_DRIVER == "psycopg2" and os.environ.get("DATABASE_URL"):
    # Django's PostgreSQL backend uses psycopg 3 whenever `import psycopg` succeeds, psycopg2 only
    # when it fails. A None in sys.modules makes that import raise ImportError, so this process runs
    # on psycopg2 exactly as a project with only psycopg2 installed does. Settings are read before
    # Django first imports the backend (at the first connection), so this is early enough.
    sys.modules["psycopg"] = None  # type: ignore[assignment]


def _configure_postgresql(db: dict[str, Any]) -> dict[str, Any]:
    db["CONN_HEALTH_CHECKS"] = True
    max_age = os.environ.get("DEMO_CONN_MAX_AGE", "600")
    db["CONN_MAX_AGE"] = None if max_age.lower() == "none" else int(max_age)
    options = db.setdefault("OPTIONS", {})
    if os.environ.get("DEMO_PG_SERVER_SIDE_BINDING") == "1":
        options["server_side_binding"] = True
    if os.environ.get("DEMO_PG_PREPARE_THRESHOLD"):
        options["prepare_threshold"] = int(os.environ["DEMO_PG_PREPARE_THRESHOLD"])
    if os.environ.get("DEMO_PG_POOL") == "1":
        options["pool"] = True
    if os.environ.get("DEMO_PG_DISABLE_SERVER_SIDE_CURSORS") == "1":
        db["DISABLE_SERVER_SIDE_CURSORS"] = True
    db["ATOMIC_REQUESTS"] = os.environ.get("DEMO_ATOMIC_REQUESTS") == "1"
    return db


if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": _configure_postgresql(dict(dj_database_url.parse(os.environ["DATABASE_URL"])))}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "demo.sqlite3"),
            # Several processes (workers, supervisor) share the file: WAL and a generous busy timeout.
            "OPTIONS": {
                "timeout": 30,
                # Django 5.1+ only (Django 4.2 has neither option; the busy timeout still applies there).
                **(
                    {
                        "transaction_mode": "IMMEDIATE",
                        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                    }
                    if django.VERSION >= (5, 1)
                    else {}
                ),
            },
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"


# ---------------------------------------------------------------- Celery
def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else default


if os.environ.get("CELERY_BROKER_URL"):
    CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
else:
    # kombu's filesystem transport: a local, server-less broker shared by the demo's processes.
    _broker = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker / "queue"),
        "data_folder_out": str(_broker / "queue"),
        "processed_folder": str(_broker / "processed"),
        "control_folder": str(_broker / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
# RabbitMQ's quorum queues (replicated, the type RabbitMQ recommends for durability): "quorum".
# Celery then turns off global QoS by itself; quorum queues have no message priorities.
CELERY_TASK_DEFAULT_QUEUE_TYPE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE_TYPE", "classic")
# Many projects acknowledge after the body (acks_late); supervised tasks need neither, and work with
# both (a redelivered message is fenced at its claim). The tests run a worker each way.
CELERY_TASK_ACKS_LATE = os.environ.get("CELERY_TASK_ACKS_LATE", "0") == "1"
# One message at a time per pool process: a hung worker then holds as few messages as possible.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# AMQP heartbeat (seconds). A hung worker (SIGSTOP, deadlock, a VM paused) stops answering it, so
# RabbitMQ closes its connection after about this long: its consumer goes away with its prefetched
# messages, which are requeued. Keep it below the lease timeout, so that the attempt the supervisor
# publishes after the lease expires can't be handed to the hung worker (system check W002).
CELERY_BROKER_HEARTBEAT = _env_float("CELERY_BROKER_HEARTBEAT", 6.0)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Keep the worker's database connection between tasks (Celery's Django fixup closes it otherwise).
CELERY_DB_REUSE_MAX = 1000
# Beat records every slot of a supervised schedule before publishing it (several beats may run).
CELERY_BEAT_SCHEDULER = "supervisor_app.schedulers:SupervisedScheduler"
# bench/run.py only (never set by the tests): BENCH_RESULTS=1 makes this process the bench's peer that keeps
# task state the usual way, django-celery-results (installed by bench/requirements.txt) with the state
# STARTED written too. The bench migrates its tables into the bench database alone.
if os.environ.get("BENCH_RESULTS") == "1":
    INSTALLED_APPS.append("django_celery_results")
    CELERY_RESULT_BACKEND = "django-db"
    CELERY_TASK_TRACK_STARTED = True
# A result backend for this process (the workflow tests' chords use Redis: ``redis://…``). Unset: none.
if os.environ.get("CELERY_RESULT_BACKEND"):
    CELERY_RESULT_BACKEND = os.environ["CELERY_RESULT_BACKEND"]


# ---------------------------------------------------------------- supervisor_app
SUPERVISOR_HEARTBEAT_INTERVAL = _env_float("SUPERVISOR_HEARTBEAT_INTERVAL", 5.0)
SUPERVISOR_LEASE_TIMEOUT = _env_float("SUPERVISOR_LEASE_TIMEOUT", 20.0)
SUPERVISOR_SWEEP_INTERVAL = _env_float("SUPERVISOR_SWEEP_INTERVAL", 5.0)
SUPERVISOR_MAX_ATTEMPTS = int(os.environ.get("SUPERVISOR_MAX_ATTEMPTS", "3"))
SUPERVISOR_BACKOFF = _env_float("SUPERVISOR_BACKOFF", 2.0)
SUPERVISOR_START_TIMEOUT = _env_float("SUPERVISOR_START_TIMEOUT", None)
SUPERVISOR_MAX_PUBLISHES = int(os.environ.get("SUPERVISOR_MAX_PUBLISHES", "20"))
SUPERVISOR_SWEEP_BATCH_SIZE = int(os.environ.get("SUPERVISOR_SWEEP_BATCH_SIZE", "500"))
SUPERVISOR_FINISH_DELAY = _env_float("SUPERVISOR_FINISH_DELAY", 0.05)
# Unset: the app's default (completions deferred and batched). bench/run.py sets it for its strict case.
if os.environ.get("SUPERVISOR_STRICT_FINISH"):
    SUPERVISOR_STRICT_FINISH = os.environ["SUPERVISOR_STRICT_FINISH"].lower() in ("1", "true")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"supervisor_app": {"handlers": ["console"], "level": os.environ.get("SUPERVISOR_LOG_LEVEL", "INFO")}},
}
