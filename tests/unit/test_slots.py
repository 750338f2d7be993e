"""Slot times and late-slot decisions: pure functions, a controlled clock, no database."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from supervisor_app.core import slots
from supervisor_app.core.policies import CatchUp
from supervisor_app.core.slots import UTC, Bounds, Clocked, Crontab, Interval, SchedulePolicy, Solar, plan

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")
ALL_DAYS = dict(days_of_week=frozenset(range(7)), days_of_month=frozenset(range(1, 32)), months=frozenset(range(1, 13)))


def cron(minutes: set[int], hours: set[int] | range, tz: ZoneInfo = NY, **kw: frozenset[int]) -> Crontab:
    fields = {**ALL_DAYS, **kw}
    return Crontab(frozenset(minutes), frozenset(hours), tz=tz, **fields)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(slots_: list[datetime], tz: ZoneInfo = NY) -> list[str]:
    return [t.astimezone(tz).isoformat() for t in slots_]


# --------------------------------------------------------------------------- DST


def test_daily_0130_runs_once_on_fall_back_day_at_the_first_occurrence() -> None:
    rule = cron({30}, {1})
    got = slots.slots_between(rule, utc(2024, 11, 2), utc(2024, 11, 5))
    assert local(got) == ["2024-11-02T01:30:00-04:00", "2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]


def test_every_30_minutes_follows_elapsed_time_through_the_repeated_hour() -> None:
    rule = cron({0, 30}, range(24))
    got = slots.slots_between(rule, utc(2024, 11, 3, 4, 59), utc(2024, 11, 3, 7, 0))
    # Both 01:00 and both 01:30 run: the crontab covers every hour, so it follows elapsed time.
    assert local(got) == [
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:30:00-04:00",
        "2024-11-03T01:00:00-05:00",
        "2024-11-03T01:30:00-05:00",
        "2024-11-03T02:00:00-05:00",
    ]
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(got))


def test_a_slot_in_the_spring_forward_gap_runs_at_the_first_instant_after_it() -> None:
    rule = cron({30}, {2})
    got = slots.slots_between(rule, utc(2024, 3, 9), utc(2024, 3, 12))
    assert local(got) == ["2024-03-09T02:30:00-05:00", "2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]


def test_slots_falling_in_one_gap_collapse_into_one_run() -> None:
    rule = cron({0, 15, 30, 45}, range(24))
    got = slots.slots_between(rule, utc(2024, 3, 10, 6, 30), utc(2024, 3, 10, 7, 20))
    assert local(got) == [
        "2024-03-10T01:45:00-05:00",
        "2024-03-10T03:00:00-04:00",  # 02:00, 02:15, 02:30, 02:45 and 03:00: one slot
        "2024-03-10T03:15:00-04:00",
    ]


def test_europe_dst_rules_too() -> None:
    rule = cron({30}, {2}, tz=PARIS)
    spring = slots.slots_between(rule, utc(2024, 3, 30), utc(2024, 4, 1))
    assert local(spring, PARIS) == ["2024-03-30T02:30:00+01:00", "2024-03-31T03:00:00+02:00"]
    autumn = slots.slots_between(rule, utc(2024, 10, 26), utc(2024, 10, 28))
    assert local(autumn, PARIS) == ["2024-10-26T02:30:00+02:00", "2024-10-27T02:30:00+02:00"]


def test_resolve_wall_time_rules() -> None:
    assert slots.resolve_wall_time(datetime(2024, 7, 1, 12, 0), NY) == [utc(2024, 7, 1, 16)]
    assert slots.resolve_wall_time(datetime(2024, 11, 3, 1, 30), NY) == [utc(2024, 11, 3, 5, 30)]
    assert slots.resolve_wall_time(datetime(2024, 11, 3, 1, 30), NY, both_folds=True) == [
        utc(2024, 11, 3, 5, 30),
        utc(2024, 11, 3, 6, 30),
    ]
    assert slots.resolve_wall_time(datetime(2024, 3, 10, 2, 30), NY) == [utc(2024, 3, 10, 7)]


# --------------------------------------------------------------------------- crontab fields


def test_crontab_day_of_month_and_day_of_week_must_both_match_as_in_celery() -> None:
    # 09:00 on Fridays the 13th (Celery ANDs the two day fields).
    rule = cron({0}, {9}, tz=ZoneInfo("UTC"), days_of_week=frozenset({5}), days_of_month=frozenset({13}))
    got = slots.slots_between(rule, utc(2024, 1, 1), utc(2025, 1, 1))
    assert [t.date() for t in got] == [date(2024, 9, 13), date(2024, 12, 13)]


def test_next_slot_after_finds_rare_crontabs_and_respects_bounds() -> None:
    leap = cron({0}, {0}, tz=ZoneInfo("UTC"), days_of_month=frozenset({29}), months=frozenset({2}))
    assert slots.next_slot_after(leap, utc(2024, 3, 1)) == utc(2028, 2, 29)
    assert slots.next_slot_after(leap, utc(2024, 3, 1), Bounds(not_after=utc(2027, 1, 1))) is None
    never = cron({0}, {0}, tz=ZoneInfo("UTC"), days_of_month=frozenset({31}), months=frozenset({2}))
    assert slots.next_slot_after(never, utc(2024, 1, 1)) is None


@pytest.mark.parametrize(
    ("rule", "start"),
    [
        (cron(set(range(60)), range(24)), utc(2024, 11, 2, 23, 58)),  # every minute through fall back (NY)
        (cron({0, 30}, range(24)), utc(2024, 3, 9, 22, 0)),  # spring forward (NY)
        (cron({15}, {2, 3}, tz=PARIS), utc(2024, 3, 30, 0, 0)),
    ],
)
def test_slots_between_agrees_with_next_slot_after_and_excludes_its_start(rule: Crontab, start: datetime) -> None:
    end = start + timedelta(days=2)
    expected = []
    t = slots.next_slot_after(rule, start)
    while t is not None and t <= end:
        expected.append(t)
        t = slots.next_slot_after(rule, t)
    assert slots.slots_between(rule, start, end) == expected and expected
    # Exclusive start, inclusive end, on a slot exactly.
    assert slots.slots_between(rule, expected[0], expected[1]) == [expected[1]]
    assert slots.slots_between(rule, expected[0], expected[0]) == []


# --------------------------------------------------------------------------- interval, clocked, solar


def test_interval_slots_are_aligned_on_the_anchor_so_every_beat_agrees() -> None:
    rule = Interval(timedelta(seconds=10))
    assert slots.slots_between(rule, utc(2024, 1, 1, 0, 0, 5), utc(2024, 1, 1, 0, 0, 30)) == [
        utc(2024, 1, 1, 0, 0, 10),
        utc(2024, 1, 1, 0, 0, 20),
        utc(2024, 1, 1, 0, 0, 30),
    ]
    assert slots.next_slot_after(rule, utc(2024, 1, 1, 0, 0, 10)) == utc(2024, 1, 1, 0, 0, 20)
    anchored = Interval(timedelta(hours=1), anchor=utc(2024, 1, 1, 0, 17))
    assert slots.next_slot_after(anchored, utc(2024, 1, 1, 5)) == utc(2024, 1, 1, 5, 17)
    # Before its anchor (start_time) an interval has no slots; the anchor itself is the first.
    bounds = Bounds(not_before=anchored.anchor)
    assert slots.slots_between(anchored, utc(2023, 12, 31), utc(2024, 1, 1, 1, 17), bounds) == [
        utc(2024, 1, 1, 0, 17),
        utc(2024, 1, 1, 1, 17),
    ]


def test_limit_keeps_the_latest_slots() -> None:
    rule = Interval(timedelta(seconds=1))
    got = slots.slots_between(rule, utc(2024, 1, 1), utc(2024, 1, 2), limit=3)
    assert got == [utc(2024, 1, 1, 23, 59, 58), utc(2024, 1, 1, 23, 59, 59), utc(2024, 1, 2)]


def test_invalid_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Interval(timedelta(0))
    with pytest.raises(ValueError, match="aware"):
        slots.slots_between(Interval(timedelta(seconds=1)), datetime(2024, 1, 1), utc(2024, 1, 2))


def test_clocked_has_one_slot() -> None:
    rule = Clocked(utc(2024, 5, 1, 12))
    assert slots.slots_between(rule, utc(2024, 5, 1), utc(2024, 5, 2)) == [utc(2024, 5, 1, 12)]
    assert slots.slots_between(rule, utc(2024, 5, 1, 12), utc(2024, 5, 2)) == []
    assert slots.next_slot_after(rule, utc(2024, 5, 1, 12)) is None


def test_solar_slots_are_the_daily_event_truncated_to_the_second() -> None:
    def sunrise(event: str, lat: float, lon: float, day: date) -> datetime | None:
        assert (event, lat, lon) == ("sunrise", 48.85, 2.35)
        return datetime(day.year, day.month, day.day, 6, 30, 12, 345678, tzinfo=UTC)

    rule = Solar("sunrise", 48.85, 2.35, sunrise)
    got = slots.slots_between(rule, utc(2024, 6, 1), utc(2024, 6, 3))
    assert got == [utc(2024, 6, 1, 6, 30, 12), utc(2024, 6, 2, 6, 30, 12)]
    assert slots.next_slot_after(rule, utc(2024, 6, 2, 7)) == utc(2024, 6, 3, 6, 30, 12)


# --------------------------------------------------------------------------- late slots


NOW = utc(2024, 1, 1, 12)
MIN = timedelta(minutes=1)


def actions(decisions: list[slots.Decision]) -> list[tuple[int, str]]:
    return [(int((NOW - d.slot) / MIN), d.action) for d in decisions]


def policy(catch_up: CatchUp, window: timedelta = 30 * MIN) -> SchedulePolicy:
    return SchedulePolicy(grace=2 * MIN, catch_up=catch_up, catch_up_window=window)


DUE = [NOW - 60 * MIN, NOW - 20 * MIN, NOW - 10 * MIN, NOW - 1 * MIN]  # the last one is on time


def test_on_time_slots_run_and_none_misses_every_overdue_one() -> None:
    assert actions(plan(DUE, NOW, policy("none"))) == [(60, "miss"), (20, "miss"), (10, "miss"), (1, "run")]


def test_latest_is_not_needed_when_an_on_time_slot_runs() -> None:
    assert actions(plan(DUE, NOW, policy("latest"))) == [(60, "miss"), (20, "miss"), (10, "miss"), (1, "run")]


def test_latest_catches_up_the_newest_overdue_slot_inside_the_window() -> None:
    due = DUE[:-1]
    assert actions(plan(due, NOW, policy("latest"))) == [(60, "miss"), (20, "miss"), (10, "catch_up")]
    assert actions(plan(due, NOW, policy("latest", window=5 * MIN))) == [(60, "miss"), (20, "miss"), (10, "miss")]
    # The supervisor sees only overdue slots; an on-time one the beat will run rules "latest" out.
    assert [d.action for d in plan(due, NOW, policy("latest"), on_time_elsewhere=True)] == ["miss"] * 3


def test_all_catches_up_every_overdue_slot_inside_the_window() -> None:
    assert actions(plan(DUE, NOW, policy("all"))) == [(60, "miss"), (20, "catch_up"), (10, "catch_up"), (1, "run")]


def test_a_slot_exactly_at_the_grace_is_still_on_time() -> None:
    assert actions(plan([NOW - 2 * MIN], NOW, policy("none"))) == [(2, "run")]
