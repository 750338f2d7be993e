"""The Celery tasks of supervisor_app and the public path of ``SupervisedTask``.

Celery's autodiscovery imports this module, which registers the tasks below.

Usage::

    @shared_task(base=SupervisedTask, bind=True, max_attempts=5, lease_timeout=120)
    def nightly_report(self, day):
        for chunk in chunks(day, start=(self.checkpoint or 0)):
            process(chunk)
            self.heartbeat(progress={"chunk": chunk}, checkpoint=chunk + 1)

Tasks defined here (their names are part of the public API):

- ``supervisor_app.sweep``: one supervisor sweep, for beat when no ``manage.py supervise`` runs;
- ``supervisor_app.deliver_webhook``: POSTs one webhook alert (itself a supervised run);
- ``supervisor_app.prune_runs``: retention as a periodic task.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import shared_task

from .core.alerting import WEBHOOK_TASK
from .worker.task import SupervisedTask

logger = logging.getLogger("supervisor_app.alerts")

__all__ = ["SupervisedTask", "deliver_webhook", "prune_runs", "sweep"]


@shared_task(name="supervisor_app.sweep", ignore_result=True)
def sweep() -> dict[str, Any]:
    """One supervisor sweep, to schedule with beat when no ``manage.py supervise`` process runs."""
    from .supervisor import run_sweep

    return run_sweep().as_dict()


@shared_task(
    base=SupervisedTask,
    bind=True,
    name=WEBHOOK_TASK,
    ignore_result=True,
    # An endpoint that is down for minutes: the attempts are spread over about ten minutes (full
    # jitter below 30 s, 60 s, 120 s, 240 s). Change them with CELERY_TASK_ANNOTATIONS.
    max_attempts=5,
    backoff=30.0,
    backoff_max=600.0,
    non_retryable_exceptions=(ValueError,),
)
def deliver_webhook(self: SupervisedTask, payload: dict[str, Any], policy_id: int | None = None) -> int | None:
    """POST one alert to the webhook of a policy (or ``SUPERVISOR_ALERT_WEBHOOK_URL``).

    The URL is looked up here, not carried in the message, so no token sits in the broker, in the
    run's arguments or in a worker's log. Timeout and quick retries come from the
    ``SUPERVISOR_ALERT_WEBHOOK_*`` settings; past them the run is retried by the supervisor with
    the backoff above (held in the database, so nothing piles up in the broker during the outage
    the alert reports), and a delivery that fails for good ends the run ``dead`` or ``failed``
    (a 4xx answer, an invalid URL), which is alerted by e-mail. The URL is redacted everywhere.
    """
    from .alerts.channels import deliver

    return deliver(payload, policy_id)


@shared_task(name="supervisor_app.prune_runs", ignore_result=True)
def prune_runs(older_than: float = 30 * 86400.0, keep_last: int = 10, batch_size: int = 1000) -> int:
    """Retention as a periodic task: ``manage.py prune_runs`` for beat (``older_than`` in seconds)."""
    from .runs.retention import prune_runs as prune

    deleted = prune(timedelta(seconds=older_than), keep_last=keep_last, batch_size=batch_size)
    logger.info("pruned %d finished run(s) older than %s", deleted, timedelta(seconds=older_than))
    return deleted
