"""The supervisor's writes: recover lost attempts, time out overdue ones, dispatch retries, publish
again what nobody started. Each re-checks, in its ``WHERE``, the condition that selected the row, so
two supervisors racing on one row act once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from django.db import router
from django.db.models import CharField, F, Value
from django.db.models.functions import Cast, Concat, Now

from .. import broker, signals
from ..conf import supervisor_settings
from ..core.backlog import Verdict
from ..core.backlog import judge as judge_backlog
from ..core.ids import legacy_task_id
from ..core.retry import NEVER_STARTED_REASON, has_attempts_left, never_started, republish_delay
from ..core.states import (
    BURY,
    CANCEL_RETRYING,
    DISPATCH_RETRY,
    EXPIRE_UNSTARTED,
    FORCE_CANCEL,
    NEVER_STARTED,
    REPUBLISH,
    REQUEUE,
    AttemptOutcome,
)
from ..db import after, db_now, update_returning
from ..models import RunAttempt, SupervisedRun
from . import rows
from .arrays import insert_many
from .notify import send_many_on_commit, send_on_commit
from .publishing import RunPublisher, message, publish_many_on_commit, publish_on_commit

logger = logging.getLogger("supervisor_app")


def _requeue_or_bury(
    run: SupervisedRun,
    condition: Mapping[str, Any],
    outcome: str,
    reason: str,
    publisher: RunPublisher,
    on_requeue: Callable[[], None],
) -> str | None:
    """Shared end of a timed-out attempt: a new attempt, or ``dead``. Returns the new status."""
    error = f"attempt {run.attempt} {reason}" + (f" (worker {run.worker})" if run.worker else "")
    if has_attempts_left(run.attempt, run.max_attempts):
        values = rows.requeued(REQUEUE, run, run.attempt + 1)
        if not rows.of(REQUEUE, run.pk, run.attempt).filter(**condition).update(last_error=error, **values):
            return None
        rows.new_attempt(run.pk, run.attempt + 1, run.celery_task_id)
        rows.finish_attempt(run.pk, run.attempt, outcome, error)
        publish_on_commit(run, run.attempt + 1, run.celery_task_id, publisher)
        on_requeue()
        return REQUEUE.target
    if not rows.of(BURY, run.pk, run.attempt).filter(**condition).update(**rows.ended(BURY), last_error=error):
        return None
    rows.finish_attempt(run.pk, run.attempt, outcome, error)
    send_on_commit(signals.run_dead, run.pk, attempt=run.attempt, reason=outcome)
    return BURY.target


def recover_lost_batch(
    runs: Sequence[SupervisedRun], publisher: RunPublisher
) -> tuple[list[int], list[int], list[int]]:
    """Runs whose lease expired, a locked batch of them, in a constant number of statements.

    A mass failure (a host with hundreds of runs dies) then costs a handful of statements per batch
    instead of three per run: one conditional UPDATE per outcome, one INSERT of the new attempts'
    rows, one UPDATE of the lost attempts' rows. Returns the ids of the runs re-queued, dead, and
    cancelled (an operator had cancelled them: no new attempt).
    """
    by_id = {run.pk: run for run in runs}
    error = Concat(
        Value("attempt "),
        Cast("attempt", CharField()),
        Value(" lost: lease expired (worker "),
        F("worker"),
        Value(")"),
        output_field=CharField(),
    )
    stale = SupervisedRun.objects.filter(status=REQUEUE.source, lease_expires_at__lt=Now())
    # An operator cancelled it and its agent died: it ends cancelled; no new attempt for it.
    cancelled = update_returning(
        stale.filter(pk__in=[r.pk for r in runs], cancel_requested=True),
        ["id", "attempt"],
        **rows.ended(FORCE_CANCEL),
    )
    stale = stale.filter(cancel_requested=False)
    requeued = update_returning(
        stale.filter(pk__in=[r.pk for r in runs if has_attempts_left(r.attempt, r.max_attempts)]),
        ["id", "attempt", "task_id"],
        **rows.fresh_attempt(REQUEUE),
        attempt=F("attempt") + 1,
        last_error=error,
        next_check_at=after(F("start_timeout")),
    )
    dead = update_returning(
        stale.filter(pk__in=[r.pk for r in runs if not has_attempts_left(r.attempt, r.max_attempts)]),
        ["id"],
        **rows.ended(BURY),
        last_error=error,
    )
    queued_ids = [row["id"] for row in requeued]
    dead_ids = [row["id"] for row in dead]
    cancelled_ids = [row["id"] for row in cancelled]
    if queued_ids or dead_ids or cancelled_ids:
        # The attempt that was running is the only attempt row of its run still marked running.
        RunAttempt.objects.filter(
            run_id__in=queued_ids + dead_ids + cancelled_ids, outcome=AttemptOutcome.RUNNING
        ).update(outcome=AttemptOutcome.LOST, ended_at=Now(), error="lease expired")
    # The unique (run, number) constraint backs the conditional update: a second supervisor that
    # somehow passed it would fail here and roll its whole batch back.
    insert_many(
        RunAttempt,
        [
            {"run_id": row["id"], "number": row["attempt"], "task_id": row["task_id"] or legacy_task_id(row["id"])}
            for row in requeued
        ],
        router.db_for_write(RunAttempt),
    )
    publish_many_on_commit(
        [message(by_id[row["id"]], row["attempt"], row["task_id"] or legacy_task_id(row["id"])) for row in requeued],
        publisher,
    )
    send_many_on_commit(signals.run_recovered, {row["id"]: {"lost_attempt": row["attempt"] - 1} for row in requeued})
    send_many_on_commit(
        signals.run_dead,
        {run_id: {"attempt": by_id[run_id].attempt, "reason": AttemptOutcome.LOST} for run_id in dead_ids},
    )
    send_many_on_commit(signals.run_cancelled, {row["id"]: {"attempt": row["attempt"]} for row in cancelled})
    return queued_ids, dead_ids, cancelled_ids


def time_out(run: SupervisedRun, publisher: RunPublisher) -> str | None:
    """Past max runtime: start a new attempt or bury the run.

    The timed-out attempt is stopped by its own agent: its next lease renewal is refused and its
    lease keeper interrupts the body in-process (no ``revoke(terminate=True)``, whose signal may land
    on the next task the pool process runs). A run an operator cancelled is past its cancel grace
    instead: it ends ``cancelled``.
    """
    if run.cancel_requested:
        return force_cancel(run)
    timed_out = run.attempt
    status = _requeue_or_bury(
        run,
        {"deadline_at__lt": Now()},
        AttemptOutcome.TIMED_OUT,
        "timed out: max runtime exceeded",
        publisher,
        lambda: send_on_commit(signals.run_timed_out, run.pk, timed_out_attempt=timed_out),
    )
    return status


def force_cancel(run: SupervisedRun) -> str | None:
    """A cancelled run whose body did not stop within the grace period: end it.

    The attempt is fenced like any other: its next renewal is refused, so its lease keeper stops the
    body in-process, and if the body still finishes, its write is refused.
    """
    if not rows.of(FORCE_CANCEL, run.pk, run.attempt).filter(cancel_requested=True).update(**rows.ended(FORCE_CANCEL)):
        return None
    rows.finish_attempt(
        run.pk, run.attempt, AttemptOutcome.CANCELLED, "cancelled by an operator; not stopped within the grace period"
    )
    send_on_commit(signals.run_cancelled, run.pk, attempt=run.attempt)
    return FORCE_CANCEL.target


def dispatch_retry(run: SupervisedRun, publisher: RunPublisher) -> bool:
    """A retry's backoff is over: queue the next attempt (or end the run, if an operator cancelled it)."""
    if run.cancel_requested:
        if rows.of(CANCEL_RETRYING, run.pk, run.attempt).update(
            status=CANCEL_RETRYING.target, finished_at=Now(), next_check_at=None
        ):
            send_on_commit(signals.run_cancelled, run.pk, attempt=None)
        return False
    values = rows.requeued(DISPATCH_RETRY, run, run.attempt + 1)
    if not rows.of(DISPATCH_RETRY, run.pk, run.attempt).filter(next_check_at__lte=Now()).update(**values):
        return False
    rows.new_attempt(run.pk, run.attempt + 1, run.celery_task_id)
    publish_on_commit(run, run.attempt + 1, run.celery_task_id, publisher)
    return True


def republish_batch(runs: Sequence[SupervisedRun], publisher: RunPublisher) -> list[str | None]:
    """:func:`republish` for a locked batch: when each attempt was recorded (the backlog bound counts
    from it) read in one query, and each queue asked about once (``publisher.queues``)."""
    now = db_now()
    later = [run.pk for run in runs if run.attempt > 1]
    queued_at = {
        (row["run_id"], row["number"]): row["created_at"]
        for row in RunAttempt.objects.filter(run_id__in=later).values("run_id", "number", "created_at")
    }
    out = []
    for run in runs:
        since = queued_at.get((run.pk, run.attempt), run.created_at)
        out.append(republish(run, publisher, waited=(now - since).total_seconds()))
    return out


def judge(run: SupervisedRun, publisher: RunPublisher, waited: float) -> tuple[str | None, Verdict]:
    """Its queue and the verdict on an unstarted attempt (see ``core.backlog``)."""
    options = run.options or {}
    try:
        queue = broker.queue_of(run.task_name, options)
    except Exception:  # a route Celery refuses: publishing fails the same way, as before
        logger.warning("run %s: no queue for its route; published again without asking", run.pk, exc_info=True)
        queue = None
    probe = publisher.queues
    state = probe.state(queue) if run.publish_count else None
    any_consumed = probe.any_consumed() if state is not None and state.consumers == 0 else True
    return queue, judge_backlog(state, run.publish_count, waited, supervisor_settings.max_backlog_wait, any_consumed)


def republish(run: SupervisedRun, publisher: RunPublisher, waited: float = 0.0) -> str | None:
    """A queued attempt nobody started in time: publish it again if its message is lost (the claim
    drops duplicates). Returns the run's status if it changed or was published (``queued``), else None.

    Its queue is asked about first (``core.backlog``): behind a healthy backlog (ready messages,
    consumers) or during a worker outage (no queue has a consumer) the run is left waiting one more
    start timeout, not published, not counted; published again when no message is ready in its queue
    (purged, lost by the broker, held by a hung consumer), when its queue has no consumer while others
    do, after waiting ``SUPERVISOR_MAX_BACKLOG_WAIT`` per publish (``waited``: seconds since the
    attempt was recorded), or when the broker can't be asked.

    A run whose messages have expired (its ``expires`` option passed) is not published again: a
    worker would drop the message unrun, for ever. It ends ``missed``, with the reason. An attempt
    published ``SUPERVISOR_MAX_PUBLISHES`` times that no worker started ends ``dead`` (not while its
    queue is a healthy backlog).
    """
    expires = broker.expiry(run.options or {})
    if expires is not None and expires <= db_now():
        why = f"not started before its messages expired ({expires.isoformat()})"
        expired = rows.of(EXPIRE_UNSTARTED, run.pk, run.attempt).filter(next_check_at__lte=Now())
        if expired.update(status=EXPIRE_UNSTARTED.target, finished_at=Now(), next_check_at=None, last_error=why):
            RunAttempt.objects.filter(run_id=run.pk, number=run.attempt, outcome=AttemptOutcome.PENDING).update(
                outcome=AttemptOutcome.CANCELLED, ended_at=Now(), error=why
            )
            send_on_commit(signals.run_missed, run.pk, reason=why, batch=())
            return EXPIRE_UNSTARTED.target
        return None
    queue, verdict = judge(run, publisher, waited)
    publisher.queues.note(run.pk, queue, verdict.value, 2 * run.start_timeout.total_seconds())
    due = rows.of(REPUBLISH, run.pk, run.attempt).filter(next_check_at__lte=Now())
    if not verdict.publishes:
        # Waiting its turn (or for the workers): look again after one more start timeout.
        due.update(next_check_at=after(run.start_timeout))
        return None
    if verdict.may_end and never_started(run.publish_count, supervisor_settings.max_publishes):
        return _never_started(run)
    count = run.publish_count + 1
    delay = republish_delay(run.start_timeout.total_seconds(), count)
    task_id = run.celery_task_id
    if not due.update(publish_count=count, next_check_at=after(timedelta(seconds=delay)), task_id=task_id):
        return None
    publish_on_commit(run, run.attempt, task_id, publisher)
    return REPUBLISH.target


def _never_started(run: SupervisedRun) -> str | None:
    """End a run no worker ever took: ``dead`` with the reason, and the ``run_dead`` alert."""
    queue = (run.options or {}).get("queue") or "the default queue"
    why = f"{NEVER_STARTED_REASON} (attempt {run.attempt} published {run.publish_count} times to {queue})"
    due = rows.of(NEVER_STARTED, run.pk, run.attempt).filter(next_check_at__lte=Now())
    if not due.update(**rows.ended(NEVER_STARTED), next_check_at=None, last_error=why):
        return None
    RunAttempt.objects.filter(run_id=run.pk, number=run.attempt, outcome=AttemptOutcome.PENDING).update(
        outcome=AttemptOutcome.CANCELLED, ended_at=Now(), error=why
    )
    send_on_commit(signals.run_dead, run.pk, attempt=run.attempt, reason="never_started")
    return NEVER_STARTED.target
