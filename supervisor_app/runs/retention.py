"""Deleting old finished runs, in batches (``manage.py prune_runs`` and the ``supervisor_app.prune_runs`` task)."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.db.models import F, Window
from django.db.models.functions import RowNumber

from ..core.states import TERMINAL_STATUSES
from ..db import after
from ..models import RunAttempt, SupervisedRun


def prune_runs(older_than: timedelta, keep_last: int = 10, batch_size: int = 1000, dry_run: bool = False) -> int:
    """Delete terminal runs finished more than ``older_than`` ago, in batches (attempts cascade).

    The last ``keep_last`` runs of every schedule are kept whatever their age, so the admin always
    shows a schedule's recent history. Active runs are never touched. Returns the number of runs.
    """
    keep: set[int] = set()
    if keep_last:
        ranked = (
            SupervisedRun.objects.filter(periodic_task__isnull=False)
            .annotate(rank=Window(RowNumber(), partition_by=[F("periodic_task_id")], order_by=F("id").desc()))
            .filter(rank__lte=keep_last)
            .values_list("pk", flat=True)
        )
        keep = set(ranked)
    old = SupervisedRun.objects.filter(status__in=TERMINAL_STATUSES, finished_at__lt=after(-older_than))
    if dry_run:
        return old.exclude(pk__in=keep).count()
    deleted = 0
    while True:
        ids = list(old.exclude(pk__in=keep).order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        with transaction.atomic():
            # Selected a moment ago: an operator may have reopened one since ("retry now"). Lock the
            # rows that are still terminal and old, re-checked in the locking statement itself; a
            # reopened run is left out, and none can be reopened until these are gone.
            gone = list(old.filter(pk__in=ids).select_for_update().values_list("pk", flat=True))
            RunAttempt.objects.filter(run_id__in=gone).delete()
            SupervisedRun.objects.filter(pk__in=gone, status__in=TERMINAL_STATUSES).delete()
        deleted += len(gone)
