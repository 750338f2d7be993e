"""Real beat processes against PostgreSQL and the broker: exactly one run per slot, catch-up on restart."""

from __future__ import annotations

import itertools
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from project.models import Execution
from project.processes import wait_until
from supervisor_app.core.states import ACTIVE_STATUSES, RunStatus
from supervisor_app.models import ProcessHeartbeat, SupervisedRun, SupervisionPolicy

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def every_second(name: str, label: str, **policy: Any) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(
        name=name, task="project.tasks.quiet_job", interval=interval, kwargs=f'{{"seconds": 0.01, "label": "{label}"}}'
    )
    SupervisionPolicy.objects.create(periodic_task=pt, **policy)
    return pt


def slots_of(pt: PeriodicTask) -> list[tuple[datetime, str, int]]:
    return list(
        SupervisedRun.objects.filter(periodic_task=pt)
        .order_by("scheduled_for")
        .values_list("scheduled_for", "status", "pk")
    )


def assert_gap_free(rows: list[tuple[datetime, str, int]]) -> None:
    """Every slot from the first recorded to the last is recorded, once (1 s apart, no holes)."""
    times = [t for t, _, _ in rows]
    assert len(times) == len(set(times))
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times)), times


def settle(pt: PeriodicTask) -> None:
    wait_until(
        lambda: not SupervisedRun.objects.filter(periodic_task=pt, status__in=ACTIVE_STATUSES).exists(),
        timeout=30,
        what="every run to finish",
    )


def assert_one_execution_per_run(rows: list[tuple[datetime, str, int]]) -> None:
    succeeded = [pk for _, status, pk in rows if status == RunStatus.SUCCEEDED]
    executions = list(Execution.objects.filter(run_id__in=[pk for _, _, pk in rows]).values_list("run_id", flat=True))
    assert sorted(executions) == sorted(succeeded)  # one execution per succeeded run, none for the others


def test_two_beats_give_exactly_one_run_per_slot_and_one_execution_per_run(live: Any) -> None:
    live.worker("worker", concurrency=2)
    live.supervisor()
    beats = [live.beat("beat-a"), live.beat("beat-b")]
    wait_until(lambda: ProcessHeartbeat.objects.filter(kind="beat").count() >= 2, timeout=30, what="two live beats")
    pt = every_second("two-beats", "two-beats", alert_grace=timedelta(seconds=3), catch_up="none")
    # ~15 slots after both beats loaded the new schedule (they reload within their 5 s max loop).
    wait_until(
        lambda: SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.SUCCEEDED).count() >= 15,
        timeout=45,
        what="15 succeeded slots",
    )
    for beat in beats:
        beat.stop()
    settle(pt)
    rows = slots_of(pt)
    assert_gap_free(rows)
    assert_one_execution_per_run(rows)
    statuses = [s for _, s, _ in rows]
    # Only slots before the beats picked the schedule up may be missed; after that, every one ran.
    first_run = statuses.index(RunStatus.SUCCEEDED)
    assert set(statuses[first_run:]) == {RunStatus.SUCCEEDED}, statuses
    assert set(statuses[:first_run]) <= {RunStatus.MISSED}
    sent = {b.name: b.output().count("'run': ") for b in beats}
    assert sum(sent.values()) >= 1, sent


def test_a_killed_beat_applies_the_catch_up_policy_when_restarted(live: Any) -> None:
    live.worker("worker", concurrency=2)
    beat = live.beat("beat-1")
    wait_until(lambda: ProcessHeartbeat.objects.filter(kind="beat").exists(), timeout=30, what="a live beat")
    window = timedelta(seconds=4)
    pt = every_second("catch-up", "catch-up", alert_grace=timedelta(seconds=1), catch_up="all", catch_up_window=window)
    wait_until(
        lambda: SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.SUCCEEDED).count() >= 3,
        timeout=30,
        what="3 succeeded slots",
    )
    beat.kill()
    killed_at = timezone.now()
    before = {t for t, _, _ in slots_of(pt)}
    last_before = max(before)
    time.sleep(6)  # the downtime itself (nothing to poll for: no process is running the schedule)
    restarted = live.beat("beat-2")
    # Run, not merely recorded: the beat records the slots of a fire together and publishes them
    # after commit, the on-time slot last; stopped in between, it would leave the caught-up slots
    # queued for a supervisor (there is none here).
    wait_until(
        lambda: SupervisedRun.objects.filter(
            periodic_task=pt, scheduled_for__gt=timezone.now() - timedelta(seconds=1), status=RunStatus.SUCCEEDED
        ).exists(),
        timeout=30,
        what="the restarted beat to run an on-time slot",
    )
    restarted.stop()
    settle(pt)
    rows = slots_of(pt)
    assert_gap_free(rows)
    assert_one_execution_per_run(rows)
    downtime = [(t, s) for t, s, _ in rows if last_before < t <= killed_at + timedelta(seconds=6)]
    statuses = [s for _, s in downtime]
    # Old overdue slots are missed, those inside the catch-up window ran late, in that order.
    assert RunStatus.MISSED in statuses and RunStatus.SUCCEEDED in statuses, statuses
    first_ran = statuses.index(RunStatus.SUCCEEDED)
    assert set(statuses[:first_ran]) == {RunStatus.MISSED}
    assert set(statuses[first_ran:]) == {RunStatus.SUCCEEDED}, statuses
    missed = SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.MISSED, scheduled_for__gt=last_before)
    assert all("grace" in r.last_error for r in missed)
