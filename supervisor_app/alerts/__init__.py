"""Alerts: e-mail and webhook channels, a rate limit in the database, digests, signal receivers.

- :mod:`.channels`: routes, rate limit, e-mail, webhook hand-off and delivery;
- :mod:`.receivers`: receivers of ``run_dead``, ``run_failed``, ``run_missed``, ``run_recovered``
  (connected in ``AppConfig.ready``);
- :mod:`.digests`: one digest per channel and window (a phase of the supervisor's sweep).

What an alert says (events, messages, URL redaction) is pure and lives in
:mod:`supervisor_app.core.alerting`; the names below are re-exported for convenience.
"""

from ..core.alerting import (
    EVENTS,
    WEBHOOK_TASK,
    Alert,
    WebhookError,
    WebhookRefused,
    build_alert,
    parse_events,
    redact_url,
    window_start,
)
from .channels import Routes, acquire, deliver, dispatch, enqueue_webhook, notify, post_json, routes_for, send_email
from .digests import digest_phase, send_digests

__all__ = [
    "EVENTS",
    "WEBHOOK_TASK",
    "Alert",
    "Routes",
    "WebhookError",
    "WebhookRefused",
    "acquire",
    "build_alert",
    "deliver",
    "digest_phase",
    "dispatch",
    "enqueue_webhook",
    "notify",
    "parse_events",
    "post_json",
    "redact_url",
    "routes_for",
    "send_digests",
    "send_email",
    "window_start",
]
