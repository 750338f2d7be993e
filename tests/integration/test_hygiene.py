"""Resource hygiene of a long-lived supervisor (issue 12 item 7), against the real broker and database.

A supervisor sweeps for months. A producer kept out of kombu's pool on some path blocks the process
for ever once the pool (ten producers by default) is empty; a database connection opened per sweep
and never closed exhausts ``max_connections``. 1,000 sweeps, each republishing a run (through the
real broker), must leave the producer pool, the broker connection pool and this process's database
sessions where they were. ``make test`` runs 120 (a leak of one producer per sweep shows after 11);
``make chaos`` the full 1,000 (``HYGIENE_SWEEPS``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.db import connection
from django.db.models import F

from project.tasks import noop
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.supervisor import run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SWEEPS = int(os.environ.get("HYGIENE_SWEEPS", "120"))


def in_use(pool: Any) -> int:
    """Resources a kombu pool has handed out and not had back."""
    return len(getattr(pool, "_dirty", ()))


def sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_sweeps_that_publish_leave_pools_and_connections_flat(settings: Any) -> None:
    settings.SUPERVISOR_START_TIMEOUT = 60
    settings.SUPERVISOR_MAX_PUBLISHES = SWEEPS * 2  # the run must stay republishable throughout
    queue = current_app.conf.task_default_queue
    run_id = noop.delay().run_id
    run_sweep("hygiene")  # warm up: pools created, connection open
    producers, connections_, db_sessions = in_use(current_app.producer_pool), in_use(current_app.pool), sessions()
    published = 0
    for _ in range(SWEEPS):
        # The published attempt "waited" past its start timeout: the sweep publishes it again.
        SupervisedRun.objects.filter(pk=run_id).update(
            next_check_at=F("next_check_at") - timedelta(hours=1), publish_count=1
        )
        report = run_sweep("hygiene")
        published += report.republished
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == RunStatus.QUEUED
    assert published == SWEEPS, f"only {published} of {SWEEPS} sweeps published"
    assert in_use(current_app.producer_pool) == producers
    assert in_use(current_app.pool) == connections_
    assert sessions() <= db_sessions
    with current_app.connection_for_write() as conn:
        _name, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
        assert count >= SWEEPS  # they really went to the broker
        conn.default_channel.queue_purge(queue)
