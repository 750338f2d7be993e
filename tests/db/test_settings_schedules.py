"""Supervised tasks scheduled in ``CELERY_BEAT_SCHEDULE`` (``app.conf.beat_schedule``) are recorded per
slot, linked to their periodic task, from the beat's first tick, by any number of beats (issue 12,
item 8). django-celery-beat writes settings entries to the table at every start but keeps them as plain
entries until its next full reload, up to five minutes later: each beat sent them unrecorded.

Real scheduler class, two instances in this process, the test database; publishes captured by ``sent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import ModelEntry

from supervisor_app.models import SupervisedRun

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "project.tasks.noop"


@pytest.fixture
def beat_schedule() -> Iterator[dict[str, Any]]:
    """``app.conf.beat_schedule`` for this test (empty at first), restored after."""
    saved = current_app.conf.beat_schedule
    current_app.conf.beat_schedule = {}
    try:
        yield current_app.conf.beat_schedule
    finally:
        current_app.conf.beat_schedule = saved


def beats(n: int) -> list[Any]:
    from supervisor_app.schedulers import SupervisedScheduler

    return [SupervisedScheduler(app=current_app) for _ in range(n)]


def close(schedulers: list[Any]) -> None:
    for scheduler in schedulers:
        scheduler.close()


def test_two_beats_record_a_supervised_settings_entry_once_per_slot_from_their_first_tick(
    sent: list[Any], settings: Any, beat_schedule: dict[str, Any]
) -> None:
    from supervisor_app.schedulers import SupervisedEntry

    settings.SUPERVISOR_ALERT_GRACE = 3600.0  # the due slots are on time: run, not caught up
    beat_schedule["from-settings"] = {
        "task": TASK,
        "schedule": timedelta(seconds=60),
        "args": [1],
        "kwargs": {"a": 2},
        "options": {"priority": 3},
    }
    beat_schedule["plain-from-settings"] = {"task": "project.tasks.plain_noop", "schedule": timedelta(hours=1)}
    close(beats(1))  # an earlier start wrote the rows
    pt = PeriodicTask.objects.get(name="from-settings")
    assert (pt.task, pt.args, pt.kwargs, pt.priority, pt.interval.every) == (TASK, "[1]", '{"a": 2}', 3, 60)
    # That start was 150 s ago: two or three slots are due when the beats start again.
    anchor = timezone.now() - timedelta(seconds=150)
    PeriodicTask.objects.filter(pk=pt.pk).update(date_changed=anchor)
    first, second = started = beats(2)
    try:
        # An unchanged entry is not saved again: its anchor stays, so no due slot is skipped.
        assert PeriodicTask.objects.get(pk=pt.pk).date_changed == anchor
        for beat in started:
            assert isinstance(beat.schedule["from-settings"], SupervisedEntry)
            entry = beat.schedule["plain-from-settings"]
            assert isinstance(entry, ModelEntry) and not isinstance(entry, SupervisedEntry)  # upstream's
            assert beat.tick() == 0  # the first tick fires it
        recorded = SupervisedRun.objects.filter(task_name=TASK)
        slots = list(recorded.values_list("scheduled_for", flat=True))
        assert len(slots) >= 2 and len(set(slots)) == len(slots)
        assert set(recorded.values_list("periodic_task_id", flat=True)) == {pt.pk}
        assert {(tuple(r.args), tuple(r.kwargs.items()), r.options.get("priority")) for r in recorded} == {
            ((1,), (("a", 2),), 3)
        }
        assert len(sent) == len(slots)  # published once per slot, by the beat that recorded it
        assert first._stats == {"run": len(slots)} and second._stats == {"lost_race": len(slots)}
    finally:
        close(started)


def test_a_new_supervised_settings_entry_is_never_sent_through_the_plain_path(
    sent: list[Any], settings: Any, beat_schedule: dict[str, Any]
) -> None:
    from supervisor_app.schedulers import SupervisedEntry

    settings.SUPERVISOR_ALERT_GRACE = 3600.0
    beat_schedule["every-second"] = {"task": TASK, "schedule": 1.0}
    started = beats(2)  # both write the row at start (the first creates it)
    try:
        pt = PeriodicTask.objects.get(name="every-second")
        recorded = SupervisedRun.objects.filter(task_name=TASK)
        deadline = time.monotonic() + 15
        while recorded.count() < 3 and time.monotonic() < deadline:
            for beat in started:
                beat.tick()
            time.sleep(0.05)  # pacing the ticks, not synchronisation: the loop polls the runs table
        slots = list(recorded.values_list("scheduled_for", flat=True))
        assert len(slots) >= 3 and len(set(slots)) == len(slots)
        # Every run is a slot of the schedule: none dispatched ad hoc (unlinked) by the plain path.
        assert not recorded.filter(periodic_task__isnull=True).exists()
        assert set(recorded.values_list("periodic_task_id", flat=True)) == {pt.pk}
        assert len(sent) == len(slots)
        assert all(isinstance(beat.schedule["every-second"], SupervisedEntry) for beat in started)
    finally:
        close(started)


def test_a_changed_settings_entry_updates_its_row_and_a_bad_one_is_left_out(
    sent: list[Any], beat_schedule: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from supervisor_app.schedulers import SupervisedEntry

    beat_schedule["changing"] = {"task": TASK, "schedule": 60.0, "args": [1]}
    close(beats(1))
    before = PeriodicTask.objects.get(name="changing")
    beat_schedule["changing"] = {"task": TASK, "schedule": 60.0, "args": [2]}
    beat_schedule["bad"] = {"task": TASK, "schedule": 60.0, "kwargs": [1]}
    [beat] = beats(1)
    try:
        after = PeriodicTask.objects.get(name="changing")
        assert after.args == "[2]" and after.date_changed > before.date_changed  # as upstream writes it
        assert isinstance(beat.schedule["changing"], SupervisedEntry) and beat.schedule["changing"].args == [2]
        assert "bad" not in beat.schedule
        assert "schedule 'bad' cannot be read (kwargs must be a JSON object" in caplog.text
    finally:
        beat.close()
