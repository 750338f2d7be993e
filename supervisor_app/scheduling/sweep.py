"""The supervisor's schedule phase: overdue slots, start windows, ``queue_one`` runs to release.

Slots still inside their grace are left to the beat, so this works with a healthy beat, a slow one,
or none at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING

from django.db.models import Q

from .. import registry
from ..conf import supervisor_settings
from ..core import slots
from ..core.states import ACTIVE_STATUSES, RunStatus
from ..db import db_now
from ..models import SupervisedRun
from ..ops.isolation import Outcome, SweepErrors, isolated
from ..ops.liveness import beat_is_stale
from ..runs import schedule_runs
from .definitions import PolicyDefaults, ScheduleDef, cursor_for, definition_for, supervised_periodic_tasks
from .firing import RecordCounts, alert_missed, record

if TYPE_CHECKING:
    from ..supervisor import SweepReport

logger = logging.getLogger("supervisor_app")


def check_schedules(
    now: datetime,
    definitions: Sequence[tuple[ScheduleDef, datetime | None]],
    deadline: float,
    errors: SweepErrors | None = None,
) -> RecordCounts:
    """Overdue unrecorded slots get the catch-up policy: run late or ``missed`` + alert.

    Slots still inside their grace are left to the beat, so this works with a healthy beat, a
    slow one, or none at all. Each schedule in a savepoint of its own: one that fails is reported
    in ``errors`` and the others are checked (None: raise, as a test wants).
    """
    total = RecordCounts()
    limit = int(supervisor_settings.SCHEDULE_MAX_SLOTS)
    for defn, last_slot in definitions:
        if time.monotonic() > deadline:
            break
        with _each(errors, f"schedule {defn.pk} {defn.name!r}") as outcome:
            counts = _check_one(defn, last_slot, now, limit)
        if not outcome.failed:
            total.add(counts)
    return total


def _each(errors: SweepErrors | None, key: str) -> AbstractContextManager[Outcome]:
    """In a sweep, each piece in its own savepoint, a failure reported in ``errors`` and skipped;
    called on its own (``errors`` None, as tests do), a failure is raised as usual."""
    return isolated(errors, "schedules", key) if errors is not None else nullcontext(Outcome())


def _check_one(defn: ScheduleDef, last_slot: datetime | None, now: datetime, limit: int) -> RecordCounts:
    since = cursor_for(defn, last_slot, now)
    due = slots.slots_between(defn.rule, since, now - defn.policy.grace, defn.bounds, limit=limit)
    if not due:
        return RecordCounts()
    following = slots.next_slot_after(defn.rule, due[-1], defn.bounds)
    elsewhere = following is not None and following <= now
    decisions = [d for d in slots.plan(due, now, defn.policy, elsewhere) if d.action != "run"]
    return record(defn, decisions)


def expire_unstarted(now: datetime, by_pk: dict[int, ScheduleDef], errors: SweepErrors | None = None) -> int:
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
        run = None
        window = windows[pt_id]
        start = max(t for t in (slot, created) if t is not None)
        if now - start <= window:
            continue
        with _each(errors, f"run {pk}"):
            run = schedule_runs.expire_unstarted(pk, f"not started within its start window ({window})")
        if run is not None:  # else a worker claimed it meanwhile (or it failed, and was reported)
            expired.setdefault(pt_id, []).append(run)
    for pt_id, missed in expired.items():
        alert_missed(by_pk[pt_id].name, missed)
    return sum(len(r) for r in expired.values())


def release_held(errors: SweepErrors | None = None) -> int:
    """Publish a ``queue_one`` run whose schedule has no other active run any more."""
    released = 0
    held = SupervisedRun.objects.filter(
        status=RunStatus.QUEUED, next_check_at__isnull=True, periodic_task__isnull=False
    ).values_list("pk", "periodic_task_id")
    for pk, pt_id in held:
        if SupervisedRun.objects.filter(periodic_task_id=pt_id, status__in=ACTIVE_STATUSES).exclude(pk=pk).exists():
            continue
        with _each(errors, f"run {pk}"):
            released += schedule_runs.release_held(pk)
    return released


def cancel_orphaned_held(errors: SweepErrors | None = None) -> int:
    """Held ``queue_one`` runs whose schedule was deleted (the run's link is gone) or disabled: no
    active run of theirs will ever release them, so they end ``cancelled`` with the reason."""
    cancelled = 0
    held = SupervisedRun.objects.filter(status=RunStatus.QUEUED, next_check_at__isnull=True).filter(
        Q(periodic_task__isnull=True) | Q(periodic_task__enabled=False)
    )
    for pk, pt_id in held.values_list("pk", "periodic_task_id"):
        why = "queue_one: its schedule was " + ("deleted" if pt_id is None else "disabled") + " while it was held"
        with _each(errors, f"run {pk}"):
            cancelled += schedule_runs.cancel_held(pk, why)
    return cancelled


_last_stale_warning = 0.0


def sweep_schedules(report: SweepReport, deadline: float) -> None:
    """The supervisor's schedule phase: missed slots, start windows, queue_one."""
    global _last_stale_warning
    names = registry.supervised_task_names()
    if not names:
        return
    tasks = registry.tasks()
    now = db_now()
    definitions: list[tuple[ScheduleDef, datetime | None]] = []
    defaults = PolicyDefaults.read()
    for pt in supervised_periodic_tasks(names):
        # One broken schedule must not hide the others: it is reported (health, admin) and left out.
        with isolated(report.errors, "schedules", f"schedule {pt.pk} {pt.name!r}", savepoint=False):
            definitions.append((definition_for(pt, tasks[pt.task], defaults), pt.last_slot))
    counts = check_schedules(now, definitions, deadline, report.errors)
    expired = expire_unstarted(now, {d.pk: d for d, _ in definitions}, report.errors)
    orphaned = cancel_orphaned_held(report.errors)  # first: a disabled schedule's held run is not released
    released = release_held(report.errors)
    stale = bool(definitions) and beat_is_stale(now, supervisor_settings.stale_after)
    if stale and time.monotonic() - _last_stale_warning > 60:
        _last_stale_warning = time.monotonic()
        logger.warning("no beat has recorded its liveness recently: schedules rely on the supervisor's catch-up")
    report.extra["schedules"] = {
        **counts.as_dict(),
        "expired": expired,
        "released": released,
        "held_cancelled": orphaned,
        "beat_stale": stale,
    }
