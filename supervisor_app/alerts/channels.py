"""Alert channels: e-mail through Django's mail and a JSON webhook, rate-limited in the database.

Each event is turned into an :class:`~supervisor_app.core.alerting.Alert` and routed by the run's
schedule policy (else the ``SUPERVISOR_ALERT_*`` settings):

- **e-mail** is sent in the process that saw the event (it still works when the broker is the thing
  that is down; set Django's ``EMAIL_TIMEOUT`` so a slow mail server cannot hold a sweep for long);
- **webhook** requests are sent by the ``supervisor_app.deliver_webhook`` task (timeout, retries with
  backoff), so a sweep never waits on someone else's HTTP endpoint. That task is itself supervised:
  each alert is a recorded run, recovered if its worker dies, retried with backoff while the
  endpoint is down (held in the database, not the broker), visible in the admin, and alerted by
  e-mail when it fails for good. The URL never travels in the message nor appears in logs: the task
  looks it up again from the policy or the setting.

Each channel may send ``SUPERVISOR_ALERT_RATE_LIMIT`` alerts per ``SUPERVISOR_ALERT_RATE_WINDOW``.
The counter is a row per (channel, window) updated conditionally (``sent < limit``), so several
supervisors and workers share one limit without any lock in memory; alerts over the limit are
counted, and once the window is over the sweep sends one digest per channel (:mod:`.digests`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db.models import F

from .. import registry
from ..conf import supervisor_settings
from ..core.alerting import (
    WEBHOOK_TASK,
    Alert,
    WebhookError,
    WebhookRefused,
    build_alert,
    channel_key,
    check_webhook_url,
    parse_events,
    redact_url,
    window_start,
)
from ..db import db_now
from ..models import AlertWindow, SupervisionPolicy

if TYPE_CHECKING:
    from ..models import SupervisedRun

logger = logging.getLogger("supervisor_app.alerts")


# --------------------------------------------------------------------------- HTTP


def post_json(
    url: str,
    payload: dict[str, Any],
    *,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """POST ``payload`` as JSON; retry on timeouts, connection errors, 5xx and 429. Returns the status.

    Raises :class:`WebhookError` (whose message never contains the URL) when it gives up.
    """
    check_webhook_url(url)
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "supervisor-app alerts"},
    )
    error = ""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # the scheme is checked above
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response's socket
            error = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code != 429:
                raise WebhookRefused(f"{redact_url(url)} refused the alert: {error}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            error = f"{type(reason).__name__}: {reason}".replace(url, redact_url(url))
        if attempt < retries:
            delay = min(backoff * 2**attempt, 30.0)
            logger.info(
                "webhook %s failed (%s); retry %d/%d in %.1fs", redact_url(url), error, attempt + 1, retries, delay
            )
            sleep(delay)
    raise WebhookError(f"{redact_url(url)} failed after {retries + 1} tries: {error}")


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Routes:
    """Where the alerts of one schedule (or of runs without one) go."""

    events: frozenset[str]
    recipients: tuple[str, ...]
    webhook_url: str
    #: The policy the webhook URL comes from (None: the setting): the task looks the URL up again.
    policy_id: int | None
    schedule: str = ""


def routes_for(periodic_task_id: int | None) -> Routes:
    """The policy of a schedule, field by field, else the settings (one query for a scheduled run)."""
    s = supervisor_settings
    policy = None
    schedule = ""
    if periodic_task_id is not None:
        policy = (
            SupervisionPolicy.objects.filter(periodic_task_id=periodic_task_id).select_related("periodic_task").first()
        )
        if policy is None:
            from django_celery_beat.models import PeriodicTask

            schedule = PeriodicTask.objects.filter(pk=periodic_task_id).values_list("name", flat=True).first() or ""
        else:
            schedule = policy.periodic_task.name
    events = parse_events(policy.alert_on if policy and policy.alert_on else s.ALERT_ON)
    recipients = tuple(policy.recipients() if policy and policy.alert_recipients else s.ALERT_RECIPIENTS)
    if policy and policy.alert_webhook_url:
        return Routes(events, recipients, policy.alert_webhook_url, policy.pk, schedule)
    return Routes(events, recipients, s.ALERT_WEBHOOK_URL or "", None, schedule)


def webhook_url_for(policy_id: int | None) -> str:
    """The URL a webhook task posts to, looked up at sending time (never carried in the message)."""
    if policy_id is not None:
        url = SupervisionPolicy.objects.filter(pk=policy_id).values_list("alert_webhook_url", flat=True).first()
        if url:
            return url
    return str(supervisor_settings.ALERT_WEBHOOK_URL or "")


# --------------------------------------------------------------------------- rate limit


def acquire(channel: str, route: dict[str, Any], now: datetime | None = None) -> bool:
    """Take one alert from the channel's budget for the current window; False when it is spent.

    Two statements, safe with any number of processes: an insert that ignores a conflict, then
    ``UPDATE … SET sent = sent + 1 WHERE sent < limit`` whose row count is the answer.
    """
    limit = supervisor_settings.ALERT_RATE_LIMIT
    if limit is None:
        return True
    start = window_start(now or db_now(), float(supervisor_settings.ALERT_RATE_WINDOW))
    AlertWindow.objects.bulk_create(
        [AlertWindow(channel=channel, window_start=start, route=route)], ignore_conflicts=True
    )
    rows = AlertWindow.objects.filter(channel=channel, window_start=start)
    if rows.filter(sent__lt=int(limit)).update(sent=F("sent") + 1):
        return True
    rows.update(suppressed=F("suppressed") + 1)
    return False


# --------------------------------------------------------------------------- delivery


def send_email(alert: Alert, recipients: Sequence[str]) -> bool:
    from django.core.mail import send_mail

    try:
        send_mail(alert.subject, alert.text, None, list(recipients))
    except Exception as exc:  # a mail outage must not stop the sweep, the beat or a worker
        logger.error("could not mail the alert %r (%s: %s)", alert.subject, type(exc).__name__, exc)
        return False
    return True


def enqueue_webhook(payload: dict[str, Any], policy_id: int | None, url: str) -> bool:
    """Hand the POST to the ``supervisor_app.deliver_webhook`` task; False when it cannot be published."""
    options: dict[str, Any] = {}
    if supervisor_settings.ALERT_QUEUE:
        options["queue"] = supervisor_settings.ALERT_QUEUE
    try:
        # By name, from Celery's registry: the task is defined at the edge (supervisor_app.tasks).
        registry.task(WEBHOOK_TASK).apply_async((payload, policy_id), **options)
    except Exception as exc:  # broker down: the e-mail channel and the log still tell
        logger.error(
            "could not queue the webhook alert for %s (%s); event %s",
            redact_url(url),
            type(exc).__name__,
            payload["event"],
        )
        return False
    return True


def dispatch(alert: Alert, routes: Routes) -> dict[str, str]:
    """Send ``alert`` to every channel of ``routes`` that has budget left. Returns what happened."""
    done: dict[str, str] = {}
    if alert.event not in routes.events:
        return done
    if routes.recipients:
        key = channel_key("email", ",".join(sorted(routes.recipients)))
        if acquire(key, {"kind": "email", "to": list(routes.recipients)}):
            done["email"] = "sent" if send_email(alert, routes.recipients) else "error"
        else:
            done["email"] = "suppressed"
    if routes.webhook_url:
        key = channel_key("webhook", routes.webhook_url)
        if acquire(key, {"kind": "webhook", "policy": routes.policy_id}):
            queued = enqueue_webhook(alert.payload, routes.policy_id, routes.webhook_url)
            done["webhook"] = "queued" if queued else "error"
        else:
            done["webhook"] = "suppressed"
    if any(v == "suppressed" for v in done.values()):
        logger.info("alert %r held back by the rate limit (%s)", alert.subject, done)
    return done


def notify(event: str, runs: Sequence[SupervisedRun], reason: str = "") -> dict[str, str]:
    """Alert about ``runs`` (all of one schedule) if their routes want ``event``. Never raises."""
    try:
        routes = routes_for(runs[0].periodic_task_id)
        if runs[0].task_name == WEBHOOK_TASK:
            # An alert delivery that failed is told by e-mail and the log only: sent to the webhook
            # that is failing, it would fail too, and alert again, without end.
            routes = replace(routes, webhook_url="")
        if event not in routes.events or not (routes.recipients or routes.webhook_url):
            return {}
        return dispatch(build_alert(event, runs, routes.schedule, reason), routes)
    except Exception:  # alerts must never break the process that reports the event
        logger.exception("could not send the %s alert of run %s", event, runs[0].pk if runs else None)
        return {}


def deliver(payload: dict[str, Any], policy_id: int | None) -> int | None:
    """The body of the ``supervisor_app.deliver_webhook`` task: POST one alert to the URL of a policy
    (or ``SUPERVISOR_ALERT_WEBHOOK_URL``), looked up now; None when no URL is configured any more."""
    s = supervisor_settings
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
