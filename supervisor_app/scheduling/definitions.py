"""Schedule definitions: a django-celery-beat ``PeriodicTask`` and its supervision policy, resolved
once into a :class:`ScheduleDef` (slot rule, policies, publishing options) that the beat and the
supervisor's sweep both use, so both apply the same rules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

from django.db.models import OuterRef, Subquery

from ..broker import schedule_options
from ..conf import supervisor_settings
from ..core import arguments, slots
from ..core.policies import CatchUp, Overlap, RunPolicy, parse_choice
from ..models import SupervisedRun, SupervisionPolicy

if TYPE_CHECKING:
    from celery.schedules import crontab
    from django_celery_beat.models import CrontabSchedule, PeriodicTask


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
    run_policy: RunPolicy
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
    catch_up: CatchUp
    catch_up_window: float | None
    overlap: Overlap
    start_window: float | None
    alert_recipients: tuple[str, ...]
    #: ``task.run_policy()`` of the tasks met so far.
    run_policies: dict[Any, RunPolicy] = field(default_factory=dict)

    @classmethod
    def read(cls) -> PolicyDefaults:
        s = supervisor_settings
        return cls(
            alert_grace=s.ALERT_GRACE,
            # Checked at start-up by the system checks; parsed again here because beat and workers do
            # not run the checks: an invalid value fails the load loudly instead of acting as another.
            catch_up=parse_choice(CatchUp, s.CATCH_UP, "SUPERVISOR_CATCH_UP"),
            catch_up_window=s.CATCH_UP_WINDOW,
            overlap=parse_choice(Overlap, s.OVERLAP, "SUPERVISOR_OVERLAP"),
            start_window=s.START_WINDOW,
            alert_recipients=tuple(s.ALERT_RECIPIENTS),
        )

    def run_policy(self, task: Any) -> RunPolicy:
        policy = self.run_policies.get(task)
        if policy is None:
            policy = self.run_policies[task] = task.run_policy()
        return policy


def definition_for(pt: PeriodicTask, task: Any, defaults: PolicyDefaults | None = None) -> ScheduleDef:
    """Resolve a supervised periodic task: its rule, its policy (row, else settings), its run policy and
    its publishing options (the same as ``DatabaseScheduler`` gives a plain periodic task's messages).

    ``defaults``: the settings read once for many schedules (by default, read now). Raises
    ``ValueError`` for a schedule that can't be read (its arguments not a JSON list and object, no
    schedule, an unknown policy choice): the caller leaves that one out and goes on with the others.
    """
    # Checked by type, not only as JSON: ``[1]`` as keyword arguments would fail every batch it joins.
    args, kwargs = arguments.parse_arguments(pt.args, pt.kwargs)
    s = defaults or PolicyDefaults.read()
    row = _policy_row(pt)
    base = s.run_policy(task)
    run_policy = RunPolicy(
        max_attempts=(row.max_attempts if row and row.max_attempts else base.max_attempts),
        lease_timeout=(row.lease_timeout.total_seconds() if row and row.lease_timeout else base.lease_timeout),
        start_timeout=base.start_timeout,
        max_runtime=(row.max_runtime.total_seconds() if row and row.max_runtime else base.max_runtime),
    )
    policy = slots.SchedulePolicy(
        grace=_duration(row.alert_grace if row else None, s.alert_grace) or timedelta(0),
        catch_up=parse_choice(CatchUp, row.catch_up, "catch_up") if row and row.catch_up else s.catch_up,
        catch_up_window=_duration(row.catch_up_window if row else None, s.catch_up_window) or timedelta(0),
        overlap=parse_choice(Overlap, row.overlap, "overlap") if row and row.overlap else s.overlap,
        start_window=_duration(row.start_window if row else None, s.start_window),
    )
    recipients = tuple(row.recipients()) if row and row.alert_recipients else s.alert_recipients
    return ScheduleDef(
        pk=pt.pk,
        name=pt.name,
        task_name=pt.task,
        rule=rule_for(pt),
        bounds=slots.Bounds(pt.start_time, pt.expires),
        anchor=pt.date_changed,
        args=args,
        kwargs=kwargs,
        options=schedule_options(pt),
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
