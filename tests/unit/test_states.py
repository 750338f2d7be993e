"""The pure state machine: no database, no broker."""

from __future__ import annotations

import random

import pytest

from supervisor_app.core.errors import NonRetryable
from supervisor_app.core.retry import RetryPolicy, decide_failure, decide_lost, exception_types, republish_delay
from supervisor_app.core.states import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    RunStatus,
    can_transition,
    is_terminal,
)


def test_status_values_are_the_designed_strings() -> None:
    assert [s.value for s in RunStatus] == [
        "queued", "waiting", "running", "retrying", "succeeded", "failed", "dead", "cancelled", "missed",
        "skipped",
    ]  # fmt: skip


def test_every_status_is_active_or_terminal_never_both() -> None:
    assert ACTIVE_STATUSES.isdisjoint(TERMINAL_STATUSES)
    assert ACTIVE_STATUSES | TERMINAL_STATUSES == {s.value for s in RunStatus}


def test_terminal_states_have_no_way_out() -> None:
    for status in TERMINAL_STATUSES:
        assert is_terminal(status)
        assert status not in TRANSITIONS
        for target in RunStatus:
            assert not can_transition(status, target)


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        ("queued", "running", True),
        ("running", "succeeded", True),
        ("running", "queued", True),  # lost lease: new attempt
        ("retrying", "queued", True),
        ("retrying", "running", False),  # a retry must be queued (and published) first
        ("queued", "succeeded", False),
        ("succeeded", "running", False),
    ],
)
def test_transitions(current: str, new: str, allowed: bool) -> None:
    assert can_transition(current, new) is allowed


def policy(**kw: object) -> RetryPolicy:
    base: dict[str, object] = dict(max_attempts=3, backoff=1.0, backoff_max=10.0, jitter=False)
    base.update(kw)
    return RetryPolicy(**base)  # type: ignore[arg-type]


def test_non_retryable_fails_at_once_even_with_attempts_left() -> None:
    decision = decide_failure(policy(), 1, NonRetryable("no"))
    assert decision.status == RunStatus.FAILED and decision.retry_in is None


def test_configured_non_retryable_types_win_over_retryable() -> None:
    p = policy(retryable=(Exception,), non_retryable=(KeyError,))
    assert decide_failure(p, 1, KeyError("k")).status == RunStatus.FAILED
    assert decide_failure(p, 1, ValueError("v")).status == RunStatus.RETRYING


def test_exception_outside_retryable_types_fails() -> None:
    p = policy(retryable=(ConnectionError,))
    assert decide_failure(p, 1, ValueError()).status == RunStatus.FAILED
    assert decide_failure(p, 1, ConnectionError()).status == RunStatus.RETRYING


def test_retryable_until_attempts_run_out_then_dead() -> None:
    p = policy(max_attempts=3)
    assert decide_failure(p, 1, ValueError()).status == RunStatus.RETRYING
    assert decide_failure(p, 2, ValueError()).status == RunStatus.RETRYING
    assert decide_failure(p, 3, ValueError()).status == RunStatus.DEAD


def test_backoff_is_exponential_and_capped() -> None:
    p = policy(backoff=1.0, backoff_max=5.0)
    assert [p.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_stays_within_the_capped_delay() -> None:
    p = policy(backoff=2.0, backoff_max=100.0, jitter=True)
    rand = random.Random(42)
    delays = [p.delay(3, rand) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 100  # actually spread out


def test_lost_attempt_requeues_until_attempts_run_out() -> None:
    assert decide_lost(1, 3) == RunStatus.QUEUED
    assert decide_lost(3, 3) == RunStatus.DEAD


def test_republish_backs_off_after_the_first_timeout() -> None:
    assert republish_delay(10, 1) == 10
    assert republish_delay(10, 2) == 20
    assert republish_delay(10, 30) == 600


def test_exception_types_resolve_dotted_paths_and_reject_non_exceptions() -> None:
    assert exception_types(["builtins.KeyError", ValueError]) == (KeyError, ValueError)
    with pytest.raises(TypeError):
        exception_types(["builtins.len"])
    with pytest.raises(ImportError):
        exception_types(["no.such.Thing"])
