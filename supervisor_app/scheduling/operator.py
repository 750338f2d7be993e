"""What operators do to a schedule by hand: backfill a range of slots, run it now.

Both record runs through ``runs`` exactly as the beat does, from the schedule's definition (its
arguments, publishing options and supervision policy), so the runs are the schedule's own and show
in its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .. import registry, runs
from ..core import slots
from ..models import SupervisedRun
from .definitions import ScheduleDef, definition_for

if TYPE_CHECKING:
    from django_celery_beat.models import PeriodicTask

#: A backfill records at most this many slots (a range that holds more is refused: narrow it).
BACKFILL_LIMIT = 10_000


@dataclass(frozen=True)
class BackfillResult:
    """The slots of the range, and how many of them this call recorded (the others existed)."""

    slots: int
    recorded: int
    first: datetime | None = None
    last: datetime | None = None

    @property
    def existing(self) -> int:
        return self.slots - self.recorded


def definition(pt: PeriodicTask) -> ScheduleDef:
    """The schedule's definition; ``ValueError`` when its task is not a ``SupervisedTask``."""
    if not registry.is_supervised(pt.task):
        raise ValueError(f"schedule {pt.name!r}: {pt.task} is not a registered SupervisedTask")
    return definition_for(pt, registry.task(pt.task))


def backfill(pt: PeriodicTask, start: datetime, end: datetime, limit: int = BACKFILL_LIMIT) -> BackfillResult:
    """Record one run per slot of the schedule in ``[start, end]`` (both inclusive) and publish them.

    A slot recorded already (by the beat, the supervisor or an earlier backfill) is left alone by the
    ``(periodic task, slot)`` unique constraint, so calling this twice records nothing the second
    time. The schedule's overlap and catch-up policies do not apply: every slot asked for runs. The
    schedule's ``start_time`` and ``expires`` still bound the slots.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if end < start:
        raise ValueError(f"the range ends ({end.isoformat()}) before it starts ({start.isoformat()})")
    defn = definition(pt)
    due = slots.slots_between(defn.rule, start - timedelta(microseconds=1), end, defn.bounds, limit=limit + 1)
    if len(due) > limit:
        raise ValueError(f"schedule {pt.name!r} has more than {limit} slots in that range: narrow it")
    if not due:
        return BackfillResult(0, 0)
    runs.check_json(defn.task_name, defn.args, defn.kwargs)
    created = runs.create_slot_runs(
        [
            runs.SlotRun(
                periodic_task_id=defn.pk,
                scheduled_for=slot,
                task_name=defn.task_name,
                args=defn.args,
                kwargs=defn.kwargs,
                policy=defn.run_policy,
                options=defn.options,
            )
            for slot in due
        ]
    )
    return BackfillResult(len(due), len(created), due[0], due[-1])


def run_now(pt: PeriodicTask) -> SupervisedRun:
    """Record an ad-hoc run of the schedule's task, with its arguments, options and policy, and
    publish it after commit. It has no slot (so it takes none from the beat) and belongs to the
    schedule: it shows in its history, and counts for its overlap and pause-on-failure policies."""
    defn = definition(pt)
    run = runs.create_run(
        defn.task_name, defn.args, defn.kwargs, defn.run_policy, options=defn.options, periodic_task_id=defn.pk
    )
    if run is None:  # create_run returns None only for a slot taken already, and there is no slot
        raise RuntimeError(f"schedule {pt.name!r}: the run was not recorded")
    return run
