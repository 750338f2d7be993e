"""Celery's ``STARTED`` state for supervised tasks: stored by the delivery that won its claim, never by
a duplicate.

Celery's tracer stores ``STARTED`` (with ``track_started`` and a result backend) *before* the task's
code runs, so every delivery stores it: a duplicate or late delivery of a finished attempt (a message
published again, a broker redelivery) overwrote the stored ``SUCCESS`` with ``STARTED``, for good.
``SupervisedTask`` therefore shows the tracer ``track_started = False`` and keeps the configured value
(the task's option, else ``task_track_started``) as ``report_started``; the agent stores ``STARTED``
here once its claim is won. A delivery that is dropped (``Ignore``) writes nothing to the backend.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("supervisor_app")


def wanted(task: Any) -> bool:
    """Whether this execution of ``task`` should store ``STARTED``: configured, and results kept.

    Whether results are kept is asked first: it is two attribute reads, where Celery's setting is a
    lookup through every layer of its configuration (a noticeable share of a no-op task)."""
    from celery.app.task import get_actual_ignore_result  # type: ignore[attr-defined]

    if get_actual_ignore_result(task, task.request):
        return False
    configured = getattr(task, "report_started", None)
    if configured is None:
        configured = task.app.conf.task_track_started
    return bool(configured)


def store_started(task: Any, worker: str) -> None:
    """Store ``STARTED`` for the current request, as Celery's tracer would have (pid, hostname).

    A backend that can't be written to is logged, not raised: the run is claimed and goes on (its
    state is the database's; the backend's is a convenience)."""
    if not wanted(task):
        return
    from celery import states

    request = task.request
    try:
        task.backend.store_result(request.id, {"pid": os.getpid(), "hostname": worker}, states.STARTED, request=request)
    except Exception as exc:
        logger.warning("task %s: STARTED not stored in the result backend (%s)", request.id, type(exc).__name__)
