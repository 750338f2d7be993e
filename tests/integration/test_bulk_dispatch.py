"""Messages of the fast publish path, executed by a real ``celery worker`` (RabbitMQ, PostgreSQL):
a ``dispatch_many`` batch, and the new attempts a sweep republishes for lost ones. The worker accepts
them exactly as it accepts ``send_task``'s: each run claimed by its attempt, executed once, succeeded."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import Count
from django.utils import timezone

from project.models import Execution
from project.processes import wait_until
from project.tasks import slow_job
from supervisor_app.core.states import RunStatus
from supervisor_app.models import RunAttempt, SupervisedRun
from supervisor_app.supervisor import run_sweep
from tests.conftest import Live

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def executions(run_ids: list[int]) -> dict[int, list[int]]:
    rows = Execution.objects.filter(run_id__in=run_ids).values("run_id", "attempt").annotate(n=Count("id"))
    out: dict[int, list[int]] = {}
    for row in rows:
        out.setdefault(row["run_id"], []).extend([row["attempt"]] * row["n"])
    return out


def all_succeeded(run_ids: list[int]) -> bool:
    return SupervisedRun.objects.filter(pk__in=run_ids, status=RunStatus.SUCCEEDED).count() == len(run_ids)


def test_a_dispatch_many_batch_is_executed_once_each_by_a_real_worker(live: Live) -> None:
    handles = slow_job.dispatch_many(
        [((), {"steps": 1, "step_seconds": 0.0, "label": f"bulk-{i}"}) for i in range(30)], headers={"tenant": "acme"}
    )
    run_ids = [h.run_id for h in handles]
    live.worker("bulk", concurrency=2)
    wait_until(lambda: all_succeeded(run_ids), 60, what="the batch to succeed")
    assert executions(run_ids) == {run_id: [1] for run_id in run_ids}
    labels = dict(Execution.objects.filter(run_id__in=run_ids).values_list("run_id", "label"))
    assert [labels[pk] for pk in run_ids] == [f"bulk-{i}" for i in range(30)]


def test_attempts_a_sweep_republishes_for_lost_ones_are_executed_by_a_real_worker(live: Live) -> None:
    # Recorded, never published (countdown), then made to look like attempts whose worker died.
    handles = slow_job.dispatch_many(
        [((), {"steps": 1, "step_seconds": 0.0, "label": f"lost-{i}"}) for i in range(20)], countdown=3600
    )
    run_ids = [h.run_id for h in handles]
    SupervisedRun.objects.filter(pk__in=run_ids).update(
        status=RunStatus.RUNNING,
        worker="ghost@nowhere",
        started_at=timezone.now() - timedelta(minutes=2),
        lease_expires_at=timezone.now() - timedelta(minutes=1),
        next_check_at=None,
    )
    report = run_sweep("test-bulk-republish")
    assert report.recovered == 20 and report.published == 20
    live.worker("rescuer", concurrency=2)
    wait_until(lambda: all_succeeded(run_ids), 60, what="the recovered runs to succeed")
    assert executions(run_ids) == {run_id: [2] for run_id in run_ids}
    second = RunAttempt.objects.filter(run_id__in=run_ids, number=2)
    assert second.count() == 20 and set(second.values_list("outcome", flat=True)) == {"succeeded"}
    assert all(w.startswith("rescuer@") for w in second.values_list("worker", flat=True))
