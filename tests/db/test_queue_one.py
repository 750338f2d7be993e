"""``queue_one`` without races or leaks, and retention that never deletes a reopened run (issue 13).
PostgreSQL in `make test`, SQLite too; publishes captured by ``sent`` (producers still come from the
real pool, which is what the leak test counts)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery import current_app
from django.db import IntegrityError, transaction
from django.db.models import F

from project.tasks import noop
from supervisor_app import runs
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.scheduling import firing
from supervisor_app.scheduling import sweep as sched_sweep
from supervisor_app.supervisor import run_sweep
from tests.db.test_scheduler import at, define, make_schedule, slot_runs

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def fire(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Callable[..., firing.RecordCounts]:
    """A beat firing at ``now`` for the slots after ``since`` (publishes captured after commit)."""

    def _fire(pt: Any, since: Any, now: Any) -> firing.RecordCounts:
        with django_capture_on_commit_callbacks(execute=True):
            return firing.fire(define(pt), since, now)

    return _fire


def held_run(fire: Callable[..., Any], **policy: Any) -> tuple[Any, SupervisedRun]:
    pt = make_schedule(overlap="queue_one", **policy)
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    held = SupervisedRun.objects.get(periodic_task=pt, status=RunStatus.QUEUED, next_check_at__isnull=True)
    return pt, held


def test_a_held_run_of_a_deleted_schedule_is_cancelled_with_the_reason(fire: Any, sent: list[Any]) -> None:
    pt, held = held_run(fire)
    pt.delete()
    published = len(sent)
    assert sched_sweep.cancel_orphaned_held() == 1
    held.refresh_from_db()
    assert held.status == RunStatus.CANCELLED and held.finished_at is not None
    assert held.last_error == "queue_one: its schedule was deleted while it was held"
    assert len(sent) == published  # never published


def test_a_held_run_of_a_disabled_schedule_is_cancelled_not_released(
    fire: Any, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt, held = held_run(fire)
    first = SupervisedRun.objects.get(periodic_task=pt, scheduled_for=at(1))
    runs.claim(first.pk, 1, "w")
    runs.finish_success(first.pk, 1)
    type(pt).objects.filter(pk=pt.pk).update(enabled=False)
    published = len(sent)
    with django_capture_on_commit_callbacks(execute=True):
        run_sweep("t")
    held.refresh_from_db()
    assert (held.status, held.last_error) == (
        RunStatus.CANCELLED,
        "queue_one: its schedule was disabled while it was held",
    )
    assert len(sent) == published


def test_the_database_allows_one_held_run_per_schedule(fire: Any) -> None:
    pt, held = held_run(fire)
    second = SupervisedRun(
        task_name=held.task_name,
        periodic_task=pt,
        scheduled_for=at(5),
        status=RunStatus.QUEUED,
        next_check_at=None,
        lease_timeout=held.lease_timeout,
        start_timeout=held.start_timeout,
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        second.save()


def test_a_slot_recorded_while_another_actor_holds_a_run_is_skipped(fire: Any, monkeypatch: Any) -> None:
    """Two actors at once both read "nothing held" and both try to hold: the second one's slot is skipped."""
    pt, _ = held_run(fire)
    # This actor does not see the held run (it read before the other committed).
    monkeypatch.setattr(firing, "_is_held", lambda status, next_check_at: False)
    fire(pt, at(2), at(3))
    assert slot_runs(pt) == [(1, "queued"), (2, "queued"), (3, "skipped")]
    assert SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.QUEUED, next_check_at=None).count() == 1


def test_every_publish_path_returns_its_producer_to_the_pool(
    fire: Any, sent: list[Any], fast_settings: Any, expire: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A release used to keep a producer out of the pool: after ten (the pool's limit) the
    supervisor blocked for ever on its next publish."""
    pool = current_app.producer_pool
    in_use = len(pool._dirty)
    for _ in range(pool.limit + 2):  # held runs released one by one, each through the sweep
        pt, held = held_run(fire)
        SupervisedRun.objects.filter(periodic_task=pt).exclude(pk=held.pk).update(status=RunStatus.SUCCEEDED)
        with django_capture_on_commit_callbacks(execute=True):
            run_sweep("t")
        assert SupervisedRun.objects.get(pk=held.pk).next_check_at is not None  # released
    with django_capture_on_commit_callbacks(execute=True):
        run_id = int(noop.delay().run_id)  # dispatch
    expire(run_id, "next_check_at", 3600)
    assert len(pool._dirty) == in_use, "released held runs"
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").republished == 1  # the sweep's own publisher
    assert len(pool._dirty) == in_use, "sweep"
    runs.request_cancel(run_id)
    with django_capture_on_commit_callbacks(execute=True):
        assert runs.retry_now(run_id)  # an operator's retry
    assert len(pool._dirty) == in_use, "retry now"
    assert runs.publish_by_id(run_id)
    assert len(pool._dirty) == in_use, "publish by id"


def test_retention_never_deletes_a_run_reopened_between_selection_and_deletion(
    sent: list[Any], monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from supervisor_app.runs import retention

    with django_capture_on_commit_callbacks(execute=True):
        ids = [int(noop.delay().run_id) for _ in range(3)]
    for run_id in ids:
        runs.request_cancel(run_id)
    SupervisedRun.objects.filter(pk__in=ids).update(finished_at=F("finished_at") - timedelta(days=30))
    reopened = ids[1]
    retried: list[bool] = []

    def atomic(*args: Any, **kwargs: Any) -> Any:
        # Between the selection and the delete, an operator retries one of the selected runs.
        if not retried:
            retried.append(runs.retry_now(reopened))
        return transaction.atomic(*args, **kwargs)

    monkeypatch.setattr(retention, "transaction", SimpleNamespace(atomic=atomic))
    assert retention.prune_runs(timedelta(days=1), keep_last=0) == 2
    run = SupervisedRun.objects.get(pk=reopened)
    assert retried == [True]
    assert run.status == RunStatus.QUEUED and run.attempts.filter(number=2).exists()
    assert not SupervisedRun.objects.filter(pk__in=[ids[0], ids[2]]).exists()
