"""Compatibility matrix: the SQLite-portable tests against each supported Django and Celery.

    pip install nox
    nox                          # every session (about a minute of installs each, the first time)
    nox -s "tests(django='4.2', celery='5.3')"
    nox -p 3.12                  # another Python, where installed (declared: 3.10+)

Declared support: Python 3.10+, Django 4.2 and 5.2, Celery 5.3+. Each session installs the newest
patch release of its Django and Celery series plus the test tools, then runs what ``make
test-sqlite`` runs (no PostgreSQL, no broker: tests marked ``postgres`` or ``integration`` are
deselected). The full suite on PostgreSQL + RabbitMQ stays ``make test``, on the pinned versions of
``requirements.txt``; this matrix is deliberately not part of it (it takes minutes of installs).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
#: Pythons to run on: the current interpreter by default; NOX_PYTHONS="3.10,3.12" for more.
PYTHONS = [p for p in os.environ.get("NOX_PYTHONS", "").split(",") if p] or None

DJANGO = {"4.2": "Django>=4.2,<5.0", "5.2": "Django>=5.2,<6.0"}
CELERY = {"5.3": ["celery>=5.3,<5.4", "kombu>=5.3,<5.4"], "5.7": ["celery>=5.7,<5.8", "kombu>=5.7,<5.8"]}
COMMON = [
    "django-celery-beat>=2.5",
    "dj-database-url",
    "psycopg[binary]",  # tests/integration/test_dropin.py imports it (the test itself needs PostgreSQL: deselected)
    "prometheus-client",
    "pytest",
    "pytest-django",
    "import-linter",  # tests/unit/test_layers.py: the layers contract and the import graph (grimp)
]


@nox.session(python=PYTHONS)
@nox.parametrize("celery", list(CELERY))
@nox.parametrize("django", list(DJANGO))
def tests(session: nox.Session, django: str, celery: str) -> None:
    session.install(DJANGO[django], *CELERY[celery], *COMMON)
    session.run(
        "python", "-c", "import django, celery; print('Django', django.__version__, 'Celery', celery.__version__)"
    )
    var = Path(session.create_tmp()) / "var"
    env = {
        "DEMO_VAR_DIR": str(var),
        # The portable part runs on SQLite and kombu's filesystem broker, like `make test-sqlite`.
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
    }
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "not postgres and not integration",
        "-p",
        "no:cacheprovider",
        "-q",
        *session.posargs,
        env=env,
    )
