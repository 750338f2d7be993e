"""The run state machine: statuses, outcomes, every move between statuses, and the liveness table.

Pure values only. Every status change the package makes is one of the :data:`MOVES` below, and the
SQL that applies it (``supervisor_app.runs``) takes its ``WHERE status IN (…)`` and its new status
from the move, as parameters: the allowed transitions are written here once, and the state diagram
(``docs/make_state_diagram.py``) is drawn from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import models


class RunStatus(models.TextChoices):
    """Where a logical run stands. The value strings are part of the public API."""

    #: Recorded and published (or waiting to be); no agent holds it.
    QUEUED = "queued", "queued"
    #: Delivered while every slot of its task's concurrency limit was taken: it waits in the
    #: database, holding no worker, and is published again when a slot frees.
    WAITING = "waiting", "waiting for a slot"
    #: An agent claimed the current attempt and holds its lease.
    RUNNING = "running", "running"
    #: The last attempt failed with a retryable error; the next one is due at ``next_check_at``.
    RETRYING = "retrying", "retrying"
    #: An attempt completed successfully.
    SUCCEEDED = "succeeded", "succeeded"
    #: An attempt raised a non-retryable error.
    FAILED = "failed", "failed"
    #: Attempts exhausted (errors, lost agents or timeouts).
    DEAD = "dead", "dead"
    #: Cancelled by an operator before it completed.
    CANCELLED = "cancelled", "cancelled"
    #: A scheduled slot that did not start inside its window.
    MISSED = "missed", "missed"
    #: A scheduled slot not run because of the schedule's overlap policy.
    SKIPPED = "skipped", "skipped"


#: Statuses a run never leaves (except by an explicit admin action that creates a new attempt).
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.DEAD,
        RunStatus.CANCELLED,
        RunStatus.MISSED,
        RunStatus.SKIPPED,
    }
)

#: Statuses the supervisor watches. Partial indexes cover exactly these rows.
ACTIVE_STATUSES: frozenset[str] = frozenset(
    {RunStatus.QUEUED, RunStatus.WAITING, RunStatus.RUNNING, RunStatus.RETRYING}
)

#: Terminal statuses an operator should look at: the run did not do its work. ``mark_resolved``
#: acknowledges them; the admin's incident views and partial index cover exactly these rows.
INCIDENT_STATUSES: frozenset[str] = frozenset({RunStatus.FAILED, RunStatus.DEAD, RunStatus.MISSED})


class AttemptOutcome(models.TextChoices):
    """How one attempt ended. ``running`` while it is under way."""

    #: Published, not started by any agent yet.
    PENDING = "pending", "pending"
    #: Claimed by an agent; not finished.
    RUNNING = "running", "running"
    #: Completed successfully.
    SUCCEEDED = "succeeded", "succeeded"
    #: Raised an error (retryable or not; ``error`` says which).
    FAILED = "failed", "failed"
    #: The agent stopped heart-beating (crash, hang, network cut) and the lease expired.
    LOST = "lost", "lost"
    #: Ran past its max runtime; fenced, and its body interrupted by its lease keeper.
    TIMED_OUT = "timed_out", "timed out"
    #: A zombie agent tried to write after losing its lease; its write was refused.
    FENCED = "fenced", "fenced"
    #: Stopped by an operator's cancel request.
    CANCELLED = "cancelled", "cancelled"


# --------------------------------------------------------------------------- moves


@dataclass(frozen=True)
class Move:
    """One kind of status change: a run in any of ``sources`` goes to ``target``.

    ``runs`` applies a move as a conditional ``UPDATE … WHERE status IN (sources) AND …`` whose row
    count says whether this process won; ``sources`` and ``target`` travel as query parameters.
    """

    name: str
    sources: frozenset[str]
    target: str
    #: Who makes it: ``agent`` (a worker), ``supervisor``, ``scheduler`` (beat or sweep) or ``operator``.
    by: str
    #: The edge's label in the state diagram (``docs/make_state_diagram.py``); empty: no label.
    label: str = ""

    @property
    def source(self) -> str:
        """The single source status of a move that has one (SQL that compares with ``=``)."""
        if len(self.sources) != 1:
            raise ValueError(f"move {self.name!r} has {len(self.sources)} source statuses")
        return next(iter(self.sources))

    @property
    def source_list(self) -> list[str]:
        """The sources, sorted (a stable ``IN (…)`` list)."""
        return sorted(self.sources)


def _move(name: str, sources: set[str] | str, target: str, by: str, label: str = "") -> Move:
    return Move(name, frozenset({sources} if isinstance(sources, str) else sources), target, by, label)


Q, R, T, W = RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.RETRYING, RunStatus.WAITING

#: An agent won the delivery of the current attempt.
CLAIM = _move("claim", Q, R, "agent", "claimed")
#: Delivered while every slot of its concurrency limit was taken: it waits, holding no worker.
WAIT_FOR_SLOT = _move("wait_for_slot", Q, W, "agent", "concurrency limit\nreached")
#: A slot of its concurrency limit freed (a run of the key ended, or was recovered): published again.
RELEASE_WAITER = _move("release_waiter", W, Q, "supervisor", "slot freed")
#: The body returned.
SUCCEED = _move("succeed", R, RunStatus.SUCCEEDED, "agent", "completed")
#: A non-retryable error.
FAIL = _move("fail", R, RunStatus.FAILED, "agent", "non-retryable")
#: A retryable error with attempts left: wait out the backoff.
RETRY_LATER = _move("retry_later", R, T, "agent", "retryable error")
#: A retryable error on the last attempt.
EXHAUST = _move("exhaust", R, RunStatus.DEAD, "agent", "attempts exhausted")
#: The body stopped at a heartbeat after an operator's cancel.
STOP_CANCELLED = _move("stop_cancelled", R, RunStatus.CANCELLED, "agent")
#: The lease expired (or the max runtime passed) and attempts remain: a new attempt is queued.
REQUEUE = _move("requeue", R, Q, "supervisor", "lease lost / timed out:\nnew attempt")
#: The lease expired (or the max runtime passed) on the last attempt.
BURY = _move("bury", R, RunStatus.DEAD, "supervisor", "")
#: A cancelled run whose agent died or did not stop within the grace period.
FORCE_CANCEL = _move("force_cancel", R, RunStatus.CANCELLED, "supervisor", "")
#: A retry's backoff is over: the next attempt is queued.
DISPATCH_RETRY = _move("dispatch_retry", T, Q, "supervisor", "backoff over")
#: A queued attempt nobody started in time is published again (same attempt).
REPUBLISH = _move("republish", Q, Q, "supervisor", "republished")
#: A cancel that reached a run waiting out its backoff.
CANCEL_RETRYING = _move("cancel_retrying", T, RunStatus.CANCELLED, "supervisor", "")
#: An operator cancelled a run no agent holds.
CANCEL_WAITING = _move("cancel_waiting", {Q, T, W}, RunStatus.CANCELLED, "operator")
#: A scheduled run not started inside its start window.
EXPIRE_UNSTARTED = _move("expire_unstarted", Q, RunStatus.MISSED, "scheduler", "start window over")
#: A ``queue_one`` run, held while its schedule had an active run, is published.
RELEASE_HELD = _move("release_held", Q, Q, "scheduler", "")
#: A held ``queue_one`` run whose schedule was deleted or disabled: nothing will ever release it.
CANCEL_HELD = _move("cancel_held", Q, RunStatus.CANCELLED, "scheduler", "")
#: An attempt published ``SUPERVISOR_MAX_PUBLISHES`` times that no worker ever started (a task no
#: worker knows, a queue nobody consumes): the run ends instead of waiting for ever.
NEVER_STARTED = _move("never_started", Q, RunStatus.DEAD, "supervisor", "never started")
#: An operator's "retry now": a new attempt for a run in any status but running. The only move out
#: of a terminal status.
REOPEN = _move("reopen", {s.value for s in RunStatus} - {R}, Q, "operator", "retry now")

#: Every status change the package makes.
MOVES: tuple[Move, ...] = (
    CLAIM,
    WAIT_FOR_SLOT,
    RELEASE_WAITER,
    SUCCEED,
    FAIL,
    RETRY_LATER,
    EXHAUST,
    STOP_CANCELLED,
    REQUEUE,
    BURY,
    FORCE_CANCEL,
    DISPATCH_RETRY,
    REPUBLISH,
    CANCEL_RETRYING,
    CANCEL_WAITING,
    EXPIRE_UNSTARTED,
    RELEASE_HELD,
    CANCEL_HELD,
    NEVER_STARTED,
    REOPEN,
)


def _transitions() -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {}
    for move in MOVES:
        for source in move.sources:
            if source not in TERMINAL_STATUSES:  # REOPEN out of a terminal status is an operator's act
                table.setdefault(source, set()).add(move.target)
    return {source: frozenset(targets) for source, targets in table.items()}


#: Allowed status transitions, drawn from :data:`MOVES`. Everything not listed is refused (see
#: :func:`can_transition`); terminal statuses are left only by :data:`REOPEN`.
TRANSITIONS: dict[str, frozenset[str]] = _transitions()


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def can_transition(current: str, new: str) -> bool:
    """True when ``current -> new`` is an allowed move of the state machine."""
    return new in TRANSITIONS.get(current, frozenset())


#: What a failed attempt's decision (``retry.decide_failure``) does to the run, by target status.
FAILURE_MOVES: dict[str, Move] = {m.target: m for m in (FAIL, RETRY_LATER, EXHAUST)}


# --------------------------------------------------------------------------- liveness


@dataclass(frozen=True)
class Watch:
    """Why an active run cannot be forgotten: the column whose time the sweep acts on, what it does
    then, and the bound that ends the run (or the explicit reason it may wait, which health reports)."""

    status: str
    #: The column the sweep selects on (``next_check_at IS NULL``: the held ``queue_one`` run).
    column: str
    action: str
    #: What ends it for good, whatever happens: the way out.
    bound: str


#: Every active status has a deadline the supervisor's sweep acts on ("every run has a way out").
#: The README's liveness table is this one (``tests/unit/test_moves.py`` keeps them equal).
LIVENESS: tuple[Watch, ...] = (
    Watch(
        RunStatus.RUNNING,
        "lease_expires_at",
        "lease expired (agent lost): a new attempt",
        "`dead` after `max_attempts`",
    ),
    Watch(
        RunStatus.RUNNING,
        "deadline_at",
        "max runtime or cancel grace passed: its agent stops the body, then retried or `cancelled`",
        "`dead` after `max_attempts`",
    ),
    Watch(
        RunStatus.RETRYING,
        "next_check_at",
        "backoff over: the next attempt is queued",
        "backoff capped at `SUPERVISOR_BACKOFF_MAX`",
    ),
    Watch(
        RunStatus.QUEUED,
        "next_check_at",
        "not started within the start timeout: its queue is asked; left waiting behind a healthy backlog "
        "or while no queue has a consumer (health reports it); else published again (backoff capped at "
        "10 min; behind a backlog once per `SUPERVISOR_MAX_BACKLOG_WAIT`)",
        "`dead` after `SUPERVISOR_MAX_PUBLISHES` publishes of a lost message or to an unconsumed queue: "
        "never started, no worker took it",
    ),
    Watch(
        RunStatus.QUEUED,
        "next_check_at IS NULL",
        "`queue_one` run held behind its schedule's active run: released when that run ends",
        "waits for that run (health reports it held); `cancelled` if the schedule is deleted or disabled",
    ),
    Watch(
        RunStatus.WAITING,
        "concurrency_key",
        "a slot of its concurrency limit is free (a run of the key ended or was recovered): published again",
        "waits while the limit's slots are taken, each by a running run bounded by its lease and max runtime "
        "(health reports it waiting)",
    ),
)
