"""The values a run's row takes at each kind of move, and the attempt-row writes every move shares."""

from __future__ import annotations

import logging
from typing import Any

from django.db.models.functions import Now

from .. import signals
from ..core.states import AttemptOutcome, Move, RunStatus
from ..db import after
from ..models import RunAttempt, SupervisedRun
from .notify import send_on_commit

logger = logging.getLogger("supervisor_app")


def ended(move: Move) -> dict[str, Any]:
    """A run's values as ``move`` takes it to a final status: finished now, no lease or deadline left.
    An end other than success is followed up (``runs.workflow``): no worker's tracer tells a result
    backend, a chord or an errback of it."""
    values: dict[str, Any] = dict(status=move.target, finished_at=Now(), lease_expires_at=None, deadline_at=None)
    if move.target != RunStatus.SUCCEEDED:
        values["follow_up"] = True
    return values


def fresh_attempt(move: Move) -> dict[str, Any]:
    """A run queued for a new attempt by ``move``: the previous agent's traces cleared and the publish
    counted (optimistically: a failed publish resets it)."""
    return dict(
        status=move.target,
        worker="",
        started_at=None,
        heartbeat_at=None,
        lease_expires_at=None,
        deadline_at=None,
        publish_count=1,
    )


def requeued(move: Move, run: SupervisedRun, next_attempt: int) -> dict[str, Any]:
    """:func:`fresh_attempt` for one run: its next attempt number, the start timeout running. Every
    attempt is published under the run's own task id (the caller's handle follows the run)."""
    return dict(fresh_attempt(move), attempt=next_attempt, next_check_at=after(run.start_timeout))


def of(move: Move, run_id: int, attempt: int | None = None, token: str | None = None) -> Any:
    """The run, if it is still where ``move`` starts (and on ``attempt``, held by the claim ``token``:
    the agent's fence; the supervisor's and operators' moves fence by attempt alone)."""
    sources = move.source_list
    status = {"status": sources[0]} if len(sources) == 1 else {"status__in": sources}
    qs = SupervisedRun.objects.filter(pk=run_id, **status)
    if attempt is not None:
        qs = qs.filter(attempt=attempt)
    return qs if token is None else qs.filter(lease_token=token)


def finish_attempt(run_id: int, attempt: int, outcome: str, error: str = "", tb: str = "") -> None:
    RunAttempt.objects.filter(run_id=run_id, number=attempt).update(
        outcome=outcome, ended_at=Now(), error=error[:10000], traceback=tb[:50000]
    )


def new_attempt(run_id: int, number: int, task_id: str) -> None:
    """The pending row of an attempt the supervisor or an operator queued.

    The unique ``(run, number)`` constraint backs the conditional update before it: should two
    supervisors ever both pass it, the second insert fails and its transaction rolls back.
    """
    RunAttempt.objects.create(run_id=run_id, number=number, task_id=task_id)


def fenced(run_id: int, attempt: int, worker: str, what: str) -> None:
    """Record that a zombie's write was refused (over a lost outcome; a timed-out one stays so)."""
    RunAttempt.objects.filter(
        run_id=run_id,
        number=attempt,
        outcome__in=[AttemptOutcome.LOST, AttemptOutcome.RUNNING],
    ).update(outcome=AttemptOutcome.FENCED, error=f"{what} refused: the lease was lost ({worker})")
    logger.warning("run %s attempt %s lost its lease; %s refused", run_id, attempt, what)
    send_on_commit(signals.run_fenced, run_id, attempt=attempt, worker=worker)
