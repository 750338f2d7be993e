"""``migrate`` on a brand-new PostgreSQL database, with each driver, as a new user's first command.

Found by trying it: ``migrate`` runs database system checks before it migrates, and the schedule
arguments check (W010) queried django-celery-beat's table before it existed; psycopg2 then raised its
own error from the failed server-side cursor, and ``migrate`` crashed on every new database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.db import connection

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_migrate_and_check_pass_on_a_new_database(driver: str) -> None:
    params = connection.settings_dict
    name = f"sa_fresh_{uuid.uuid4().hex[:8]}"
    admin = dict(
        host=params["HOST"] or "127.0.0.1", port=params["PORT"] or 5432, user=params["USER"], dbname="postgres"
    )
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = os.environ["DATABASE_URL"].rpartition("/")[0]
        env = {**os.environ, "DATABASE_URL": f"{base}/{name}", "DEMO_PG_DRIVER": driver}
        for command in (["migrate", "-v0"], ["check", "--database", "default", "--fail-level", "ERROR"]):
            done = subprocess.run(
                [sys.executable, "manage.py", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr[-2000:]
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
