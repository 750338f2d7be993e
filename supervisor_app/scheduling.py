"""Schedules on the database: record slots, apply the overlap policy, detect and alert missed slots.

Shared by the beat (:mod:`supervisor_app.schedulers`) and the supervisor's sweep (registered in
:data:`supervisor_app.supervisor.EXTRA_PHASES` when the app is ready), so both apply the same rules
from :mod:`supervisor_app.slots`. Every slot is recorded through ``services.create_run`` with its
``(periodic task, slot)`` unique constraint: whoever inserts a slot first decides its fate, the
others get ``None`` and do nothing, however many beats and supervisors race.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.db.models import DateTimeField, ExpressionWrapper, F, OuterRef, Subquery
from django.db.models.functions import Now
from django.utils import timezone

from . import services, signals, slots
from .conf import supervisor_settings
from .models import ProcessHeartbeat, SupervisedRun, SupervisionPolicy
from .states import ACTIVE_STATUSES, RunStatus

if TYPE_CHECKING:
    from celery.schedules import crontab
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    from .supervisor import SweepReport

logger = logging.getLogger("supervisor_app")


# --------------------------------------------------------------------------- definitions


def supervised_task_names(app: Any = None) -> set[str]:
    """Names of the registered tasks that are ``SupervisedTask``s (the scheduler's business)."""
    from celery import current_app

    from .tasks import SupervisedTask

    app = app or current_app
    if id(app) not in _discovered:
        # Celery's autodiscovery runs only when a worker or beat starts; the supervisor, the admin
        # and validation need the registry too.
        app.loader.import_default_modules()
        _discovered.add(id(app))
    return {name for name, task in app.tasks.items() if isinstance(task, SupervisedTask)}


_discovered: set[int] = set()


@dataclass(frozen=True)
class ScheduleDef:
    """Everything needed to record the slots of one supervised periodic task."""

    pk: int
    name: str
    task_name: str
    rule: slots.Rule
    bounds: slots.Bounds
    #: Slots up to this instant are not judged: the schedule was created or edited then.
    anchor: datetime
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    policy: slots.SchedulePolicy
    run_policy: services.RunPolicy
    recipients: tuple[str, ...] = ()


def _duration(value: timedelta | None, setting: float | None) -> timedelta | None:
    if value is not None:
        return value
    return None if setting is None else timedelta(seconds=setting)


def _celery_solar(event: str, latitude: float, longitude: float, day: date) -> datetime | None:
    """The instant of a solar event on a UTC day, by Celery's ``solar`` (needs ``ephem``)."""
    from celery.schedules import solar

    start = datetime(day.year, day.month, day.day, tzinfo=slots.UTC)
    schedule = solar(event, latitude, longitude, nowfun=lambda: start)  # type: ignore[arg-type]
    at: datetime = start + schedule.remaining_estimate(start)
    return at if at.astimezone(slots.UTC).date() == day else None


class ParsedCrontab(NamedTuple):
    """A crontab parsed once: Celery's schedule (the beat entry's) and the slot rule made from it."""

    celery: crontab
    rule: slots.Crontab


#: Distinct crontabs kept parsed (4 to 12 KB each). Schedules usually share a few crontabs; the bound
#: keeps crontabs edited again and again in the admin from growing a long-running beat's memory. With
#: more distinct crontabs than this, each schedule's is still parsed once per load, not four times.
CRONTAB_CACHE_SIZE = 1024


@lru_cache(maxsize=CRONTAB_CACHE_SIZE)
def parse_crontab(
    minute: str,
    hour: str,
    day_of_week: str,
    day_of_month: str,
    month_of_year: str,
    tz: tzinfo,
    tz_aware: bool = True,
) -> ParsedCrontab:
    """Parse a crontab once for every schedule that has these values (cached on the values).

    Parsing is most of the cost of loading a schedule: the beat reloads every schedule whenever one
    changes, and django-celery-beat's ``CrontabSchedule.schedule`` parses the fields twice per call.
    ``tz_aware`` is django-celery-beat's ``DJANGO_CELERY_BEAT_TZ_AWARE``: its ``TzAwareCrontab``, else a
    plain Celery crontab, as that property returns. Both are immutable once built, so entries share one.
    """
    from celery.schedules import crontab
    from django_celery_beat.tzcrontab import TzAwareCrontab

    fields = {
        "minute": minute,
        "hour": hour,
        "day_of_week": day_of_week,
        "day_of_month": day_of_month,
        "month_of_year": month_of_year,
    }
    # Any: celery-types does not declare the parsed sets (``minute`` etc.) of a crontab.
    cron: Any = TzAwareCrontab(**fields, tz=tz) if tz_aware else crontab(**fields)
    rule = slots.Crontab(
        minutes=frozenset(cron.minute),
        hours=frozenset(cron.hour),
        days_of_week=frozenset(cron.day_of_week),
        days_of_month=frozenset(cron.day_of_month),
        months=frozenset(cron.month_of_year),
        tz=tz,
    )
    return ParsedCrontab(cron, rule)


def parsed_crontab(row: CrontabSchedule) -> ParsedCrontab:
    """The parsed form of a crontab row, by its values (an edited row gets a new one)."""
    from django.conf import settings

    tz = row.timezone
    return parse_crontab(
        row.minute,
        row.hour,
        row.day_of_week,
        row.day_of_month,
        row.month_of_year,
        ZoneInfo(tz) if isinstance(tz, str) else tz,
        bool(getattr(settings, "DJANGO_CELERY_BEAT_TZ_AWARE", True)),
    )


def celery_schedule(pt: PeriodicTask) -> Any:
    """``pt.schedule`` (Celery's schedule of a periodic task), a crontab's parsed only once."""
    if pt.crontab_id:
        return parsed_crontab(pt.crontab).celery
    return pt.schedule


def rule_for(pt: PeriodicTask) -> slots.Rule:
    """The pure slot rule of a django-celery-beat schedule."""
    if pt.interval_id:
        every: timedelta = pt.interval.schedule.run_every
        return slots.Interval(every, pt.start_time or slots.EPOCH)
    if pt.crontab_id:
        return parsed_crontab(pt.crontab).rule
    if pt.solar_id:
        return slots.Solar(pt.solar.event, float(pt.solar.latitude), float(pt.solar.longitude), _celery_solar)
    if pt.clocked_id:
        return slots.Clocked(pt.clocked.clocked_time)
    raise ValueError(f"periodic task {pt.name!r} has no schedule")


def _policy_row(pt: PeriodicTask) -> SupervisionPolicy | None:
    try:
        return pt.supervision  # type: ignore[no-any-return]
    except SupervisionPolicy.DoesNotExist:
        return None


@dataclass
class PolicyDefaults:
    """The settings a schedule's policy falls back on, read once for a load of many schedules (the
    beat's, a sweep's) instead of a dozen settings lookups per schedule. Read when the load starts,
    never at import, so changed settings apply from the next load."""

    alert_grace: float | None
    catch_up: str
    catch_up_window: float | None
    overlap: str
    start_window: float | None
    alert_recipients: tuple[str, ...]
    #: ``task.run_policy()`` of the tasks met so far.
    run_policies: dict[Any, services.RunPolicy] = field(default_factory=dict)

    @classmethod
    def read(cls) -> PolicyDefaults:
        s = supervisor_settings
        return cls(
            alert_grace=s.ALERT_GRACE,
            catch_up=s.CATCH_UP,
            catch_up_window=s.CATCH_UP_WINDOW,
            overlap=s.OVERLAP,
            start_window=s.START_WINDOW,
            alert_recipients=tuple(s.ALERT_RECIPIENTS),
        )

    def run_policy(self, task: Any) -> services.RunPolicy:
        policy = self.run_policies.get(task)
        if policy is None:
            policy = self.run_policies[task] = task.run_policy()
        return policy


def definition_for(pt: PeriodicTask, task: Any, defaults: PolicyDefaults | None = None) -> ScheduleDef:
    """Resolve a supervised periodic task: its rule, its policy (row, else settings), its run policy.

    ``defaults``: the settings read once for many schedules (by default, read now).
    """
    s = defaults or PolicyDefaults.read()
    row = _policy_row(pt)
    base = s.run_policy(task)
    run_policy = services.RunPolicy(
        max_attempts=(row.max_attempts if row and row.max_attempts else base.max_attempts),
        lease_timeout=(row.lease_timeout.total_seconds() if row and row.lease_timeout else base.lease_timeout),
        start_timeout=base.start_timeout,
        max_runtime=(row.max_runtime.total_seconds() if row and row.max_runtime else base.max_runtime),
    )
    policy = slots.SchedulePolicy(
        grace=_duration(row.alert_grace if row else None, s.alert_grace) or timedelta(0),
        catch_up=cast(slots.CatchUpPolicy, row.catch_up if row and row.catch_up else s.catch_up),
        catch_up_window=_duration(row.catch_up_window if row else None, s.catch_up_window) or timedelta(0),
        overlap=cast(slots.OverlapPolicy, row.overlap if row and row.overlap else s.overlap),
        start_window=_duration(row.start_window if row else None, s.start_window),
    )
    recipients = tuple(row.recipients()) if row and row.alert_recipients else s.alert_recipients
    options = {
        k: getattr(pt, k) for k in ("queue", "exchange", "routing_key", "priority") if getattr(pt, k) is not None
    }
    return ScheduleDef(
        pk=pt.pk,
        name=pt.name,
        task_name=pt.task,
        rule=rule_for(pt),
        bounds=slots.Bounds(pt.start_time, pt.expires),
        anchor=pt.date_changed,
        args=json.loads(pt.args or "[]"),
        kwargs=json.loads(pt.kwargs or "{}"),
        options=options,
        policy=policy,
        run_policy=run_policy,
        recipients=recipients,
    )


def last_slot_subquery() -> Subquery:
    """The latest recorded slot of a periodic task: a backward scan of the unique-slot index."""
    return Subquery(
        SupervisedRun.objects.filter(periodic_task_id=OuterRef("pk"), scheduled_for__isnull=False)
        .order_by("-scheduled_for")
        .values("scheduled_for")[:1]
    )


def supervised_periodic_tasks(names: Iterable[str]) -> Any:
    from django_celery_beat.models import PeriodicTask

    return (
        PeriodicTask.objects.filter(enabled=True, task__in=list(names))
        .select_related("interval", "crontab", "solar", "clocked", "supervision")
        .annotate(last_slot=last_slot_subquery())
    )


def cursor_for(defn: ScheduleDef, last_slot: datetime | None, now: datetime) -> datetime:
    """Slots after this instant are still to be decided: after the last recorded one, the schedule's
    last edit, and the look-back horizon."""
    lookback = now - timedelta(seconds=supervisor_settings.SCHEDULE_LOOKBACK)
    return max(t for t in (last_slot, defn.anchor, lookback) if t is not None)


def db_now() -> datetime:
    """The database's clock: the supervisor judges lateness by one clock, whatever its host's says."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            value: datetime = cursor.fetchone()[0]
            return value
    return timezone.now()


# --------------------------------------------------------------------------- recording slots


@dataclass
class RecordCounts:
    run: int = 0
    caught_up: int = 0
    missed: int = 0
    skipped: int = 0
    held: int = 0
    replaced: int = 0
    lost_race: int = 0
    missed_runs: list[SupervisedRun] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int) and v}

    def add(self, other: RecordCounts) -> None:
        for key, value in vars(other).items():
            if isinstance(value, int):
                setattr(self, key, getattr(self, key) + value)


def _create(
    defn: ScheduleDef, slot: datetime, status: str = RunStatus.QUEUED, hold: bool = False
) -> SupervisedRun | None:
    return services.create_run(
        defn.task_name,
        defn.args,
        defn.kwargs,
        defn.run_policy,
        options=defn.options,
        periodic_task_id=defn.pk,
        scheduled_for=slot,
        status=status,
        # A held run is recorded unpublished (countdown) and parked below with no next check.
        countdown=3600.0 if hold else None,
    )


def _is_held(status: str, next_check_at: datetime | None) -> bool:
    """A queue_one run waiting for the active run of its schedule: queued, never published."""
    return status == RunStatus.QUEUED and next_check_at is None


def _start(defn: ScheduleDef, slot: datetime, counts: RecordCounts) -> None:
    """Record an on-time or caught-up slot, as the overlap policy says."""
    overlap = defn.policy.overlap
    with transaction.atomic():
        if overlap == "allow":
            run = _create(defn, slot)
            counts.run += run is not None
            counts.lost_race += run is None
            return
        # Only schedules with an overlap policy pay for this read (the slot index, one schedule's rows).
        active = list(
            SupervisedRun.objects.filter(periodic_task_id=defn.pk, status__in=ACTIVE_STATUSES).values_list(
                "pk", "status", "next_check_at"
            )
        )
        if not active:
            run = _create(defn, slot)
            counts.run += run is not None
        elif overlap == "skip" or (overlap == "queue_one" and any(_is_held(s, n) for _, s, n in active)):
            run = _create(defn, slot, status=RunStatus.SKIPPED)
            counts.skipped += run is not None
        elif overlap == "queue_one":
            run = _create(defn, slot, hold=True)
            if run is not None:
                SupervisedRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(next_check_at=None)
                counts.held += 1
        else:  # replace: insert first, so a beat that lost the race never cancels the winner's run
            run = _create(defn, slot)
            if run is not None:
                counts.run += 1
                for pk, _status, _next in active:
                    if services.request_cancel(pk) is not None:
                        counts.replaced += 1
        counts.lost_race += run is None


def record(defn: ScheduleDef, decisions: Sequence[slots.Decision], reason: str = "") -> RecordCounts:
    """Record each decided slot (run, caught up or missed) and alert the missed ones."""
    counts = RecordCounts()
    for decision in decisions:
        if decision.action == "miss":
            with transaction.atomic():
                run = _create(defn, decision.slot, status=RunStatus.MISSED)
                if run is None:
                    counts.lost_race += 1
                    continue
                why = reason or "no run was recorded for the slot within its grace period"
                SupervisedRun.objects.filter(pk=run.pk).update(last_error=why)
                run.last_error = why
            counts.missed += 1
            counts.missed_runs.append(run)
            continue
        before = counts.run + counts.held
        _start(defn, decision.slot, counts)
        if decision.action == "catch_up" and counts.run + counts.held > before:
            counts.caught_up += 1
            logger.warning("schedule %r: slot %s was late and is caught up now", defn.name, decision.slot.isoformat())
    if counts.missed_runs:
        alert_missed(defn.name, defn.recipients, counts.missed_runs)
    return counts


def alert_missed(schedule: str, recipients: Sequence[str], runs: Sequence[SupervisedRun]) -> None:
    """Signal and log missed slots (after commit: a rolled-back record alerts nobody).

    Mail and webhook alerts are :mod:`supervisor_app.alerts`' receivers of ``run_missed``: the
    slots of one call go out as one ``batch``, so they make one alert.
    """
    listed = ", ".join(r.scheduled_for.isoformat() if r.scheduled_for else f"run {r.pk}" for r in runs[:20])
    more = f" and {len(runs) - 20} more" if len(runs) > 20 else ""
    reason = runs[0].last_error
    logger.warning("schedule %r missed %d slot(s): %s%s (%s)", schedule, len(runs), listed, more, reason)

    def notify() -> None:
        batch = list(runs)
        for run in runs:
            signals.run_missed.send_robust(sender=SupervisedRun, run=run, reason=run.last_error, batch=batch)

    transaction.on_commit(notify)


# --------------------------------------------------------------------------- beat side


@dataclass(frozen=True)
class Firing:
    """One schedule fired by the beat: its unrecorded slots in ``(since, upto]`` are to be decided."""

    defn: ScheduleDef
    since: datetime
    upto: datetime


def fire(defn: ScheduleDef, since: datetime, now: datetime) -> RecordCounts:
    """The beat: decide and record every unrecorded slot in ``(since, now]``."""
    [result] = fire_many([Firing(defn, since, now)])
    if isinstance(result, Exception):
        raise result
    return result


def fire_many(firings: Sequence[Firing]) -> list[RecordCounts | Exception]:
    """The beat: decide and record the due slots of many schedules at once, one result per firing.

    The on-time and caught-up slots of schedules that allow overlap (the default) need nothing but
    their insert: they are recorded together by ``services.create_slot_runs`` (a multi-row insert
    that skips slots recorded already, then one publish per new run, through one producer). A
    schedule with an overlap policy must read its active runs before each slot, and a missed slot
    carries an alert: those go one by one through :func:`record`, and only they pay for it.

    A firing that fails (database down, arguments that are not JSON) comes back as its exception;
    the others are recorded as usual.
    """
    limit = int(supervisor_settings.SCHEDULE_MAX_SLOTS)
    results: list[RecordCounts | Exception] = [RecordCounts() for _ in firings]
    batch: list[tuple[int, slots.Decision]] = []
    one_by_one: list[tuple[int, list[slots.Decision]]] = []
    for i, firing in enumerate(firings):
        defn = firing.defn
        try:
            due = slots.slots_between(defn.rule, firing.since, firing.upto, defn.bounds, limit=limit)
            decisions = slots.plan(due, firing.upto, defn.policy)
            if defn.policy.overlap == "allow":
                starts = [d for d in decisions if d.action != "miss"]
                if starts:
                    services.check_json(defn.task_name, defn.args, defn.kwargs)
                    batch += [(i, d) for d in starts]
                decisions = [d for d in decisions if d.action == "miss"]
            if decisions:
                one_by_one.append((i, decisions))
        except Exception as exc:
            results[i] = exc
    if batch:
        _record_batch(firings, batch, results)
    for i, decisions in one_by_one:
        counts = results[i]
        if isinstance(counts, Exception):
            continue
        try:
            counts.add(record(firings[i].defn, decisions))
        except Exception as exc:
            results[i] = exc
    return results


def _record_batch(
    firings: Sequence[Firing], batch: Sequence[tuple[int, slots.Decision]], results: list[RecordCounts | Exception]
) -> None:
    wanted = []
    for i, decision in batch:
        defn = firings[i].defn
        wanted.append(
            services.SlotRun(
                periodic_task_id=defn.pk,
                scheduled_for=decision.slot,
                task_name=defn.task_name,
                args=defn.args,
                kwargs=defn.kwargs,
                policy=defn.run_policy,
                options=defn.options,
            )
        )
    try:
        created = services.create_slot_runs(wanted)
    except Exception as exc:
        # Whatever a committed part of the batch recorded stays recorded (and published); the next
        # fire of these schedules finds those slots taken and records the others.
        for i, _ in batch:
            results[i] = exc
        return
    recorded = {(s.periodic_task_id, s.scheduled_for) for _, s in created}
    for i, decision in batch:
        counts = results[i]
        if isinstance(counts, Exception):
            continue
        defn = firings[i].defn
        if (defn.pk, decision.slot) not in recorded:
            counts.lost_race += 1
            continue
        counts.run += 1
        if decision.action == "catch_up":
            counts.caught_up += 1
            logger.warning("schedule %r: slot %s was late and is caught up now", defn.name, decision.slot.isoformat())


# --------------------------------------------------------------------------- supervisor side


def check_schedules(
    now: datetime, definitions: Sequence[tuple[ScheduleDef, datetime | None]], deadline: float
) -> RecordCounts:
    """Overdue unrecorded slots get the catch-up policy: run late or ``missed`` + alert.

    Slots still inside their grace are left to the beat, so this works with a healthy beat, a
    slow one, or none at all.
    """
    total = RecordCounts()
    limit = int(supervisor_settings.SCHEDULE_MAX_SLOTS)
    for defn, last_slot in definitions:
        if time.monotonic() > deadline:
            break
        since = cursor_for(defn, last_slot, now)
        due = slots.slots_between(defn.rule, since, now - defn.policy.grace, defn.bounds, limit=limit)
        if not due:
            continue
        following = slots.next_slot_after(defn.rule, due[-1], defn.bounds)
        elsewhere = following is not None and following <= now
        decisions = [d for d in slots.plan(due, now, defn.policy, elsewhere) if d.action != "run"]
        total.add(record(defn, decisions))
    return total


def expire_unstarted(now: datetime, by_pk: dict[int, ScheduleDef]) -> int:
    """Queued scheduled runs not started inside their start window become ``missed``.

    The window counts from the slot, or from the recording for a caught-up (late-recorded) run.
    Reads only queued rows (a small, indexed set), never the history.
    """
    windows = {pk: d.policy.start_window for pk, d in by_pk.items() if d.policy.start_window is not None}
    if not windows:
        return 0
    rows = SupervisedRun.objects.filter(
        status=RunStatus.QUEUED, periodic_task_id__in=list(windows), attempt=1, started_at__isnull=True
    ).values_list("pk", "periodic_task_id", "scheduled_for", "created_at")
    expired: dict[int, list[SupervisedRun]] = {}
    for pk, pt_id, slot, created in rows:
        window = windows[pt_id]
        start = max(t for t in (slot, created) if t is not None)
        if now - start <= window:
            continue
        why = f"not started within its start window ({window})"
        with transaction.atomic():
            if not SupervisedRun.objects.filter(
                pk=pk, attempt=1, status=RunStatus.QUEUED, started_at__isnull=True
            ).update(status=RunStatus.MISSED, finished_at=Now(), next_check_at=None, last_error=why):
                continue  # a worker claimed it meanwhile
        run = SupervisedRun.objects.get(pk=pk)
        expired.setdefault(pt_id, []).append(run)
    for pt_id, runs in expired.items():
        alert_missed(by_pk[pt_id].name, by_pk[pt_id].recipients, runs)
    return sum(len(r) for r in expired.values())


def release_held() -> int:
    """Publish a ``queue_one`` run whose schedule has no other active run any more."""
    released = 0
    held = SupervisedRun.objects.filter(
        status=RunStatus.QUEUED, next_check_at__isnull=True, periodic_task__isnull=False
    ).values_list("pk", "periodic_task_id")
    for pk, pt_id in held:
        if SupervisedRun.objects.filter(periodic_task_id=pt_id, status__in=ACTIVE_STATUSES).exclude(pk=pk).exists():
            continue
        with transaction.atomic():
            due = ExpressionWrapper(Now() + F("start_timeout"), output_field=DateTimeField())
            if SupervisedRun.objects.filter(pk=pk, status=RunStatus.QUEUED, next_check_at__isnull=True).update(
                next_check_at=due, publish_count=1
            ):
                released += 1
                transaction.on_commit(lambda pk=pk: services.publish_by_id(pk))  # type: ignore[misc]
    return released


_last_stale_warning = 0.0


def beat_is_stale(now: datetime) -> bool:
    newest = ProcessHeartbeat.objects.filter(kind=ProcessHeartbeat.Kind.BEAT).order_by("-last_seen").first()
    return newest is None or (now - newest.last_seen).total_seconds() > supervisor_settings.stale_after


def sweep_schedules(report: SweepReport, deadline: float) -> None:
    """The supervisor phase (registered in ``EXTRA_PHASES``): missed slots, start windows, queue_one."""
    global _last_stale_warning
    names = supervised_task_names()
    if not names:
        return
    from celery import current_app

    now = db_now()
    definitions: list[tuple[ScheduleDef, datetime | None]] = []
    defaults = PolicyDefaults.read()
    for pt in supervised_periodic_tasks(names):
        try:
            definitions.append((definition_for(pt, current_app.tasks[pt.task], defaults), pt.last_slot))
        except Exception:  # one broken schedule must not hide the others
            logger.exception("schedule %r cannot be supervised", pt.name)
    counts = check_schedules(now, definitions, deadline)
    expired = expire_unstarted(now, {d.pk: d for d, _ in definitions})
    released = release_held()
    stale = bool(definitions) and beat_is_stale(now)
    if stale and time.monotonic() - _last_stale_warning > 60:
        _last_stale_warning = time.monotonic()
        logger.warning("no beat has recorded its liveness recently: schedules rely on the supervisor's catch-up")
    report.extra["schedules"] = {
        **counts.as_dict(),
        "expired": expired,
        "released": released,
        "beat_stale": stale,
    }


def install() -> None:
    """Register the sweep phase (idempotent; called from ``AppConfig.ready``)."""
    from . import supervisor

    if sweep_schedules not in supervisor.EXTRA_PHASES:
        supervisor.EXTRA_PHASES.append(sweep_schedules)


# Imported by AppConfig.ready(): registering the phase here keeps apps.py to one line.
install()
