"""Several supervisors at once: every lost attempt is re-enqueued exactly once (PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models import F

from project.processes import wait_until
from supervisor_app import runs
from supervisor_app.models import RunAttempt, SupervisedRun
from supervisor_app.supervisor import SweepReport, run_sweep
from tests.conftest import Live

pytestmark = pytest.mark.postgres

N_RUNS = 300


def make_lost_runs(n: int) -> list[int]:
    policy = runs.RunPolicy(max_attempts=3, lease_timeout=60, start_timeout=60, max_runtime=None)
    ids = []
    for _ in range(n):
        run = runs.create_run("project.tasks.noop", [], {}, policy, countdown=3600)
        assert run is not None
        SupervisedRun.objects.filter(pk=run.pk).update(status="queued")
        assert runs.claim(run.pk, 1, "ghost@dead-host") is not None
        ids.append(run.pk)
    SupervisedRun.objects.filter(pk__in=ids).update(lease_expires_at=F("lease_expires_at") - timedelta(hours=1))
    return ids


@pytest.mark.django_db(transaction=True)
def test_racing_sweeps_in_threads_reenqueue_each_lost_attempt_once(sent: list[Any], settings: Any) -> None:
    settings.SUPERVISOR_SWEEP_BATCH_SIZE = 20  # many small batches: the sweeps interleave
    ids = make_lost_runs(N_RUNS)
    barrier = threading.Barrier(3)
    reports: list[SweepReport] = []
    errors: list[BaseException] = []

    def sweeper(name: str) -> None:
        try:
            barrier.wait()
            reports.append(run_sweep(name))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sweeper, args=(f"sup-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(r.recovered for r in reports) == N_RUNS
    assert sum(1 for r in reports if r.recovered) >= 2, "SKIP LOCKED should let the sweeps share the work"
    assert sorted(run_id for run_id, attempt, _ in sent) == sorted(ids)  # one publish per lost attempt
    assert {attempt for _, attempt, _ in sent} == {2}
    assert SupervisedRun.objects.filter(pk__in=ids, status="queued", attempt=2).count() == N_RUNS
    assert RunAttempt.objects.filter(run_id__in=ids, number=2).count() == N_RUNS
    assert RunAttempt.objects.filter(run_id__in=ids, number=1, outcome="lost").count() == N_RUNS


@pytest.mark.integration
def test_two_supervisor_processes_publish_each_lost_attempt_once(live: Live) -> None:
    from celery import current_app

    ids = make_lost_runs(200)
    live.supervisor("sup-a", wait=False, SUPERVISOR_SWEEP_BATCH_SIZE="10")
    live.supervisor("sup-b", wait=False, SUPERVISOR_SWEEP_BATCH_SIZE="10")
    wait_until(
        lambda: SupervisedRun.objects.filter(pk__in=ids, attempt=2, status="queued").count() == len(ids),
        60,
        what="all lost attempts re-enqueued",
    )
    assert RunAttempt.objects.filter(run_id__in=ids, number=2).count() == len(ids)

    def queued_messages() -> int:
        with current_app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(live.queue, passive=True).message_count)

    # No worker consumes the queue: it holds exactly one message per re-enqueued attempt. (The
    # republish of unstarted attempts waits for the start timeout, 60 s here, so none sneaks in.)
    wait_until(lambda: queued_messages() >= len(ids), 10, what="messages to reach the queue")
    assert queued_messages() == len(ids)
    logs = live.procs[0].output() + live.procs[1].output()
    assert "Traceback" not in logs
