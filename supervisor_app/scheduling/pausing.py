"""Pause on failure: a schedule whose latest ``pause_after_failures`` runs all ended ``failed`` or
``dead`` is disabled, once, and one ``schedule_paused`` signal says so (the ``paused`` alert).

Evaluated by a receiver of ``run_failed`` and ``run_dead`` (connected in ``AppConfig.ready``), after
the failure committed, in the process that recorded it (a worker, or the supervisor for a run that
lost its last attempt): only when a scheduled run ends badly, never on the path of a run that
succeeds. Counting reads at most ``pause_after_failures`` rows of the schedule, newest first, through
the ``(periodic task, slot)`` index.

Which runs count: the schedule's runs that ended ``succeeded``, ``failed`` or ``dead`` (slot runs in
slot order, "run now" runs by when they were recorded); ``skipped``, ``missed`` and ``cancelled`` runs
neither count nor break a streak. Only runs recorded after the policy's ``failures_counted_from``
count: it is set when the schedule is paused and when it is enabled again in the admin, so the count
starts from zero after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models.functions import Now

from .. import signals
from ..conf import supervisor_settings
from ..core.states import RunStatus
from ..models import SupervisedRun, SupervisionPolicy

logger = logging.getLogger("supervisor_app")

#: The outcomes that make or break a streak of failures.
COUNTED = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DEAD)
BAD = (RunStatus.FAILED, RunStatus.DEAD)
#: Columns an alert does not need.
_HEAVY = ("args", "kwargs", "options", "progress", "checkpoint")


def threshold(policy: SupervisionPolicy | None) -> int | None:
    """How many consecutive failed or dead runs pause the schedule (None: never)."""
    if policy is not None and policy.pause_after_failures:
        return int(policy.pause_after_failures)
    setting = supervisor_settings.PAUSE_AFTER_FAILURES
    return int(setting) if setting else None


def latest_outcomes(periodic_task_id: int, n: int, since: datetime | None = None) -> list[SupervisedRun]:
    """The schedule's ``n`` latest runs that ended succeeded, failed or dead, newest first."""
    base = SupervisedRun.objects.filter(periodic_task_id=periodic_task_id, status__in=COUNTED).defer(*_HEAVY)
    if since is not None:
        base = base.filter(created_at__gt=since)
    # Two bounded reads: slot runs backwards along the unique (periodic task, slot) index, and the
    # few "run now" runs (no slot), merged by slot or recording time.
    slot_runs = list(base.filter(scheduled_for__isnull=False).order_by("-scheduled_for")[:n])
    adhoc = list(base.filter(scheduled_for__isnull=True).order_by("-created_at", "-id")[:n])
    merged = sorted(slot_runs + adhoc, key=lambda r: r.scheduled_for or r.created_at, reverse=True)
    return merged[:n]


def check_after_failure(run: SupervisedRun) -> bool:
    """A run of a schedule ended failed or dead: pause the schedule if its streak is long enough.
    True when this call paused it."""
    if run.periodic_task_id is None:
        return False
    policy = SupervisionPolicy.objects.filter(periodic_task_id=run.periodic_task_id).first()
    n = threshold(policy)
    if not n:
        return False
    since = policy.failures_counted_from if policy is not None else None
    latest = latest_outcomes(run.periodic_task_id, n, since)
    if len(latest) < n or any(r.status not in BAD for r in latest):
        return False
    return pause(run.periodic_task_id, latest, f"{n} consecutive failed or dead runs (pause_after_failures)")


def pause(periodic_task_id: int, failed: Sequence[SupervisedRun], reason: str) -> bool:
    """Disable the schedule and record why; one ``schedule_paused`` signal after commit.

    The conditional ``UPDATE … WHERE enabled`` decides: of several processes that see the same
    streak at once, one pauses and alerts, the others do nothing. A schedule disabled by hand is
    left alone.
    """
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    with transaction.atomic():
        if not PeriodicTask.objects.filter(pk=periodic_task_id, enabled=True).update(enabled=False):
            return False
        policy, _ = SupervisionPolicy.objects.get_or_create(periodic_task_id=periodic_task_id)
        SupervisionPolicy.objects.filter(pk=policy.pk).update(
            paused_at=Now(), failures_counted_from=Now(), paused_reason=reason[:255]
        )
        PeriodicTasks.update_changed()  # beats reload their schedules: this one is gone from them
        runs = list(failed)

        def send() -> None:
            signals.schedule_paused.send_robust(sender=SupervisedRun, run=runs[0], reason=reason, batch=runs)

        transaction.on_commit(send)
    name = PeriodicTask.objects.filter(pk=periodic_task_id).values_list("name", flat=True).first()
    logger.warning("schedule %r paused (disabled): %s; runs %s", name, reason, [r.pk for r in failed])
    return True


def resume(periodic_task_ids: Sequence[int]) -> int:
    """The schedules were enabled again: forget the pause and count failures from now on."""
    return SupervisionPolicy.objects.filter(periodic_task_id__in=list(periodic_task_ids)).update(
        paused_at=None, paused_reason="", failures_counted_from=Now()
    )


def on_run_ended_badly(sender: Any, run: SupervisedRun, **kwargs: Any) -> None:
    try:
        check_after_failure(run)
    except Exception:  # a receiver must never break the process that reports the failure
        logger.exception("could not check whether the schedule of run %s should pause", run.pk)


def connect() -> None:
    """Connect the receiver (from ``AppConfig.ready``; idempotent through ``dispatch_uid``)."""
    for signal in (signals.run_failed, signals.run_dead):
        signal.connect(on_run_ended_badly, sender=SupervisedRun, dispatch_uid="supervisor_app.scheduling.pausing")
