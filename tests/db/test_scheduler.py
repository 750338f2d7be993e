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
from django.db.models import Count, F
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from supervisor_app import broker, registry, runs, signals
from supervisor_app.core import slots
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun, SupervisionPolicy
from supervisor_app.scheduling import definitions, firing
from supervisor_app.scheduling import sweep as sched_sweep
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


def define(pt: PeriodicTask) -> definitions.ScheduleDef:
    registry.supervised_task_names(current_app)  # imports the tasks, so a test can run on its own
    pt = PeriodicTask.objects.select_related("supervision", "interval", "crontab").get(pk=pt.pk)
    return definitions.definition_for(pt, current_app.tasks[pt.task])


def at(slot: int) -> datetime:
    return T0 + timedelta(seconds=EVERY * slot)


def slot_runs(pt: PeriodicTask) -> list[tuple[int, str]]:
    rows = SupervisedRun.objects.filter(periodic_task=pt).order_by("scheduled_for")
    return [(int((r.scheduled_for - T0).total_seconds()) // EVERY, r.status) for r in rows]


@pytest.fixture
def fire(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Callable[..., firing.RecordCounts]:
    """A beat firing at ``now`` for the slots after ``since`` (publishes captured after commit)."""

    def _fire(pt: PeriodicTask, since: datetime, now: datetime) -> firing.RecordCounts:
        with django_capture_on_commit_callbacks(execute=True):
            return firing.fire(define(pt), since, now)

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
    assert slot_runs(pt) == [(1, "queued"), (2, "queued"), (3, "queued")]
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
    assert slot_runs(pt) == [(1, "missed"), (2, "missed"), (3, "missed"), (4, "missed"), (5, "queued")]
    assert len(sent) == 1
    assert len(missed_signals) == 4 and "grace" in missed_signals[0]["reason"]
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ops@example.com"] and "4 missed" in mailoutbox[0].subject


def test_catch_up_latest_runs_the_newest_overdue_slot_only(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(catch_up="latest", alert_grace=timedelta(seconds=5), catch_up_window=timedelta(minutes=5))
    fire(pt, at(0), at(4) + timedelta(seconds=8))  # slot 4 is 8 s old: overdue, no on-time slot
    assert slot_runs(pt) == [(1, "missed"), (2, "missed"), (3, "missed"), (4, "queued")]
    assert len(sent) == 1


def test_catch_up_all_runs_the_overdue_slots_inside_the_window(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(catch_up="all", alert_grace=timedelta(seconds=5), catch_up_window=timedelta(seconds=25))
    fire(pt, at(0), at(5))
    assert slot_runs(pt) == [(1, "missed"), (2, "missed"), (3, "queued"), (4, "queued"), (5, "queued")]
    assert len(sent) == 3


# --------------------------------------------------------------------------- overlap


def test_overlap_skip_records_a_skipped_slot_while_the_previous_run_is_active(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="skip")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    assert slot_runs(pt) == [(1, "queued"), (2, "skipped")]
    first = SupervisedRun.objects.get(periodic_task=pt, status=RunStatus.QUEUED)
    runs.claim(first.pk, 1, "w")
    runs.finish_success(first.pk, 1)
    fire(pt, at(2), at(3))
    assert slot_runs(pt) == [(1, "succeeded"), (2, "skipped"), (3, "queued")]
    assert len(sent) == 2


def test_overlap_queue_one_holds_one_slot_and_releases_it_when_the_active_run_ends(
    fire: Any, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(overlap="queue_one")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    fire(pt, at(2), at(3))
    assert slot_runs(pt) == [(1, "queued"), (2, "queued"), (3, "skipped")]
    assert len(sent) == 1  # the held run is not published
    first, held = SupervisedRun.objects.filter(periodic_task=pt, status=RunStatus.QUEUED).order_by("scheduled_for")
    assert held.next_check_at is None
    with django_capture_on_commit_callbacks(execute=True):
        assert sched_sweep.release_held() == 0  # the first run is still active
    runs.claim(first.pk, 1, "w")
    runs.finish_success(first.pk, 1)
    with django_capture_on_commit_callbacks(execute=True):
        assert sched_sweep.release_held() == 1
    assert sent[-1][0] == held.pk
    held.refresh_from_db()
    assert held.next_check_at is not None and held.publish_count == 1


def test_overlap_replace_cancels_the_active_run(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="replace")
    fire(pt, at(0), at(1))
    old = SupervisedRun.objects.get(periodic_task=pt)
    runs.claim(old.pk, 1, "w")
    fire(pt, at(1), at(2))
    old.refresh_from_db()
    # A running run is cancelled cooperatively: its agent stops at the next heartbeat.
    assert old.status == RunStatus.RUNNING and old.cancel_requested
    fire(pt, at(2), at(3))
    assert slot_runs(pt)[1:] == [(2, "cancelled"), (3, "queued")]
    assert len(sent) == 3


def test_overlap_allow_runs_every_slot(fire: Any, sent: list[Any]) -> None:
    pt = make_schedule(overlap="allow")
    fire(pt, at(0), at(1))
    fire(pt, at(1), at(2))
    assert slot_runs(pt) == [(1, "queued"), (2, "queued")]


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
    counts = sched_sweep.check_schedules(now, [(defn, at(0))], deadline=time.monotonic() + 10)
    assert (counts.missed, counts.caught_up) == (2, 1)
    assert [s for _, s in slot_runs(pt)] == ["missed", "missed", "queued"]


def test_supervisor_leaves_slots_inside_their_grace_to_the_beat() -> None:
    pt = make_schedule(catch_up="none", alert_grace=timedelta(seconds=30))
    counts = sched_sweep.check_schedules(at(2), [(define(pt), at(0))], deadline=time.monotonic() + 10)
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
    assert runs.claim(run.pk, 1, "late-worker") is None  # a late delivery is dropped
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


# --------------------------------------------------------------------------- loading many schedules


def crontab_schedule(minute: str = "0", hour: str = "*", tz: str = "Europe/Paris") -> PeriodicTask:
    cron = CrontabSchedule.objects.create(minute=minute, hour=hour, timezone=tz)
    return PeriodicTask.objects.create(name=f"c-{time.monotonic_ns()}", task="project.tasks.noop", crontab=cron)


def loaded(scheduler: Any) -> dict[str, Any]:
    """The scheduler's entries as a load reads them (no default entries, no heap)."""
    return dict(scheduler.all_as_schedule())


def test_schedules_with_equal_crontab_values_share_one_parse(monkeypatch: Any) -> None:
    from celery.schedules import crontab

    from supervisor_app.schedulers import SupervisedEntry, SupervisedScheduler

    # Two rows with the same values (the admin makes such duplicates), one row with others.
    a, b, c = crontab_schedule(), crontab_schedule(), crontab_schedule(minute="30")
    assert a.crontab_id != b.crontab_id
    registry.supervised_task_names(current_app)
    definitions.parse_crontab.cache_clear()
    parses: list[str] = []
    parse = crontab.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        parses.append(kwargs.get("minute", args[0] if args else "*"))
        parse(self, *args, **kwargs)

    monkeypatch.setattr(crontab, "__init__", counted)
    entries = loaded(SupervisedScheduler(app=current_app, lazy=True))
    # One parse per distinct crontab, however many rows and schedules (it was four per schedule:
    # two by django-celery-beat's entry, two by the slot rule).
    assert sorted(parses) == ["0", "30"]
    ea, eb, ec = (entries[pt.name] for pt in (a, b, c))
    assert all(isinstance(e, SupervisedEntry) for e in (ea, eb, ec))
    assert ea.definition.rule is eb.definition.rule and ea.schedule is eb.schedule
    assert ec.definition.rule != ea.definition.rule
    monkeypatch.undo()
    # The same values as parsing each row, as before: Celery's schedule and the slot rule built from it.
    for entry, pt in ((ea, a), (ec, c)):
        assert entry.schedule == pt.crontab.schedule and entry.schedule.tz == pt.crontab.timezone
        assert entry.definition.rule.minutes == frozenset(pt.crontab.schedule.minute)
        assert entry.definition.rule.tz == pt.crontab.timezone
    assert define(a).rule is ea.definition.rule  # the sweep's definitions share it too


def test_a_schedule_that_cannot_be_read_is_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from supervisor_app.schedulers import SupervisedScheduler

    good, bad = crontab_schedule(), crontab_schedule()
    PeriodicTask.objects.filter(pk=bad.pk).update(headers="{not json")
    registry.supervised_task_names(current_app)
    entries = loaded(SupervisedScheduler(app=current_app, lazy=True))
    assert good.name in entries and bad.name not in entries
    assert f"schedule {bad.name!r} cannot be read" in caplog.text


def test_an_edited_crontab_gets_a_new_rule() -> None:
    pt = crontab_schedule(minute="0", tz="Europe/Paris")
    before = define(pt).rule
    CrontabSchedule.objects.filter(pk=pt.crontab_id).update(minute="15")
    edited = define(pt).rule
    assert isinstance(edited, slots.Crontab) and edited.minutes == {15} and before.minutes == {0}
    CrontabSchedule.objects.filter(pk=pt.crontab_id).update(timezone="America/New_York")
    moved = define(pt).rule
    assert isinstance(moved, slots.Crontab) and str(moved.tz) == "America/New_York" and moved.minutes == {15}
    # Back to the first values: the first parse again (keyed on the values, not on the row).
    CrontabSchedule.objects.filter(pk=pt.crontab_id).update(minute="0", timezone="Europe/Paris")
    assert define(pt).rule is before


def test_the_crontab_cache_is_bounded() -> None:
    info = definitions.parse_crontab.cache_info()
    assert info.maxsize == definitions.CRONTAB_CACHE_SIZE
    first = definitions.parse_crontab("0", "0", "*", "*", "*", slots.UTC)
    # An admin editing crontabs for ever: more distinct values than the cache holds.
    for n in range(definitions.CRONTAB_CACHE_SIZE + 1):
        definitions.parse_crontab(str(n % 60), str(n // 60 % 24), str(n // 1440 % 7), "*", "*", slots.UTC)
    assert definitions.parse_crontab.cache_info().currsize == definitions.CRONTAB_CACHE_SIZE
    again = definitions.parse_crontab("0", "0", "*", "*", "*", slots.UTC)
    assert again is not first and again.rule == first.rule  # evicted, then parsed anew (equal)


def test_a_supervised_entry_has_the_attributes_django_celery_beat_gives_an_entry() -> None:
    from django_celery_beat.schedulers import ModelEntry

    from supervisor_app.schedulers import SupervisedEntry

    pt = crontab_schedule()
    PeriodicTask.objects.filter(pk=pt.pk).update(
        args="[1, 2]", kwargs='{"a": 1}', queue="q", priority=3, headers='{"h": "v"}', expire_seconds=60
    )
    ours = SupervisedEntry(
        fresh := PeriodicTask.objects.select_related("crontab").get(pk=pt.pk),
        app=current_app,
        definition=define(pt),
        cursor=T0,
    )
    theirs = ModelEntry(PeriodicTask.objects.select_related("crontab").get(pk=pt.pk), app=current_app)
    for attr in ("name", "task", "schedule", "args", "kwargs", "options", "total_run_count", "last_run_at"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.model is fresh and ours.app is theirs.app


def test_the_load_query_has_one_time_zone_branch_per_time_zone() -> None:
    from supervisor_app.schedulers import SupervisedScheduler

    for minute in range(5):
        crontab_schedule(minute=str(minute), tz="Asia/Tokyo")
    crontab_schedule(tz="UTC")
    names = SupervisedScheduler(app=current_app, lazy=True)._get_unique_timezone_names()
    assert sorted(str(tz) for tz in names) == ["Asia/Tokyo", "UTC"]


@pytest.mark.django_db(transaction=True)
def test_each_load_reads_the_settings_again(settings: Any) -> None:
    from supervisor_app.schedulers import SupervisedScheduler

    pt = make_schedule()
    scheduler = SupervisedScheduler(app=current_app, lazy=True)
    settings.SUPERVISOR_CATCH_UP = "none"
    assert loaded(scheduler)[pt.name].definition.policy.catch_up == "none"
    settings.SUPERVISOR_CATCH_UP = "all"
    assert loaded(scheduler)[pt.name].definition.policy.catch_up == "all"


# --------------------------------------------------------------------------- the beat's batch


def firings(pts: list[PeriodicTask], since: datetime, now: datetime) -> list[firing.Firing]:
    return [firing.Firing(define(pt), since, now) for pt in pts]


def one_run_per_slot(pts: list[PeriodicTask]) -> int:
    """The number of runs of ``pts``, after checking that no slot has two."""
    rows = SupervisedRun.objects.filter(periodic_task__in=pts)
    per_slot = rows.values("periodic_task_id", "scheduled_for").annotate(n=Count("id"))
    assert {r["n"] for r in per_slot} <= {1}
    return rows.count()


@pytest.mark.parametrize("multi_row", [True, False], ids=["on-conflict", "per-row"])
def test_a_batch_where_some_slots_exist_records_and_publishes_only_the_new_ones(
    fire: Any, sent: list[Any], django_capture_on_commit_callbacks: Any, monkeypatch: Any, multi_row: bool
) -> None:
    from django.db import connection

    if not multi_row:  # a backend without INSERT … ON CONFLICT … RETURNING: create_run per slot
        monkeypatch.setattr(connection.features, "supports_update_conflicts_with_target", False)
    pts = [make_schedule() for _ in range(6)]
    for pt in pts[:3]:
        fire(pt, at(0), at(2))  # slots 1 and 2 of three schedules recorded (and published) already
    before = set(SupervisedRun.objects.values_list("pk", flat=True))
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        results = firing.fire_many(firings(pts, at(0), at(3)))
    counts = [(r.run, r.lost_race) for r in results if isinstance(r, firing.RecordCounts)]
    assert counts == [(1, 2)] * 3 + [(3, 0)] * 3
    new = set(SupervisedRun.objects.exclude(pk__in=before).values_list("pk", flat=True))
    assert len(new) == 3 + 9 and sorted(r for r, _, _ in sent) == sorted(new)
    assert {attempt for _, attempt, _ in sent} == {1}
    assert one_run_per_slot(pts) == 6 * 3


def test_a_slot_recorded_in_a_batch_is_the_row_create_run_writes(django_capture_on_commit_callbacks: Any) -> None:
    from django.forms.models import model_to_dict

    one, other = make_schedule(), make_schedule()
    policy = runs.RunPolicy(max_attempts=4, lease_timeout=30.0, start_timeout=45.0, max_runtime=600.0)
    args: dict[str, Any] = dict(options={"queue": "q1", "priority": 3, "countdown": 5}, scheduled_for=at(1))
    with django_capture_on_commit_callbacks(execute=False):
        alone = runs.create_run(
            "project.tasks.noop", [1, "a"], {"k": {"n": None}}, policy, periodic_task_id=one.pk, **args
        )
        slot = runs.SlotRun(
            other.pk, at(1), "project.tasks.noop", [1, "a"], {"k": {"n": None}}, policy, args["options"]
        )
        [(pk, _)] = runs.create_slot_runs([slot])
    assert alone is not None
    rows = [SupervisedRun.objects.get(pk=alone.pk), SupervisedRun.objects.get(pk=pk)]
    ignored = {"id", "periodic_task", "created_at", "next_check_at", "task_id"}
    single, batched = ({k: v for k, v in model_to_dict(r).items() if k not in ignored} for r in rows)
    assert batched == single and batched["options"] == {"queue": "q1", "priority": 3}
    for row in rows:
        assert row.next_check_at is not None
        assert abs((row.next_check_at - row.created_at) - timedelta(seconds=45)) < timedelta(seconds=5)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_beats_racing_over_one_batch_record_and_publish_each_slot_once(sent: list[Any], monkeypatch: Any) -> None:
    import threading

    from django.db import connection

    fake_send = broker.send

    def slow_send(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.002)  # a broker round trip: while one beat publishes, the other inserts the next rows
        fake_send(*args, **kwargs)

    monkeypatch.setattr(broker, "send", slow_send)
    pts = [make_schedule() for _ in range(400)]
    batch = firings(pts, at(0), at(3))  # 1,200 slots: three inserts of 500 rows or fewer per beat
    barrier = threading.Barrier(2)
    results: list[list[firing.RecordCounts | Exception]] = [[], []]

    def beat(k: int) -> None:
        try:
            barrier.wait()
            # The other beat sees the entries in another order: the rows still go in in one order.
            results[k] = firing.fire_many(batch if k == 0 else batch[::-1])
        finally:
            connection.close()

    threads = [threading.Thread(target=beat, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = [r for rs in results for r in rs]
    assert len(counts) == 800 and all(isinstance(c, firing.RecordCounts) for c in counts), counts[:3]
    recorded = [c for c in counts if isinstance(c, firing.RecordCounts)]
    assert sum(c.run for c in recorded) == 1200 and sum(c.lost_race for c in recorded) == 1200
    assert one_run_per_slot(pts) == 1200
    assert len(sent) == 1200 and len({run_id for run_id, _, _ in sent}) == 1200


def test_a_broker_down_during_a_batch_leaves_the_unsent_runs_queued_for_the_supervisor(
    sent: list[Any], django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    pts = [make_schedule() for _ in range(5)]
    calls: list[int] = []
    fake_send = broker.send

    def broker_goes_down(message: Any, producer: Any = None) -> None:
        calls.append(message.run_id)
        if len(calls) > 2:
            raise ConnectionRefusedError("broker down")
        fake_send(message, producer)

    monkeypatch.setattr(broker, "send", broker_goes_down)
    with django_capture_on_commit_callbacks(execute=True):
        [result] = firing.fire_many(firings(pts[:1], at(0), at(1)))
        results = firing.fire_many(firings(pts[1:], at(0), at(1)))
    assert isinstance(result, firing.RecordCounts) and result.run == 1
    assert all(isinstance(r, firing.RecordCounts) and r.run == 1 for r in results)
    # Two published; the broker failed on the third, and the batch stopped trying (one failure per batch).
    assert len(sent) == 2 and len(calls) == 3
    rows = SupervisedRun.objects.filter(periodic_task__in=pts)
    assert set(rows.values_list("status", flat=True)) == {RunStatus.QUEUED}
    unsent = rows.exclude(pk__in=[r for r, _, _ in sent])
    assert unsent.count() == 3 and set(unsent.values_list("publish_count", flat=True)) == {0}
    monkeypatch.setattr(broker, "send", fake_send)  # the broker is back
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("test-supervisor")
    assert report.republished == 3
    assert sorted(r for r, _, _ in sent) == sorted(rows.values_list("pk", flat=True))


def test_a_batch_keeps_overlap_policies_and_misses_on_their_own_path(
    sent: list[Any], missed_signals: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    allow = make_schedule(catch_up="none", alert_grace=timedelta(seconds=5))
    skip = make_schedule(overlap="skip")
    fire_once = firings([skip], at(0), at(1))
    with django_capture_on_commit_callbacks(execute=True):
        firing.fire_many(fire_once)  # skip's slot 1: a queued, active run
        results = firing.fire_many(firings([allow], at(0), at(3)) + firings([skip], at(1), at(2)))
    assert slot_runs(allow) == [(1, "missed"), (2, "missed"), (3, "queued")]
    assert slot_runs(skip) == [(1, "queued"), (2, "skipped")]
    assert [r.as_dict() for r in results if isinstance(r, firing.RecordCounts)] == [
        {"run": 1, "missed": 2},
        {"skipped": 1},
    ]
    assert len(missed_signals) == 2 and len(sent) == 2


def test_a_batch_reports_a_failing_schedule_and_records_the_others(sent: list[Any], settings: Any) -> None:
    settings.SUPERVISOR_MAX_ARGS_BYTES = 50
    good = make_schedule()
    bad = make_schedule()
    PeriodicTask.objects.filter(pk=bad.pk).update(kwargs='{"blob": "' + "x" * 100 + '"}')
    results = firing.fire_many(firings([good, bad], at(0), at(1)))
    assert isinstance(results[0], firing.RecordCounts) and results[0].run == 1
    assert isinstance(results[1], ValueError)
    assert slot_runs(good) == [(1, "queued")] and slot_runs(bad) == []


def due_scheduler(n: int, settings: Any) -> tuple[Any, list[PeriodicTask]]:
    """A beat with ``n`` supervised schedules (every minute), each with slots due now."""
    from supervisor_app.schedulers import SupervisedScheduler

    settings.SUPERVISOR_ALERT_GRACE = 3600.0  # every due slot is on time: no catch-up decision here
    pts = [make_schedule(every=60) for _ in range(n)]
    PeriodicTask.objects.filter(pk__in=[pt.pk for pt in pts]).update(
        date_changed=timezone.now() - timedelta(seconds=150)
    )
    return SupervisedScheduler(app=current_app), pts


@pytest.mark.django_db(transaction=True)
def test_one_tick_fires_every_due_schedule_and_a_second_beat_records_nothing(sent: list[Any], settings: Any) -> None:
    from supervisor_app.schedulers import SupervisedEntry

    first, pts = due_scheduler(30, settings)
    second, _ = due_scheduler(0, settings)
    try:
        assert first.tick() == 0  # one tick: the whole batch
        recorded = one_run_per_slot(pts)
        assert recorded >= 60 and len(sent) == recorded  # two or three slots per schedule
        assert first._stats == {"run": recorded}
        assert second.tick() == 0
        assert second._stats == {"lost_race": recorded} and len(sent) == recorded
        # Both heaps still hold every schedule, next due at its next slot, not now.
        for scheduler in (first, second):
            entries = [e[2] for e in scheduler._heap if isinstance(e[2], SupervisedEntry)]
            assert len(entries) == 30 and not any(e.is_due().is_due for e in entries)
            assert scheduler.tick() > 0
        # No second attempt at the fired slots (the schedule holds the successors, heap rebuilt or not).
        assert first._stats == {"run": recorded} and second._stats == {"lost_race": recorded}
        # The winner wrote last_run_at and total_run_count, in one statement; the loser nothing.
        counts = dict(PeriodicTask.objects.filter(pk__in=[p.pk for p in pts]).values_list("pk", "total_run_count"))
        per_pt = dict(
            SupervisedRun.objects.filter(periodic_task__in=pts)
            .values("periodic_task_id")
            .annotate(n=Count("id"))
            .values_list("periodic_task_id", "n")
        )
        assert counts == per_pt
        assert not PeriodicTask.objects.filter(pk__in=[p.pk for p in pts], last_run_at__isnull=True).exists()
    finally:
        first.close()
        second.close()


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_cannot_be_recorded_keeps_its_slots_for_the_next_fire(
    sent: list[Any], settings: Any, monkeypatch: Any
) -> None:
    from django.db import OperationalError

    scheduler, pts = due_scheduler(3, settings)

    def database_down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    try:
        cursors = {e.model.pk: e.cursor for e in scheduler.schedule.values() if hasattr(e, "cursor")}
        assert len(cursors) == 3
        with monkeypatch.context() as m:
            m.setattr(runs, "create_slot_runs", database_down)
            assert scheduler.tick() == 0
        assert one_run_per_slot(pts) == 0 and sent == []
        # The successors start from the old cursors: their next fire records the same slots.
        heap = [e for _, _, e in scheduler._heap if hasattr(e, "cursor")]
        assert {e.model.pk: e.cursor for e in heap} == cursors
        for entry in heap:
            scheduler.reserve(entry)
        scheduler.fire(heap)
        assert one_run_per_slot(pts) >= 6 and len(sent) == one_run_per_slot(pts)
    finally:
        scheduler.close()


# --------------------------------------------------------------------------- one rule: policy choices, options


def test_an_invalid_overlap_setting_fails_loudly_instead_of_acting_as_replace(settings: Any) -> None:
    """Before, `SUPERVISOR_OVERLAP = 'Skip'` passed and fell through to `replace`, cancelling active runs."""
    pt = make_schedule()
    settings.SUPERVISOR_OVERLAP = "Skip"
    with pytest.raises(ValueError, match=r"SUPERVISOR_OVERLAP must be one of 'allow', 'skip'.*got 'Skip'"):
        define(pt)
    settings.SUPERVISOR_OVERLAP = "skip"
    assert define(pt).policy.overlap == "skip"


def test_a_policy_row_with_an_unknown_choice_is_refused_by_the_database() -> None:
    from django.db import IntegrityError, transaction

    pt = make_schedule(overlap="skip")
    with pytest.raises(IntegrityError), transaction.atomic():
        SupervisionPolicy.objects.filter(periodic_task=pt).update(overlap="Skip")
    with pytest.raises(IntegrityError), transaction.atomic():
        SupervisionPolicy.objects.filter(periodic_task=pt).update(catch_up="sometimes")
    assert SupervisionPolicy.objects.get(periodic_task=pt).overlap == "skip"


def _captured(monkeypatch: Any) -> list[broker.Message]:
    messages: list[broker.Message] = []
    monkeypatch.setattr(broker, "send", lambda message, producer=None: messages.append(message))
    return messages


def test_a_schedules_queue_priority_headers_and_expiry_reach_every_message_of_its_runs(
    monkeypatch: Any, django_capture_on_commit_callbacks: Any, expire: Callable[..., None]
) -> None:
    """Before, the supervised path kept queue, exchange, routing key and priority, and dropped the
    schedule's headers and expiry that DatabaseScheduler sends."""
    messages = _captured(monkeypatch)
    pt = make_schedule()
    PeriodicTask.objects.filter(pk=pt.pk).update(
        queue="reports", routing_key="reports.nightly", priority=4, headers='{"tenant": "acme"}', expire_seconds=600
    )
    with django_capture_on_commit_callbacks(execute=True):
        counts = firing.fire(define(pt), at(0), at(1) + timedelta(seconds=1))
    assert counts.run == 1 and len(messages) == 1
    first = broker.send_options(messages[0])
    run = SupervisedRun.objects.get(periodic_task=pt)
    assert first["queue"] == "reports" and first["routing_key"] == "reports.nightly" and first["priority"] == 4
    assert first["headers"] == {
        "tenant": "acme",
        "periodic_task_name": pt.name,
        broker.HEADER_RUN: run.pk,
        broker.HEADER_ATTEMPT: 1,
    }
    expires = first["expires"]
    assert timedelta(seconds=590) < expires - timezone.now() <= timedelta(seconds=600)
    # Published again by the supervisor (nobody started it): the same options, the same expiry.
    expire(run.pk, "next_check_at")
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").republished == 1
    again = broker.send_options(messages[1])
    assert again == first


def test_ad_hoc_headers_and_queue_are_kept_for_every_publish(
    monkeypatch: Any, django_capture_on_commit_callbacks: Any, expire: Callable[..., None]
) -> None:
    from project.tasks import noop

    messages = _captured(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        run_id = noop.apply_async(queue="urgent", headers={"trace": "abc"}).run_id
    expire(run_id, "next_check_at")
    with django_capture_on_commit_callbacks(execute=True):
        run_sweep("t")
    assert [m.run_id for m in messages] == [run_id, run_id]
    for message in messages:
        options = broker.send_options(message)
        assert options["queue"] == "urgent" and options["headers"]["trace"] == "abc"


def test_a_run_whose_messages_expired_unstarted_ends_missed_instead_of_being_republished_forever(
    monkeypatch: Any, django_capture_on_commit_callbacks: Any, expire: Callable[..., None]
) -> None:
    from project.tasks import noop

    messages = _captured(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        run_id = noop.apply_async(expires=1).run_id
    SupervisedRun.objects.filter(pk=run_id).update(options={"expires": (timezone.now() - timedelta(1)).isoformat()})
    expire(run_id, "next_check_at")
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    run = SupervisedRun.objects.get(pk=run_id)
    assert report.republished == 0 and len(messages) == 1
    assert run.status == RunStatus.MISSED and "expired" in run.last_error and run.finished_at is not None
