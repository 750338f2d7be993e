"""The run state machine: statuses, allowed transitions, failure classification and backoff.

Pure functions and enums only: nothing here touches the database, so the rules can be unit-tested
without one. ``services`` applies these rules with conditional SQL updates.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import models


class RunStatus(models.TextChoices):
    """Where a logical run stands. The value strings are part of the public API."""

    #: Recorded and published (or waiting to be); no agent holds it.
    QUEUED = "queued", "queued"
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
ACTIVE_STATUSES: frozenset[str] = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.RETRYING})


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
    #: Ran past its max runtime and was revoked.
    TIMED_OUT = "timed_out", "timed out"
    #: A zombie agent tried to write after losing its lease; its write was refused.
    FENCED = "fenced", "fenced"
    #: Stopped by an operator's cancel request.
    CANCELLED = "cancelled", "cancelled"


#: Allowed status transitions. Everything not listed is refused (see :func:`can_transition`).
TRANSITIONS: dict[str, frozenset[str]] = {
    RunStatus.QUEUED: frozenset(
        {RunStatus.RUNNING, RunStatus.QUEUED, RunStatus.CANCELLED, RunStatus.MISSED, RunStatus.DEAD}
    ),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.SUCCEEDED,
            RunStatus.FAILED,
            RunStatus.RETRYING,
            RunStatus.DEAD,
            RunStatus.QUEUED,  # lease lost or timed out: a new attempt is queued
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.RETRYING: frozenset({RunStatus.QUEUED, RunStatus.CANCELLED, RunStatus.DEAD}),
}


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def can_transition(current: str, new: str) -> bool:
    """True when ``current -> new`` is an allowed move of the state machine."""
    return new in TRANSITIONS.get(current, frozenset())


class NonRetryable(Exception):
    """Raise (or subclass) in a task body to fail the run at once, without further attempts."""


class LeaseLost(Exception):
    """The agent no longer holds the run: another attempt superseded it, or it was finished.

    Raised by ``SupervisedTask.heartbeat()``. Task code should let it propagate and write nothing.
    """


class RunCancelled(LeaseLost):
    """An operator asked to cancel the run; raised at the agent's next heartbeat."""


@dataclass(frozen=True)
class RetryPolicy:
    """How failures of one task are classified and spaced out."""

    max_attempts: int
    backoff: float
    backoff_max: float
    jitter: bool = True
    retryable: tuple[type[BaseException], ...] = (Exception,)
    non_retryable: tuple[type[BaseException], ...] = ()

    def is_retryable(self, exc: BaseException) -> bool:
        """Non-retryable types win over retryable ones; ``NonRetryable`` is never retried."""
        if isinstance(exc, NonRetryable) or isinstance(exc, self.non_retryable):
            return False
        return isinstance(exc, self.retryable)

    def delay(self, attempt: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Exponential (``backoff * 2**(attempt-1)``), capped at ``backoff_max``; with jitter a uniform
        draw in ``[0, capped]`` ("full jitter"), which spreads a burst of failures best.
        """
        capped = min(self.backoff_max, self.backoff * (2 ** max(attempt - 1, 0)))
        if not self.jitter:
            return capped
        return (rand or random).uniform(0, capped)


@dataclass(frozen=True)
class FailureDecision:
    """What to do with a run whose attempt raised."""

    status: str
    retry_in: float | None


def decide_failure(
    policy: RetryPolicy, attempt: int, exc: BaseException, rand: random.Random | None = None
) -> FailureDecision:
    """Classify an attempt's exception: ``failed``, ``retrying`` (with a delay) or ``dead``."""
    if not policy.is_retryable(exc):
        return FailureDecision(RunStatus.FAILED, None)
    if attempt >= policy.max_attempts:
        return FailureDecision(RunStatus.DEAD, None)
    return FailureDecision(RunStatus.RETRYING, policy.delay(attempt, rand))


def decide_lost(attempt: int, max_attempts: int) -> str:
    """A lost or timed-out attempt: re-queue while attempts remain, else ``dead``."""
    return RunStatus.QUEUED if attempt < max_attempts else RunStatus.DEAD


def republish_delay(start_timeout: float, publish_count: int, cap: float = 600.0) -> float:
    """Wait before publishing a still-unstarted attempt again.

    The first re-publish comes after ``start_timeout`` (a hung worker's prefetched message comes
    back as fast as a lost lease); later ones back off so a long, healthy queue is not flooded with
    duplicate messages (duplicates are harmless, the claim drops them, but they cost).
    """
    return min(cap, start_timeout * (2 ** max(publish_count - 1, 0)))


def exception_types(names: Iterable[str | type[BaseException]]) -> tuple[type[BaseException], ...]:
    """Resolve dotted paths (as found in settings or policies) to exception classes."""
    from django.utils.module_loading import import_string

    out: list[type[BaseException]] = []
    for name in names:
        cls = import_string(name) if isinstance(name, str) else name
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name!r} is not an exception class")
        out.append(cls)
    return tuple(out)


#: Terminal statuses an operator should look at: the run did not do its work. ``mark_resolved``
#: acknowledges them; the admin's incident views and partial index cover exactly these rows.
INCIDENT_STATUSES: frozenset[str] = frozenset({RunStatus.FAILED, RunStatus.DEAD, RunStatus.MISSED})
