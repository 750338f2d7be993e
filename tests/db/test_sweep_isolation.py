"""A sweep that can't be poisoned (issue 13): one row or schedule that raises is isolated in its own
savepoint, reported with its id and phase (liveness row, ``health/``), and the rest of the sweep goes
on; liveness is recorded every sweep. PostgreSQL in `make test`, SQLite too; publishes captured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from project.tasks import noop
from supervisor_app.core.states import RunStatus
from supervisor_app.models import ProcessHeartbeat, SupervisedRun
from supervisor_app.ops.health import check_health
from supervisor_app.runs import recovery
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def dispatched(sent: list[Any], django_capture_on_commit_callbacks: Any, fast_settings: Any) -> Callable[[], int]:
    def _dispatch() -> int:
        with django_capture_on_commit_callbacks(execute=True):
            return int(noop.delay().run_id)

    return _dispatch


def poison(monkeypatch: pytest.MonkeyPatch, name: str, bad_id: int, batch: bool = False) -> None:
    """Make ``recovery.<name>`` raise whenever it is handed run ``bad_id``."""
    real = getattr(recovery, name)

    def poisoned(first: Any, *args: Any, **kwargs: Any) -> Any:
        ids = [r.pk for r in first] if batch else [first.pk]
        if bad_id in ids:
            raise OverflowError(f"poisoned run {bad_id}")
        return real(first, *args, **kwargs)

    monkeypatch.setattr(recovery, name, poisoned)


def test_a_poisoned_unstarted_run_is_skipped_and_reported_the_others_republished(
    dispatched: Callable[[], int],
    sent: list[Any],
    expire: Any,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    ids = [dispatched() for _ in range(3)]
    for run_id in ids:
        expire(run_id, "next_check_at", 60)
    bad = ids[1]
    poison(monkeypatch, "republish", bad)
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("sup-poisoned")
    assert report.republished == 2
    assert sorted(run_id for run_id, _, _ in sent) == sorted([ids[0], ids[2]])  # nothing of the bad one
    assert report.errors.count == 1
    assert report.errors.recent == [
        {"phase": "unstarted", "key": f"run {bad}", "error": f"OverflowError: poisoned run {bad}"}
    ]
    # The others were handled and committed; the bad one is untouched, due again next sweep.
    publishes = dict(SupervisedRun.objects.filter(pk__in=ids).values_list("pk", "publish_count"))
    assert publishes == {ids[0]: 2, bad: 1, ids[2]: 2}
    # Liveness recorded, with the failure for the admin (stats) and health/.
    row = ProcessHeartbeat.objects.get(kind="supervisor", name="sup-poisoned")
    assert row.stats["errors"]["count"] == 1 and row.stats["errors"]["recent"][0]["key"] == f"run {bad}"
    health = check_health()
    assert health.sweep_errors == 1 and not health.ok
    assert any(f"run {bad}" in p and "unstarted" in p for p in health.problems)


def test_a_poisoned_lost_run_does_not_keep_its_batch_from_being_recovered(
    dispatched: Callable[[], int], expire: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor_app import runs

    ids = [dispatched() for _ in range(3)]
    for run_id in ids:
        assert runs.claim(run_id, 1, "w@dead") is not None
        expire(run_id)
    bad = ids[0]
    poison(monkeypatch, "recover_lost_batch", bad, batch=True)
    report = run_sweep("sup-lost")
    assert report.recovered == 2 and report.errors.count == 1
    statuses = dict(SupervisedRun.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert statuses == {bad: RunStatus.RUNNING, ids[1]: RunStatus.QUEUED, ids[2]: RunStatus.QUEUED}
    # The bad row fails again next sweep (it is still due), and is reported again; nothing else to do.
    again = run_sweep("sup-lost")
    assert (again.recovered, again.errors.count) == (0, 1)


def test_a_phase_that_fails_as_a_whole_is_reported_and_the_next_phases_run(
    dispatched: Callable[[], int], expire: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor_app import supervisor

    run_id = dispatched()
    expire(run_id, "next_check_at", 60)

    def broken(report: Any, deadline: float) -> None:
        raise RuntimeError("digest store unreachable")

    phases = tuple(supervisor.Phase(p.name, broken) if p.name == "schedules" else p for p in supervisor.PHASES)
    monkeypatch.setattr(supervisor, "PHASES", phases)
    report = run_sweep("sup-phase")
    assert report.republished == 1  # phases before it ran
    assert report.errors.recent == [
        {"phase": "schedules", "key": "", "error": "RuntimeError: digest store unreachable"}
    ]
    assert ProcessHeartbeat.objects.filter(kind="supervisor", name="sup-phase").exists()


def test_a_clean_sweep_reports_no_errors(dispatched: Callable[[], int]) -> None:
    dispatched()
    report = run_sweep("sup-clean")
    assert report.errors.count == 0
    row = ProcessHeartbeat.objects.get(kind="supervisor", name="sup-clean")
    assert row.stats["errors"] == {"count": 0, "recent": []}
    assert check_health().sweep_errors == 0


def test_a_schedule_that_fails_is_reported_and_the_other_schedules_are_checked(
    sent: list[Any], monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from supervisor_app.scheduling import sweep as sched_sweep

    interval, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    good, bad = (PeriodicTask.objects.create(name=n, task="project.tasks.noop", interval=interval) for n in "ab")
    # Edited an hour ago, never fired: each has overdue slots for the supervisor's catch-up.
    PeriodicTask.objects.filter(pk__in=[good.pk, bad.pk]).update(date_changed=timezone.now() - timedelta(hours=1))
    real = sched_sweep.record

    def record(defn: Any, decisions: Any, reason: str = "") -> Any:
        if defn.pk == bad.pk:
            raise TypeError("unhashable type: 'list'")
        return real(defn, decisions, reason)

    monkeypatch.setattr(sched_sweep, "record", record)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("sup-schedules")
    assert SupervisedRun.objects.filter(periodic_task=good).exists()
    assert not SupervisedRun.objects.filter(periodic_task=bad).exists()
    assert report.errors.recent == [
        {"phase": "schedules", "key": f"schedule {bad.pk} 'b'", "error": "TypeError: unhashable type: 'list'"}
    ]
