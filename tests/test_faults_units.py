"""Fault-suite findings that need no processes (issue 6)."""

from __future__ import annotations

from typing import Any

from project.tasks import bad_heartbeat, noop
from supervisor_app import NonRetryable
from supervisor_app.states import RunStatus, decide_failure


def test_retry_policy_of_a_task_without_its_own_backoff_uses_the_settings(settings: Any) -> None:
    """Regression: the policy read ``supervisor_settings.backoff``/``backoff_max``, which do not exist,
    so every failure of a task without its own backoff crashed the agent's finish: the error was not
    recorded, a non-retryable error was retried, and the attempt waited for its lease to expire."""
    settings.SUPERVISOR_BACKOFF = 3.0
    settings.SUPERVISOR_BACKOFF_MAX = 30.0
    policy = noop.retry_policy()
    assert (policy.backoff, policy.backoff_max) == (3.0, 30.0)
    assert decide_failure(policy, 1, NonRetryable("bad")).status == RunStatus.FAILED
    assert decide_failure(policy, 1, ValueError("again")).status == RunStatus.RETRYING
    assert bad_heartbeat.retry_policy().backoff == 0.1  # a task's own value still wins
