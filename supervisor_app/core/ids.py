"""Celery task ids of runs: one rule for every path that names one."""

from __future__ import annotations

import uuid


def new_task_id() -> str:
    """A run's Celery id: a UUID, as Celery's own, so that projects sharing a result backend (staging
    and production, two services) never read each other's results. Every attempt of the run is
    published under it, so the caller's handle follows the run across recoveries."""
    return str(uuid.uuid4())


def legacy_task_id(run_id: int) -> str:
    """The id attempt 1 of a run recorded before migration 0014 was published under (the row kept no
    id until an agent claimed it)."""
    return f"{run_id}.1"
