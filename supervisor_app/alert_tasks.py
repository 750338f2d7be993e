"""Celery tasks of the operations side: webhook alert delivery and periodic retention.

Imported by :mod:`supervisor_app.tasks`, so Celery's autodiscovery registers them with the rest.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

logger = logging.getLogger("supervisor_app.alerts")


@shared_task(name="supervisor_app.deliver_webhook", ignore_result=True)
def deliver_webhook(payload: dict[str, Any], policy_id: int | None = None) -> int | None:
    """POST one alert to the webhook of a policy (or ``SUPERVISOR_ALERT_WEBHOOK_URL``).

    The URL is looked up here, not carried in the message, so no token sits in the broker or in a
    worker's log of task arguments. Timeout and retries come from the ``SUPERVISOR_ALERT_WEBHOOK_*``
    settings. A delivery that fails for good is logged (URL redacted) and dropped: alerting must not
    pile up retries in the broker during the very outage it reports.
    """
    from .alerts import WebhookError, post_json, redact_url, webhook_url_for
    from .conf import supervisor_settings as s

    url = webhook_url_for(policy_id)
    if not url:
        logger.warning("webhook alert %s dropped: no webhook URL is configured any more", payload.get("event"))
        return None
    try:
        status = post_json(
            url,
            payload,
            timeout=float(s.ALERT_WEBHOOK_TIMEOUT),
            retries=int(s.ALERT_WEBHOOK_RETRIES),
            backoff=float(s.ALERT_WEBHOOK_BACKOFF),
        )
    except (WebhookError, ValueError) as exc:
        logger.error("webhook alert %s not delivered: %s", payload.get("event"), exc)
        return None
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
