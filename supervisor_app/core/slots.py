"""Slot times of schedules, and what to do with slots that are late: pure functions, no database.

A *slot* is the instant a schedule says a run should start. Slots are computed from the schedule
alone (never from the moment a beat happened to wake up), so independent beats, a restarted beat and
the supervisor all name the same slot the same way, and the ``(periodic task, slot)`` unique
constraint can keep exactly one run per slot. Every slot is returned as an aware UTC ``datetime``.

Rules (documented in ``docs/scheduling.md``):

* **Interval**: slots are ``anchor + k * every``. The anchor is the periodic task's ``start_time``
  when set, else the Unix epoch, so "every hour" fires on the hour and every beat agrees.
* **Crontab**: matched on the wall clock of the crontab's timezone, with Celery's semantics (the
  day must match *both* ``day_of_month`` and ``day_of_week``).

  - *Fall back* (a wall time occurs twice): a slot runs **once, at the first occurrence** — a
    01:30 crontab runs once on fall-back day. Exception: a crontab whose hour field covers all 24
    hours (``*/15 * * * *``) follows elapsed time and runs in both occurrences, as Vixie cron does;
    otherwise "every 15 minutes" would stop for an hour.
  - *Spring forward* (a wall time does not exist): the slot runs at **the first valid instant after
    the gap** (02:30 in a 02:00→03:00 gap runs at 03:00). Several slots that fall in the same gap
    collapse into that one instant, so they run once.
* **Solar**: the event's instant on each UTC day, truncated to the second.
* **Clocked**: one slot, at the clocked time.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Literal

from .policies import CatchUp, Overlap

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_DAY = timedelta(days=1)
#: How far ahead ``next_slot_after`` looks for a crontab or solar slot (Feb 29 on a Monday: 28 years).
HORIZON = timedelta(days=366 * 29)


# --------------------------------------------------------------------------- schedule rules


@dataclass(frozen=True)
class Interval:
    every: timedelta
    anchor: datetime = EPOCH

    def __post_init__(self) -> None:
        if self.every <= timedelta(0):
            raise ValueError(f"an interval must be positive, got {self.every}")
        if self.anchor.tzinfo is None:
            raise ValueError("the anchor of an interval must be timezone-aware")


@dataclass(frozen=True)
class Crontab:
    """A crontab as sets of matching values. ``days_of_week``: 0 = Sunday, as in Celery."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_week: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    tz: tzinfo = UTC


@dataclass(frozen=True)
class Clocked:
    at: datetime


#: ``(event, latitude, longitude, day) -> instant or None`` (polar day/night has no sunrise).
SolarCalculator = Callable[[str, float, float, date], "datetime | None"]


@dataclass(frozen=True)
class Solar:
    event: str
    latitude: float
    longitude: float
    #: Injected so the slot rule can be tested without astronomy; the scheduler passes one built on
    #: Celery's ``solar`` (which needs the ``ephem`` package).
    calculator: SolarCalculator


Rule = Interval | Crontab | Clocked | Solar


@dataclass(frozen=True)
class Bounds:
    """A periodic task's ``start_time`` / ``expires``: no slot before or after them."""

    not_before: datetime | None = None
    not_after: datetime | None = None

    def admits(self, t: datetime) -> bool:
        return (self.not_before is None or t >= self.not_before) and (self.not_after is None or t <= self.not_after)


NO_BOUNDS = Bounds()


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: slots are computed between aware instants")
    return t.astimezone(UTC)


# --------------------------------------------------------------------------- crontab wall-clock rules


def resolve_wall_time(naive: datetime, tz: tzinfo, both_folds: bool = False) -> list[datetime]:
    """The UTC instants a wall-clock time of ``tz`` stands for, by the DST rules above.

    Normal time: one instant. Repeated (fall back): the first occurrence, or both with
    ``both_folds``. Nonexistent (spring forward): the first valid instant after the gap.
    """
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first.astimezone(tz).replace(tzinfo=None) == naive:  # exists twice: fall back
        early, late = sorted((first, second))
        return [early, late] if both_folds else [early]
    # In a gap, fold=1 reads the wall time with the offset from before the transition and lands
    # before it, fold=0 with the offset after and lands after it: the transition lies between.
    return [_transition(tz, min(first, second), max(first, second))]


def _transition(tz: tzinfo, lo: datetime, hi: datetime) -> datetime:
    """First instant in ``(lo, hi]`` whose UTC offset is ``hi``'s (binary search to the second)."""
    target = hi.astimezone(tz).utcoffset()
    lo_s, hi_s = int(lo.timestamp()), int(hi.timestamp())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(tz).utcoffset() == target:
            hi_s = mid
        else:
            lo_s = mid
    return datetime.fromtimestamp(hi_s, UTC)


def _day_matches(rule: Crontab, day: date) -> bool:
    return (
        day.month in rule.months
        and day.day in rule.days_of_month
        and (day.isoweekday() % 7) in rule.days_of_week  # Celery: 0 = Sunday
    )


@lru_cache(maxsize=4096)
def _minutes_of_day(hours: frozenset[int], minutes: frozenset[int]) -> tuple[int, ...]:
    return tuple(sorted(h * 60 + m for h in hours for m in minutes))


def _steady_offset(tz: tzinfo, day: date) -> timedelta | None:
    """The UTC offset of ``tz`` all day long, or None on a day with a DST transition.

    Transitions happen at most once a day, so equal offsets at both ends of the day mean none.
    """
    start = datetime(day.year, day.month, day.day, tzinfo=tz).utcoffset()
    end = datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=tz).utcoffset()
    return start if start == end else None


@lru_cache(maxsize=8192)
def _crontab_day(rule: Crontab, day: date) -> tuple[datetime, ...]:
    # Cached: beat asks every schedule for its next slot at every heap rebuild, and schedules that
    # share a crontab share the answer. Computing a day is cheap anyway on the common days without
    # a DST transition (arithmetic, no time-zone lookups per slot).
    if not _day_matches(rule, day):
        return ()
    offset = _steady_offset(rule.tz, day)
    if offset is not None:
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC) - offset
        return tuple(midnight + timedelta(minutes=m) for m in _minutes_of_day(rule.hours, rule.minutes))
    return tuple(_crontab_day_with_transition(rule, day))


def _crontab_day_with_transition(rule: Crontab, day: date) -> list[datetime]:
    both = rule.hours >= frozenset(range(24))
    out: set[datetime] = set()  # a set: slots in one spring-forward gap collapse into one
    for hour in rule.hours:
        for minute in rule.minutes:
            out.update(resolve_wall_time(datetime(day.year, day.month, day.day, hour, minute), rule.tz, both))
    return sorted(out)


def _days(rule: Crontab | Solar, start: datetime) -> tuple[date, Callable[[date], Sequence[datetime]]]:
    """The first day to look at for slots after ``start``, and the sorted slots of a day."""
    if isinstance(rule, Crontab):
        # One day earlier: a local day's slots can lie before its UTC date.
        return start.astimezone(rule.tz).date() - ONE_DAY, lambda d: _crontab_day(rule, d)

    def solar_day(day: date) -> list[datetime]:
        at = rule.calculator(rule.event, rule.latitude, rule.longitude, day)
        return [] if at is None else [_utc(at).replace(microsecond=0)]

    return start.date() - ONE_DAY, solar_day


# --------------------------------------------------------------------------- public API


def slots_between(
    rule: Rule, start: datetime, end: datetime, bounds: Bounds = NO_BOUNDS, limit: int | None = None
) -> list[datetime]:
    """Slots ``t`` with ``start < t <= end``, ascending. With ``limit``, only the latest ``limit``."""
    start, end = _utc(start), _utc(end)
    if bounds.not_before is not None:
        # Slots at not_before itself count: move the exclusive start just before it.
        start = max(start, _utc(bounds.not_before) - timedelta(microseconds=1))
    if bounds.not_after is not None:
        end = min(end, _utc(bounds.not_after))
    if end <= start:
        return []
    out: list[datetime]
    if isinstance(rule, Interval):
        anchor = _utc(rule.anchor)
        first = max((start - anchor) // rule.every + 1, 0)
        last = (end - anchor) // rule.every
        if limit is not None:
            first = max(first, last - limit + 1)
        return [anchor + k * rule.every for k in range(first, last + 1)]
    if isinstance(rule, Clocked):
        at = _utc(rule.at)
        return [at] if start < at <= end else []
    day, slots_of = _days(rule, start)
    last_day = end.date() + ONE_DAY
    out = []
    while day <= last_day:
        # A day's slots are sorted: two binary searches, not a scan (beat asks this of every
        # schedule it fires, and an every-minute crontab has 1,440 slots a day).
        day_slots = slots_of(day)
        out.extend(day_slots[bisect_right(day_slots, start) : bisect_right(day_slots, end)])
        day += ONE_DAY
    return out[-limit:] if limit is not None else out


def next_slot_after(rule: Rule, after: datetime, bounds: Bounds = NO_BOUNDS) -> datetime | None:
    """The first slot strictly after ``after``, or None when the schedule never fires again."""
    after = _utc(after)
    if bounds.not_before is not None:
        after = max(after, _utc(bounds.not_before) - timedelta(microseconds=1))
    found: datetime | None
    if isinstance(rule, Interval):
        anchor = _utc(rule.anchor)
        found = anchor + max((after - anchor) // rule.every + 1, 0) * rule.every
    elif isinstance(rule, Clocked):
        at = _utc(rule.at)
        found = at if at > after else None
    elif isinstance(rule, Crontab):
        # Days are sorted tuples: a binary search finds the next slot without scanning the day.
        found = None
        day = after.astimezone(rule.tz).date() - ONE_DAY
        stop_day = (after + HORIZON).date()
        while found is None and day <= stop_day:
            day_slots = _crontab_day(rule, day)
            i = bisect_right(day_slots, after)
            if i < len(day_slots):
                found = day_slots[i]
            day += ONE_DAY
    else:
        found = None
        day, slots_of = _days(rule, after)
        stop = after + HORIZON
        while found is None and datetime(day.year, day.month, day.day, tzinfo=UTC) <= stop:
            found = next((t for t in slots_of(day) if t > after), None)
            day += ONE_DAY
    if found is None or not bounds.admits(found):
        return None
    return found


# --------------------------------------------------------------------------- late slots


@dataclass(frozen=True)
class SchedulePolicy:
    """The scheduling part of a schedule's supervision policy, resolved against the settings."""

    grace: timedelta
    catch_up: CatchUp = CatchUp.LATEST
    catch_up_window: timedelta = timedelta(hours=1)
    overlap: Overlap = Overlap.ALLOW
    start_window: timedelta | None = None


Action = Literal["run", "catch_up", "miss"]


@dataclass(frozen=True)
class Decision:
    slot: datetime
    #: ``run``: on time; ``catch_up``: overdue but run anyway by the catch-up policy; ``miss``.
    action: Action


def plan(
    due: Sequence[datetime], now: datetime, policy: SchedulePolicy, on_time_elsewhere: bool = False
) -> list[Decision]:
    """Decide the fate of unrecorded slots ``due`` (ascending, all ``<= now``).

    A slot at most ``grace`` old is on time and runs. Older slots are *overdue* (the beat was down,
    or slow beyond the grace): the catch-up policy decides —

    * ``none``: every overdue slot is missed;
    * ``latest``: the newest overdue slot runs if it is inside the catch-up window and no on-time
      slot exists (the schedule is about to run anyway); every other one is missed;
    * ``all``: every overdue slot inside the catch-up window runs, older ones are missed.

    ``on_time_elsewhere`` tells that an on-time slot exists outside ``due`` (the supervisor looks
    only at overdue slots and leaves on-time ones to the beat).
    """
    now = _utc(now)
    on_time = [t for t in due if now - t <= policy.grace]
    overdue = [t for t in due if now - t > policy.grace]
    catch: set[datetime] = set()
    if policy.catch_up == CatchUp.ALL:
        catch = {t for t in overdue if now - t <= policy.catch_up_window}
    elif policy.catch_up == CatchUp.LATEST and overdue and not on_time and not on_time_elsewhere:
        if now - overdue[-1] <= policy.catch_up_window:
            catch = {overdue[-1]}
    decisions = [Decision(t, "catch_up" if t in catch else "miss") for t in overdue]
    decisions += [Decision(t, "run") for t in on_time]
    return decisions
