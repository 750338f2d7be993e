"""Schedules on the database (PostgreSQL in `make test`, SQLite too), no broker: publishes are
captured by the ``sent`` fixture, time is passed in or moved back in the rows, never slept."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import current_app
from django.core.exceptions import ValidationError
from django.db.models import F
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from supervisor_app import scheduling, services, signals
from supervisor_app.models import SupervisedRun, SupervisionPolicy
from supervisor_app.states import RunStatus
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db(transaction=False)

EVERY = 10  # seconds between two slots of the test schedule
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.get_fixed_timezone(0))


def make_schedule(task: str = "project.tasks.noop", every: int = EVERY, **policy: Any) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(name=f"s-{time.monotonic_ns()}", task=task, interval=interval)
    # The anchor (last edit) far in the past: every slot of the tests is judged.
    PeriodicTask.objects.filter(pk=pt.pk).update(date_changed=T0 - timedelta(days=1))
    if policy:
        SupervisionPolicy.objects.create(periodic_task=pt, **policy)
    return PeriodicTask.objects.select_related("supervision", "interval").get(pk=pt.pk)


def define(pt: PeriodicTask) -> scheduling.ScheduleDef:
    pt = PeriodicTask.objects.select_related("supervision", "interval", "crontab").get(pk=pt.pk)
    return scheduling.definition_for(pt, current_app.tasks[pt.task])


def at(slot: int) -> datetime:
    return T0 + timedelta(seconds=EVERY * slot)


def runs(pt: PeriodicTask) -> list[tuple[int, str]]:
    rows = SupervisedRun.objects.filter(periodic_task=pt).order_by("scheduled_for")
    return [(int((r.scheduled_for - T0).total_seconds()) // EVERY, r.status) for r in rows]


@pytest.fixture
def fire(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Callable[..., scheduling.RecordCounts]:
    """A beat firing at ``now`` for the slots after ``since`` (publishes captured after commit)."""

    def _fire(pt: PeriodicTask, since: datetime, now: datetime) -> scheduling.RecordCounts:
        with django_capture_on_commit_callbacks(execute=True):
            return scheduling.fire(define(pt), since, now)

    return _fire


@pytest.fixture
def missed_signals() -> Iterator[list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        got.append(kwargs)

    signals.run_missed.connect(receiver, weak=False)
    yield got
    signals.run_missed.disconnect(receiver)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"lease_timeout": timedelta(seconds=-1)}, "lease_timeout", "positive"),
        ({"lease_timeout": timedelta(seconds=1)}, "lease_timeout", "outlast the heartbeat"),
        ({"max_attempts": 0}, "max_attempts", "at least one attempt"),
        ({"backoff": timedelta(seconds=10), "backoff_max": timedelta(seconds=5)}, "backoff_max", "cap"),
        ({"start_window": timedelta(0)}, "start_window", "positive"),
        ({"alert_grace": timedelta(seconds=-5)}, "alert_grace", "negative"),
        (
            {"catch_up": "all", "catch_up_window": timedelta(seconds=30), "alert_grace": timedelta(seconds=60)},
            "catch_up_window",
            "longer than the grace",
        ),
        ({"alert_recipients": "ops@example.com, not-an-email"}, "alert_recipients", "not-an-email"),
        ({"overlap": "sometimes"}, "overlap", "not a valid choice"),
        ({"catch_up": "maybe"}, "catch_up", "not a valid choice"),
    ],
)
def test_policy_validation_rejects_nonsense(fields: dict[str, Any], field: str, message: str) -> None:
    policy = SupervisionPolicy(periodic_task=make_schedule(), **fields)
    with pytest.raises(ValidationError) as info:
        policy.full_clean()
    assert message in " ".join(info.value.message_dict[field])


def test_policy_on_a_plain_celery_task_is_refused() -> None:
    policy = SupervisionPolicy(periodic_task=make_schedule(task="project.tasks.plain_noop"))
    with pytest.raises(ValidationError, match="not a SupervisedTask"):
        policy.full_clean()


def test_a_sensible_policy_is_accepted_and_resolved() -> None:
    pt = make_schedule(
        max_attempts=5,
        lease_timeout=timedelta(minutes=5),
        overlap="skip",
        catch_up="all",
        catch_up_window=timedelta(hours=2),
        alert_recipients="ops@example.com\nlead@example.com",
    )
    pt.supervision.full_clean()
    defn = define(pt)
    assert defn.run_policy.max_attempts == 5 and defn.run_policy.lease_timeout == 300
    assert defn.policy.overlap == "skip" and defn.policy.catch_up == "all"
    assert defn.recipients == ("ops@example.com", "lead@example.com")


def test_schedules_without_a_policy_use_the_settings(settings: Any) -> None:
    settings.SUPERVISOR_CATCH_UP = "none"
    settings.SUPERVISOR_ALERT_GRACE = timedelta(seconds=7)
    defn = define(make_schedule())
    assert defn.policy.catch_up == "none" and defn.policy.grace == timedelta(seconds=7)


def test_invalid_crontab_and_interval_values_are_rejected() -> None:
    with pytest.raises(ValidationError):
        CrontabSchedule(minute="61", hour="*").full_clean()
    with pytest.raises(ValidationError):
        CrontabSchedule(minute="0", hour="25").full_clean()
    with pytest.raises(ValidationError):
        IntervalSchedule(every=0, period=IntervalSchedule.SECONDS).full_clean()


# --------------------------------------------------------------------------- dedup


def test_two_beats_firing_the_same_slots_record_and_publish_each_once(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule()
    first = fire(pt, at(0), at(3))
    second = fire(pt, at(0), at(3))  # the other beat, same slots
    assert first.run == 3 and second.run == 0 and second.lost_race == 3
    assert runs(pt) == [(1, "queued"), (2, "queued"), (3, "queued")]
    assert len(sent) == 3


def test_a_crontab_slot_is_recorded_in_utc_from_its_timezone(fire: Any) -> None:
    cron = CrontabSchedule.objects.create(minute="30", hour="1", timezone="America/New_York")
    pt = PeriodicTask.objects.create(name="nightly", task="project.tasks.noop", crontab=cron)
    PeriodicTask.objects.filter(pk=pt.pk).update(date_changed=T0 - timedelta(days=400))
    since = datetime(2024, 11, 2, tzinfo=timezone.get_fixed_timezone(0))
    counts = fire(pt, since, since + timedelta(days=2, hours=-2))  # on time: grace covers nothing else
    assert counts.run + counts.missed + counts.caught_up >= 1
    slots_ = sorted(SupervisedRun.objects.filter(periodic_task=pt).values_list("scheduled_for", flat=True))
    # 01:30 EDT on the 2nd and 01:30 EDT (first occurrence) on fall-back day: two slots, not three.
    assert [s.isoformat() for s in slots_] == ["2024-11-02T05:30:00+00:00", "2024-11-03T05:30:00+00:00"]


# --------------------------------------------------------------------------- catch-up


def test_catch_up_none_misses_and_alerts_every_overdue_slot(
    fire: Any, sent: list[Any], missed_signals: list[Any], mailoutbox: list[Any]
) -> None:
    pt = make_schedule(catch_up="none", alert_grace=timedelta(seconds=5), alert_recipients="ops@example.com")
    fire(pt, at(0), at(5))  # a beat back after downtime: slots 1..4 overdue, 5 on time
    assert runs(pt) == [(1, "missed"), (2, "missed"), (3, "missed"), (4, "missed"), (5, "queued")]
    assert len(sent) == 1
    assert len(missed_signals) == 4 and "grace" in missed_signals[0]["reason"]
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ops@example.com"] and "4 missed" in mailoutbox[0].subject


def test_catch_up_latest_runs_the_newest_overdue_slot_only(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(catch_up="latest", alert_grace=timedelta(seconds=5), catch_up_window=timedelta(minutes=5))
    fire(pt, at(0), at(4) + timedelta(seconds=8))  # slot 4 is 8 s old: overdue, no on-time slot
    assert runs(pt) == [(1, "missed"), (2, "missed"), (3, "missed"), (4, "queued")]
    assert len(sent) == 1


def test_catch_up_all_runs_the_overdue_slots_inside_the_window(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(catch_up="all", alert_grace=timedelta(seconds=5), catch_up_window=timedelta(seconds=25))
    fire(pt, at(0), at(5))
    assert runs(pt) == [(1, "missed"), (2, "missed"), (3, "queued"), (4, "queued"), (5, "queued")]
    assert len(sent) == 3


# --------------------------------------------------------------------------- overlap


def test_overlap_skip_records_a_skipped_slot_while_the_previous_run_is_active(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="skip")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    assert runs(pt) == [(1, "queued"), (2, "skipped")]
    first = SupervisedRun.objects.get(periodic_task=pt, status=RunStatus.QUEUED)
    services.claim(first.pk, 1, "w")
    services.finish_success(first.pk, 1)
    fire(pt, at(2), at(3))
    assert runs(pt) == [(1, "succeeded"), (2, "skipped"), (3, "queued")]
    assert len(sent) == 2


def test_overlap_queue_one_holds_one_slot_and_releases_it_when_the_active_run_ends(
    fire: Any, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(overlap="queue_one")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    fire(pt, at(2), at(3))
    assert runs(pt) == [(1, "queued"), (2, "queued"), (3, "skipped")]
    assert len(sent) == 1  # the held run is not published
    first, held = SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.QUEUED).order_by("scheduled_for")
    assert held.next_check_at is None
    with django_capture_on_commit_callbacks(execute=True):
        assert scheduling.release_held() == 0  # the first run is still active
    services.claim(first.pk, 1, "w")
    services.finish_success(first.pk, 1)
    with django_capture_on_commit_callbacks(execute=True):
        assert scheduling.release_held() == 1
    assert sent[-1][0] == held.pk
    held.refresh_from_db()
    assert held.next_check_at is not None and held.publish_count == 1


def test_overlap_replace_cancels_the_active_run(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="replace")
    fire(pt, at(0), at(1))
    old = SupervisedRun.objects.get(periodic_task=pt)
    services.claim(old.pk, 1, "w")
    fire(pt, at(1), at(2))
    old.refresh_from_db()
    # A running run is cancelled cooperatively: its agent stops at the next heartbeat.
    assert old.status == RunStatus.RUNNING and old.cancel_requested
    fire(pt, at(2), at(3))
    assert runs(pt)[1:] == [(2, "cancelled"), (3, "queued")]
    assert len(sent) == 3


def test_overlap_allow_runs_every_slot(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="allow")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    assert runs(pt) == [(1, "queued"), (2, "queued")]


# --------------------------------------------------------------------------- supervisor


def test_supervisor_records_missed_slots_when_no_beat_runs(
    sent: list[Any], missed_signals: list[Any], mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(every=60, catch_up="none", alert_grace=timedelta(seconds=30), alert_recipients="ops@example.com")
    # As if the schedule had been created 5 minutes ago and no beat had run since.
    PeriodicTask.objects.filter(pk=pt.pk).update(date_changed=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("test-supervisor")
    missed = list(SupervisedRun.objects.filter(periodic_task=pt).values_list("status", flat=True))
    assert set(missed) == {RunStatus.MISSED} and 4 <= len(missed) <= 5
    assert report.extra["schedules"]["missed"] == len(missed)
    assert report.extra["schedules"]["beat_stale"] is True
    assert len(missed_signals) == len(missed) and len(mailoutbox) == 1
    with django_capture_on_commit_callbacks(execute=True):
        again = run_sweep("test-supervisor")
    assert again.extra["schedules"].get("missed", 0) == 0  # idempotent
    assert sent == []


def test_supervisor_catches_up_the_latest_slot_of_a_rare_schedule(sent: list[Any]) -> None:
    pt = make_schedule(every=3600, catch_up="latest", alert_grace=timedelta(seconds=30))
    defn = define(pt)
    now = at(0) + timedelta(hours=3, minutes=10)  # hourly slots, beat down for three of them
    counts = scheduling.check_schedules(now, [(defn, at(0))], deadline=time.monotonic() + 10)
    assert (counts.missed, counts.caught_up) == (2, 1)
    assert [s for _, s in runs(pt)] == ["missed", "missed", "queued"]


def test_supervisor_leaves_slots_inside_their_grace_to_the_beat() -> None:
    pt = make_schedule(catch_up="none", alert_grace=timedelta(seconds=30))
    counts = scheduling.check_schedules(at(2), [(define(pt), at(0))], deadline=time.monotonic() + 10)
    assert counts.missed == 0 and not SupervisedRun.objects.filter(periodic_task=pt).exists()


def test_a_queued_run_not_started_within_its_start_window_becomes_missed(
    fire: Any, missed_signals: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(start_window=timedelta(minutes=2))
    now = timezone.now()
    fire(pt, now - timedelta(seconds=EVERY), now)
    run = SupervisedRun.objects.get(periodic_task=pt)
    with django_capture_on_commit_callbacks(execute=True):
        run_sweep("test-supervisor")
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED  # still inside its window
    # Time passes: move the slot and the recording back (the `expire` approach), no sleeping.
    SupervisedRun.objects.filter(pk=run.pk).update(
        scheduled_for=F("scheduled_for") - timedelta(minutes=3), created_at=F("created_at") - timedelta(minutes=3)
    )
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("test-supervisor")
    run.refresh_from_db()
    assert run.status == RunStatus.MISSED and "start window" in run.last_error
    assert report.extra["schedules"]["expired"] == 1
    assert services.claim(run.pk, 1, "late-worker") is None  # a late delivery is dropped
    assert [k["reason"] for k in missed_signals] == [run.last_error]


# --------------------------------------------------------------------------- the beat class


@pytest.mark.django_db(transaction=True)
def test_scheduler_ticks_record_slots_and_liveness(sent: list[Any]) -> None:
    from supervisor_app.models import ProcessHeartbeat
    from supervisor_app.schedulers import SupervisedEntry, SupervisedScheduler

    pt = make_schedule(every=1)
    PeriodicTask.objects.filter(pk=pt.pk).update(date_changed=timezone.now())
    plain_interval = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    PeriodicTask.objects.create(name="plain", task="project.tasks.plain_noop", interval=plain_interval)
    scheduler = SupervisedScheduler(app=current_app)
    assert isinstance(scheduler.schedule[pt.name], SupervisedEntry)
    assert not isinstance(scheduler.schedule["plain"], SupervisedEntry)

    def recorded() -> int:
        delay = scheduler.tick()
        assert delay <= scheduler.max_interval
        return SupervisedRun.objects.filter(periodic_task=pt).count()

    deadline = time.monotonic() + 10
    while recorded() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert SupervisedRun.objects.filter(periodic_task=pt).count() >= 2
    assert ProcessHeartbeat.objects.filter(kind=ProcessHeartbeat.Kind.BEAT, name=scheduler.process_name).exists()
    # The heap is not rebuilt (no O(N) comparison) unless the database schedule changed.
    assert scheduler.schedules_equal(scheduler.old_schedulers, scheduler.schedule)
    scheduler.close()
