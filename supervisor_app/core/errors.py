"""The exceptions task code raises (``NonRetryable``) or receives (``LeaseLost``, ``RunCancelled``).

Re-exported as ``supervisor_app.NonRetryable`` (and ``LeaseLost``, ``RunCancelled``, ``RunFailed``).
"""

from __future__ import annotations


class NonRetryable(Exception):
    """Raise (or subclass) in a task body to fail the run at once, without further attempts."""


class LeaseLost(Exception):
    """The agent no longer holds the run: another attempt superseded it, or it was finished.

    Raised by ``SupervisedTask.heartbeat()``. Task code should let it propagate and write nothing.
    """


class RunCancelled(LeaseLost):
    """An operator asked to cancel the run; raised at the agent's next heartbeat."""


class RunFailed(Exception):
    """A run ended without succeeding (``failed``, ``dead``, ``missed``): raised by ``.get()`` on its
    result handle, and stored in a configured result backend when the supervisor, not the task's
    code, decided the outcome (attempts exhausted by lost agents or timeouts). The message holds the
    run's last error."""
