"""Every read the supervisor, admin and health checks make, as named QuerySet methods.

Each sweep query matches one partial index of ``SupervisedRun.Meta.indexes`` (status plus one
time column), so its cost follows the number of active rows, never the size of the history.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from ..core.states import ACTIVE_STATUSES, RunStatus

if TYPE_CHECKING:
    from .runs import SupervisedRun  # noqa: F401  (named in the QuerySet[...] string below)


class RunQuerySet(models.QuerySet["SupervisedRun"]):
    def active(self) -> RunQuerySet:
        return self.filter(status__in=ACTIVE_STATUSES)

    def stale(self) -> RunQuerySet:
        """Running attempts whose lease expired (by the database's clock): the agent is gone."""
        return self.filter(status=RunStatus.RUNNING, lease_expires_at__lt=Now())

    def overdue(self) -> RunQuerySet:
        """Running attempts past their max runtime."""
        return self.filter(status=RunStatus.RUNNING, deadline_at__isnull=False, deadline_at__lt=Now())

    def due_retries(self) -> RunQuerySet:
        """Runs waiting out a backoff whose next attempt is due."""
        return self.filter(status=RunStatus.RETRYING, next_check_at__lte=Now())

    def unstarted(self) -> RunQuerySet:
        """Queued attempts nobody started in time (lost message, broker down, hung prefetching worker)."""
        return self.filter(status=RunStatus.QUEUED, next_check_at__lte=Now())

    # Workflows: the expressions of the ``supervisor_run_root`` / ``supervisor_run_parent`` indexes
    # (``options -> 'root_id'`` on PostgreSQL, compared as JSON on every backend).

    def in_workflow(self, root_id: str) -> RunQuerySet:
        """Every step of the workflow whose first step has Celery id ``root_id``, that step included."""
        # has_key repeats the indexes' predicate, so that PostgreSQL may use them.
        return self.filter(Q(options__has_key="root_id", options__root_id=root_id) | Q(task_id=root_id))

    def children_of(self, task_id: str) -> RunQuerySet:
        """The runs the run with Celery id ``task_id`` dispatched (its chain's next step, its callbacks)."""
        return self.filter(options__has_key="parent_id", options__parent_id=task_id)
