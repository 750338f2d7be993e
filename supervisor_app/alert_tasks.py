"""Celery tasks of the operations side: webhook alert delivery and periodic retention.

Imported by :mod:`supervisor_app.tasks`, so Celery's autodiscovery registers them with the rest.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from .tasks import SupervisedTask

logger = logging.getLogger("supervisor_app.alerts")


@shared_task(
    base=SupervisedTask,
    bind=True,
    name="supervisor_app.deliver_webhook",
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
    from .alerts import post_json, redact_url, webhook_url_for
    from .conf import supervisor_settings as s

    url = webhook_url_for(policy_id)
    if not url:
        logger.warning("webhook alert %s dropped: no webhook URL is configured any more", payload.get("event"))
        return None
    status = post_json(
        url,
        payload,
        timeout=float(s.ALERT_WEBHOOK_TIMEOUT),
        retries=int(s.ALERT_WEBHOOK_RETRIES),
        backoff=float(s.ALERT_WEBHOOK_BACKOFF),
    )
    logger.info("webhook alert %s delivered to %s (HTTP %s)", payload.get("event"), redact_url(url), status)
    return status


@shared_task(name="supervisor_app.prune_runs", ignore_result=True)
def prune_runs(older_than: float = 30 * 86400.0, keep_last: int = 10, batch_size: int = 1000) -> int:
    """Retention as a periodic task: ``manage.py prune_runs`` for beat (``older_than`` in seconds)."""
    from datetime import timedelta

    from .services import prune_runs as prune

    deleted = prune(timedelta(seconds=older_than), keep_last=keep_last, batch_size=batch_size)
    logger.info("pruned %d finished run(s) older than %s", deleted, timedelta(seconds=older_than))
    return deleted
