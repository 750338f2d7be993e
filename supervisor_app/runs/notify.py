"""Lifecycle signals, sent after the transaction that made the change commits (never for a rollback)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import router, transaction

from ..models import SupervisedRun


def send_on_commit(signal: Any, run_id: int, **extra: Any) -> None:
    """Send ``signal`` for one run after commit, with the run read back then."""
    if not signal.has_listeners(SupervisedRun):
        return  # nobody listens: spare the hot path the read-back of the run

    def send() -> None:
        run = SupervisedRun.objects.filter(pk=run_id).first()
        if run is not None:
            signal.send_robust(sender=SupervisedRun, run=run, **extra)

    transaction.on_commit(send, using=router.db_for_write(SupervisedRun))


def send_many_on_commit(signal: Any, extras: Mapping[int, dict[str, Any]]) -> None:
    """Send ``signal`` for many runs after commit, reading them back in one query."""
    if not extras or not signal.has_listeners(SupervisedRun):
        return

    def send() -> None:
        for run in SupervisedRun.objects.filter(pk__in=list(extras)):
            signal.send_robust(sender=SupervisedRun, run=run, **extras[run.pk])

    transaction.on_commit(send, using=router.db_for_write(SupervisedRun))


def send_batch_on_commit(signal: Any, runs: list[SupervisedRun], **extra: Any) -> None:
    """Send ``signal`` for runs already in hand, each with ``batch`` (all of them), after commit: the
    slots of one schedule missed together make one alert."""

    def send() -> None:
        for run in runs:
            signal.send_robust(sender=SupervisedRun, run=run, reason=run.last_error, batch=list(runs), **extra)

    transaction.on_commit(send, using=router.db_for_write(SupervisedRun))
