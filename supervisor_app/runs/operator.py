"""Operators' actions (the admin's buttons): cancel, retry now, mark resolved."""

from __future__ import annotations

from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce, Least, Now

from .. import signals
from ..conf import supervisor_settings
from ..core.states import CANCEL_WAITING, INCIDENT_STATUSES, REOPEN, AttemptOutcome, RunStatus
from ..core.workflow import has_continuation
from ..db import after
from ..models import RunAttempt, SupervisedRun
from . import rows
from .notify import send_on_commit
from .publishing import RunPublisher, publish_on_commit


def request_cancel(run_id: int) -> str | None:
    """Cancel a run: at once when no agent holds it, cooperatively (next heartbeat) when running.

    Returns the run's status afterwards (``cancelled``, or ``running`` while its agent stops), None
    when it had finished already.
    """
    with transaction.atomic():
        if rows.of(CANCEL_WAITING, run_id).update(
            status=CANCEL_WAITING.target, finished_at=Now(), next_check_at=None, cancel_requested=True
        ):
            RunAttempt.objects.filter(run_id=run_id, outcome=AttemptOutcome.PENDING).update(
                outcome=AttemptOutcome.CANCELLED, ended_at=Now()
            )
            send_on_commit(signals.run_cancelled, run_id, attempt=None)
            return CANCEL_WAITING.target
        # Running: the body stops at its next heartbeat; if it doesn't within the grace period, the
        # deadline below makes the supervisor cancel the run and fence the attempt (time_out); its
        # lease keeper then interrupts the body in-process.
        grace = supervisor_settings.cancel_grace
        by = after(timedelta(seconds=grace)) if grace is not None else after(F("lease_timeout"))
        if SupervisedRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
            cancel_requested=True, deadline_at=Least(Coalesce(F("deadline_at"), by), by)
        ):
            return RunStatus.RUNNING
    return None


def retry_now(run_id: int) -> bool:
    """Operator action: a new attempt for a run, whatever its state except running.

    A terminal run is reopened: the only way a terminal status ever changes. False, and nothing
    changed, when the run is running, or when another active run holds its unique key (a unique run
    ended, and the same key was dispatched again since).
    """
    with transaction.atomic():
        run = SupervisedRun.objects.select_for_update().filter(pk=run_id, status__in=REOPEN.source_list).first()
        if run is None:
            return False
        next_attempt = run.attempt + 1
        values = rows.requeued(REOPEN, run, next_attempt)
        values.update(max_attempts=max(run.max_attempts, next_attempt), cancel_requested=False, finished_at=None)
        # Its continuation is dispatched again for the new final status (supervised steps under the
        # same derived ids: recorded once).
        values["follow_up"] = has_continuation(run.options)
        current = SupervisedRun.objects.filter(pk=run.pk, attempt=run.attempt, status=run.status)
        try:
            with transaction.atomic():  # a savepoint: the unique-key constraint may refuse the reopen
                if not current.update(**values):
                    return False
        except IntegrityError:
            return False  # another active run holds this run's unique key
        rows.new_attempt(run.pk, next_attempt, run.celery_task_id)
        publisher = RunPublisher()
        publish_on_commit(run, next_attempt, run.celery_task_id, publisher)
        transaction.on_commit(publisher.close)
    return True


def mark_resolved(run_id: int, by: str = "") -> bool:
    """Operator action: acknowledge a failed, dead or missed run ("someone looked at it").

    The status is kept (it says what happened); ``resolved_at``/``resolved_by`` record who closed
    the incident. Only an open incident can be resolved: a run resolved and then retried, which ends
    badly again, finishes after its ``resolved_at`` and so is open again. False when nothing changed.
    """
    return bool(
        SupervisedRun.objects.filter(pk=run_id, status__in=INCIDENT_STATUSES)
        .filter(Q(resolved_at__isnull=True) | Q(resolved_at__lt=F("finished_at")))
        .update(resolved_at=Now(), resolved_by=by[:150])
    )
