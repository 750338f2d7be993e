"""Receivers of the lifecycle signals that alert: ``run_dead``, ``run_failed``, ``run_missed``,
``run_recovered`` and ``schedule_paused``. Connected by ``AppConfig.ready`` (:func:`connect`), never at import."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import signals
from ..core.alerting import DEAD_REASONS
from ..core.policies import AlertEvent
from ..models import SupervisedRun
from .channels import notify


def on_run_dead(sender: Any, run: SupervisedRun, reason: str = "", **kwargs: Any) -> None:
    notify(AlertEvent.DEAD, [run], DEAD_REASONS.get(reason, ""))


def on_run_failed(sender: Any, run: SupervisedRun, **kwargs: Any) -> None:
    notify(AlertEvent.FAILED, [run])


def on_run_recovered(sender: Any, run: SupervisedRun, **kwargs: Any) -> None:
    notify(AlertEvent.RECOVERED, [run])


def on_run_missed(sender: Any, run: SupervisedRun, reason: str = "", batch: Sequence[Any] = (), **kwargs: Any) -> None:
    """Slots of one schedule missed together (``batch``) make one alert, sent with the first."""
    if batch and batch[0].pk != run.pk:
        return
    notify(AlertEvent.MISSED, list(batch) or [run], reason)


def on_schedule_paused(
    sender: Any, run: SupervisedRun, reason: str = "", batch: Sequence[Any] = (), **kwargs: Any
) -> None:
    """One alert per pause, naming the failed runs that caused it."""
    notify(AlertEvent.PAUSED, list(batch) or [run], reason)


def connect() -> None:
    """Connect the receivers (from ``AppConfig.ready``; idempotent through ``dispatch_uid``)."""
    for signal, receiver in (
        (signals.run_dead, on_run_dead),
        (signals.run_failed, on_run_failed),
        (signals.run_recovered, on_run_recovered),
        (signals.run_missed, on_run_missed),
        (signals.schedule_paused, on_schedule_paused),
    ):
        signal.connect(receiver, sender=SupervisedRun, dispatch_uid=f"supervisor_app.alerts.{receiver.__name__}")
