"""Supervision policy choices, each defined once, and the values a run records when it is created.

The choices are used by the model fields (``choices`` and a check constraint), the admin forms, the
system checks of the ``SUPERVISOR_OVERLAP`` / ``SUPERVISOR_CATCH_UP`` settings and the code that acts
on them, which parses every value it reads through :func:`parse_choice`: a value that is not a
member (``"Skip"``) is an error with a clear message everywhere it can enter, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from django.db import models


class Overlap(models.TextChoices):
    """What a slot does while the schedule's previous run is still active."""

    #: Every slot runs, whatever is still running.
    ALLOW = "allow", "allow: run every slot"
    #: A slot whose previous run is still active is recorded ``skipped``.
    SKIP = "skip", "skip while the previous run is active"
    #: One slot waits for the active run to end; further ones are ``skipped``.
    QUEUE_ONE = "queue_one", "queue one behind the active run"
    #: The active run is cancelled and the new slot runs.
    REPLACE = "replace", "replace (cancel) the active run"


class CatchUp(models.TextChoices):
    """What happens to slots that passed their grace unrecorded (a beat was down)."""

    #: Overdue slots are recorded ``missed``.
    NONE = "none", "none: record overdue slots as missed"
    #: The newest overdue slot runs (inside the catch-up window); the others are ``missed``.
    LATEST = "latest", "run the latest overdue slot"
    #: Every overdue slot inside the catch-up window runs; older ones are ``missed``.
    ALL = "all", "run all overdue slots within the window"


class AlertEvent(models.TextChoices):
    """Events a schedule (or the settings) can be alerted about."""

    #: Attempts exhausted.
    DEAD = "dead", "dead"
    #: A non-retryable error.
    FAILED = "failed", "failed"
    #: A slot not run inside its window.
    MISSED = "missed", "missed"
    #: A lost agent's run was re-queued.
    RECOVERED = "recovered", "recovered"
    #: A schedule was disabled after ``pause_after_failures`` consecutive failed or dead runs.
    PAUSED = "paused", "paused"


C = TypeVar("C", bound=models.TextChoices)


def parse_choice(choices: type[C], value: object, where: str) -> C:
    """``value`` as a member of ``choices``; ``ValueError`` naming ``where`` and the allowed values.

    Exact values only: ``"Skip"`` is refused rather than guessed, so a typo fails loudly instead of
    falling through to another policy.
    """
    if isinstance(value, str):
        try:
            return choices(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(c.value) for c in choices)
    raise ValueError(f"{where} must be one of {allowed}; got {value!r}")


@dataclass(frozen=True)
class RunPolicy:
    """The supervision values recorded on a run when it is created."""

    max_attempts: int
    lease_timeout: float
    start_timeout: float
    max_runtime: float | None
