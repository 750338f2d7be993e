"""Recording the slots of schedules as runs, as the slot decisions and the overlap policy say.

Shared by the beat (:mod:`.beat`) and the supervisor's schedule phase (:mod:`.sweep`). Every slot
is recorded through ``runs.create_run`` / ``runs.create_slot_runs`` with its ``(periodic task,
slot)`` unique constraint: whoever inserts a slot first decides its fate, the others get nothing
and do nothing, however many beats and supervisors race.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction

from .. import runs, signals
from ..conf import supervisor_settings
from ..core import arguments, slots
from ..core.alerting import list_slots
from ..core.policies import Overlap
from ..core.states import ACTIVE_STATUSES, RunStatus
from ..models import SupervisedRun
from ..runs.notify import send_batch_on_commit
from .definitions import ScheduleDef

logger = logging.getLogger("supervisor_app")


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
    defn: ScheduleDef, slot: datetime, status: str = RunStatus.QUEUED, hold: bool = False, why: str = ""
) -> SupervisedRun | None:
    return runs.create_run(
        defn.task_name,
        defn.args,
        defn.kwargs,
        defn.run_policy,
        options=defn.options,
        periodic_task_id=defn.pk,
        scheduled_for=slot,
        status=status,
        hold=hold,
        last_error=why,
    )


def _is_held(status: str, next_check_at: datetime | None) -> bool:
    """A queue_one run waiting for the active run of its schedule: queued, never published."""
    return status == RunStatus.QUEUED and next_check_at is None


def _start(defn: ScheduleDef, slot: datetime, counts: RecordCounts) -> None:
    """Record an on-time or caught-up slot, as the overlap policy says."""
    overlap = defn.policy.overlap
    with transaction.atomic():
        if overlap == Overlap.ALLOW:
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
        elif overlap == Overlap.SKIP or (overlap == Overlap.QUEUE_ONE and any(_is_held(s, n) for _, s, n in active)):
            run = _create(defn, slot, status=RunStatus.SKIPPED)
            counts.skipped += run is not None
        elif overlap == Overlap.QUEUE_ONE:
            run = _create(defn, slot, hold=True)
            counts.held += run is not None
            if run is None:
                # Either the slot is recorded already, or another beat or supervisor holds a run of this
                # schedule (one held run per schedule is a constraint): then this slot is skipped.
                run = _create(defn, slot, status=RunStatus.SKIPPED, why="queue_one: a run is already held")
                counts.skipped += run is not None
        elif overlap == Overlap.REPLACE:  # insert first, so a beat that lost the race never cancels the winner's run
            run = _create(defn, slot)
            if run is not None:
                counts.run += 1
                for pk, _status, _next in active:
                    if runs.request_cancel(pk) is not None:
                        counts.replaced += 1
        else:  # unreachable through definition_for, which parses the policy: never guess another one
            raise ValueError(f"schedule {defn.name!r}: unknown overlap policy {overlap!r}")
        counts.lost_race += run is None


def record(defn: ScheduleDef, decisions: Sequence[slots.Decision], reason: str = "") -> RecordCounts:
    """Record each decided slot (run, caught up or missed) and alert the missed ones."""
    counts = RecordCounts()
    for decision in decisions:
        if decision.action == "miss":
            why = reason or "no run was recorded for the slot within its grace period"
            run = _create(defn, decision.slot, status=RunStatus.MISSED, why=why)
            if run is None:
                counts.lost_race += 1
                continue
            counts.missed += 1
            counts.missed_runs.append(run)
            continue
        before = counts.run + counts.held
        _start(defn, decision.slot, counts)
        if decision.action == "catch_up" and counts.run + counts.held > before:
            counts.caught_up += 1
            logger.warning("schedule %r: slot %s was late and is caught up now", defn.name, decision.slot.isoformat())
    if counts.missed_runs:
        alert_missed(defn.name, counts.missed_runs)
    return counts


def alert_missed(schedule: str, missed: Sequence[SupervisedRun]) -> None:
    """Signal and log missed slots (after commit: a rolled-back record alerts nobody).

    Mail and webhook alerts are :mod:`supervisor_app.alerts`' receivers of ``run_missed``: the
    slots of one call go out as one ``batch``, so they make one alert.
    """
    reason = missed[0].last_error
    logger.warning("schedule %r missed %d slot(s): %s (%s)", schedule, len(missed), list_slots(missed), reason)
    send_batch_on_commit(signals.run_missed, list(missed))


# --------------------------------------------------------------------------- firing


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
    their insert: they are recorded together by ``runs.create_slot_runs`` (a multi-row insert
    that skips slots recorded already, then one publish per new run, through one producer). A
    schedule with an overlap policy must read its active runs before each slot, and a missed slot
    carries an alert: those go one by one through :func:`record`, and only they pay for it.

    A firing that fails (database down, arguments that are not a JSON list and object) comes back as
    its exception; the others are recorded as usual.
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
            if defn.policy.overlap == Overlap.ALLOW:
                starts = [d for d in decisions if d.action != "miss"]
                if starts:
                    check_arguments(defn)
                    runs.check_json(defn.task_name, defn.args, defn.kwargs)
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


def check_arguments(defn: ScheduleDef) -> None:
    """``ValueError`` unless the arguments are a list and a dict: checked per firing, before the batch,
    because the batch builds every row at once and one bad value would fail the others with it.
    (``definition_for`` refuses such a schedule already; this keeps the batch safe on its own.)"""
    given: tuple[tuple[arguments.Field, Any], ...] = (("args", defn.args), ("kwargs", defn.kwargs))
    for name, value in given:
        error = arguments.type_error(name, value)
        if error is not None:
            raise ValueError(f"schedule {defn.name!r}: {error}")


def _record_batch(
    firings: Sequence[Firing], batch: Sequence[tuple[int, slots.Decision]], results: list[RecordCounts | Exception]
) -> None:
    wanted = []
    for i, decision in batch:
        defn = firings[i].defn
        wanted.append(
            runs.SlotRun(
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
        created = runs.create_slot_runs(wanted)
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
