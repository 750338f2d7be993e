"""The exceptions task code raises (``NonRetryable``) or receives (``LeaseLost``, ``RunCancelled``).

Re-exported as ``supervisor_app.NonRetryable`` (and ``LeaseLost``, ``RunCancelled``).
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
