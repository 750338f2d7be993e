"""Celery task ids of attempts: one rule for every path that names one."""

from __future__ import annotations

import uuid


def first_task_id(run_id: int) -> str:
    """Attempt 1's id, derived from the run id so that dispatch stays one statement (no write-back)."""
    return f"{run_id}.1"


def new_task_id(run_id: int, attempt: int, token: str | None = None) -> str:
    """A later attempt's id. Each attempt gets its own, so nothing addressed to a timed-out attempt
    reaches the next; ``token`` (random by default) keeps ids unique across a database that was reset."""
    return f"{run_id}.{attempt}.{token or new_token()}"


def new_token() -> str:
    return uuid.uuid4().hex[:12]
