"""Failure classification, backoff, and the one rule for "is this the last attempt?"."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import NonRetryable
from .states import RunStatus

#: Largest exponent of any doubling: ``2**62`` seconds is past every cap, and a counter that keeps
#: growing (a publish count after a week of republishing, an operator's hundredth retry) can't make
#: ``seconds * 2**n`` overflow a float, which used to fail every sweep that met the row.
MAX_EXPONENT = 62


def doubling(n: int) -> int:
    """``2**n`` for ``n`` clamped to ``[0, MAX_EXPONENT]``: every backoff's growth, bounded."""
    return 2 ** min(max(n, 0), MAX_EXPONENT)


def has_attempts_left(attempt: int, max_attempts: int) -> bool:
    """Whether attempt number ``attempt`` (1-based) may be followed by another: the one place that
    decides between a new attempt and ``dead``, for errors, lost agents and timeouts alike."""
    return attempt < max_attempts


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
        capped = min(self.backoff_max, self.backoff * doubling(attempt - 1))
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
    if not has_attempts_left(attempt, policy.max_attempts):
        return FailureDecision(RunStatus.DEAD, None)
    return FailureDecision(RunStatus.RETRYING, policy.delay(attempt, rand))


def decide_lost(attempt: int, max_attempts: int) -> str:
    """A lost or timed-out attempt: re-queue while attempts remain, else ``dead``."""
    return RunStatus.QUEUED if has_attempts_left(attempt, max_attempts) else RunStatus.DEAD


def republish_delay(start_timeout: float, publish_count: int, cap: float = 600.0) -> float:
    """Wait before publishing a still-unstarted attempt again.

    The first re-publish comes after ``start_timeout`` (a hung worker's prefetched message comes
    back as fast as a lost lease); later ones back off so a long, healthy queue is not flooded with
    duplicate messages (duplicates are harmless, the claim drops them, but they cost).
    """
    return min(cap, start_timeout * doubling(publish_count - 1))


def never_started(publish_count: int, max_publishes: int) -> bool:
    """An attempt published ``max_publishes`` times and still not started by any worker ends
    (``dead``): a task no worker knows, or a queue nobody consumes, would otherwise wait for ever."""
    return publish_count >= max_publishes


#: Why a run ended ``dead`` without ever starting (its ``last_error``, and the alert's reason).
NEVER_STARTED_REASON = "never started: no worker took it — unknown task or unconsumed queue?"


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
