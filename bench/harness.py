"""Set-up shared by the standalone bench scripts (``bulk_dispatch.py``, ``claim_cost.py``): a database of
their own on the loopback PostgreSQL, dropped and created anew, the project's settings pointed at it
and at a queue of their own, then migrated."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG = "postgres://postgres@127.0.0.1:5432"


def configure(default_db: str, default_queue: str) -> tuple[str, str]:
    """Point the project at BENCH_DB / BENCH_QUEUE (or the script's defaults) before Django starts;
    returns (database, queue). BENCH_BROKER_URL overrides the loopback RabbitMQ."""
    sys.path.insert(0, str(ROOT))
    db = os.environ.get("BENCH_DB", default_db)
    queue = os.environ.get("BENCH_QUEUE", default_queue)
    os.environ.update(
        DATABASE_URL=f"{PG}/{db}",
        CELERY_BROKER_URL=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
        CELERY_TASK_DEFAULT_QUEUE=queue,
        DJANGO_SETTINGS_MODULE="project.settings",
        SUPERVISOR_LOG_LEVEL="WARNING",
    )
    return db, queue


def fresh_database(name: str) -> None:
    """Drop and create database ``name`` (connections to it are ended)."""
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def start_django(db: str) -> None:
    """A fresh database ``db``, Django set up on it, migrated."""
    fresh_database(db)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def queue_depth(name: str, purge: bool = False) -> int:
    """Messages ready in queue ``name`` of the app's broker (declared if missing); emptied after the
    count when ``purge``."""
    from celery import current_app

    with current_app.connection_for_write() as conn:
        bound = current_app.amqp.queues[name](conn.default_channel)
        bound.declare()
        depth = int(bound.queue_declare(passive=True).message_count)
        if purge:
            bound.purge()
    return depth
