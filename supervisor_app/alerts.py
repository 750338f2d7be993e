"""Alert channels: e-mail through Django's mail and a JSON webhook, rate-limited in the database.

Receivers of ``run_dead``, ``run_failed``, ``run_missed`` and ``run_recovered`` (connected in
``AppConfig.ready``) turn each event into an :class:`Alert` and route it by the run's schedule policy
(else the ``SUPERVISOR_ALERT_*`` settings):

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
counted, and once the window is over the sweep sends one digest per channel (claimed with a
conditional update, so exactly one supervisor sends it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .conf import supervisor_settings
from .states import NonRetryable

if TYPE_CHECKING:
    from .models import SupervisedRun
    from .supervisor import SweepReport

logger = logging.getLogger("supervisor_app.alerts")

#: The supervised task that POSTs webhook alerts (``alert_tasks.deliver_webhook``).
WEBHOOK_TASK = "supervisor_app.deliver_webhook"
#: Events a schedule (or the settings) can choose to be alerted about.
EVENTS: tuple[str, ...] = ("dead", "failed", "missed", "recovered")
#: Only so much of an error message goes into an alert.
MAX_ERROR = 2000
#: Rate-limit rows older than this are deleted by the sweep.
KEEP_WINDOWS = timedelta(days=2)


class WebhookError(Exception):
    """A webhook delivery failed (after its in-task retries): the supervisor retries the run later."""


class WebhookRefused(WebhookError, NonRetryable):
    """The webhook answered 4xx (not 429): asking again won't help, the delivery run fails at once."""


# --------------------------------------------------------------------------- pure helpers


def parse_events(value: str | Sequence[str]) -> frozenset[str]:
    """``"dead, failed"`` or ``["dead", "failed"]`` → the set of events; ``none`` means no alerts."""
    items = value.replace(";", ",").split(",") if isinstance(value, str) else list(value)
    names = {str(item).strip().lower() for item in items if str(item).strip()}
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(EVENTS))
    if unknown:
        raise ValueError(f"Unknown alert event(s): {', '.join(unknown)}. Use {', '.join(EVENTS)} or none.")
    return frozenset(names)


def redact_url(url: str) -> str:
    """What of a URL may be logged: scheme and host. Paths, queries and user info often hold tokens."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    hidden = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def check_webhook_url(url: str) -> None:
    """Only http(s) URLs: ``urllib`` would also open ``file://`` and ``ftp://``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"a webhook URL must be http or https, not {scheme or 'schemeless'} ({redact_url(url)})")


def channel_key(kind: str, destination: str) -> str:
    """Rate-limit key of a destination: a hash, so no address or token is stored twice."""
    return f"{kind}:{hashlib.sha256(destination.encode()).hexdigest()[:32]}"


def window_start(now: datetime, window: float) -> datetime:
    """Start of the fixed window holding ``now`` (windows are aligned on the epoch)."""
    epoch = now.timestamp()
    return datetime.fromtimestamp(epoch - epoch % window, tz=dt_timezone.utc)


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


# --------------------------------------------------------------------------- alerts and routes


@dataclass(frozen=True)
class Alert:
    """One message, ready for every channel: a subject and text for mail, a JSON payload for hooks."""

    event: str
    subject: str
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


def _run_dict(run: SupervisedRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "task": run.task_name,
        "status": run.status,
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "scheduled_for": run.scheduled_for.isoformat() if run.scheduled_for else None,
        "periodic_task_id": run.periodic_task_id,
        "error": (run.last_error or "")[:MAX_ERROR],
    }


def build_alert(event: str, runs: Sequence[SupervisedRun], schedule: str = "", reason: str = "") -> Alert:
    """The alert for ``event`` on ``runs`` (several only for slots of one schedule missed together)."""
    run = runs[0]
    what = schedule or run.task_name
    if event == "missed":
        listed = ", ".join(r.scheduled_for.isoformat() if r.scheduled_for else f"run {r.pk}" for r in runs[:20])
        more = f" and {len(runs) - 20} more" if len(runs) > 20 else ""
        subject = f"[supervisor] {what}: {len(runs)} missed slot(s)"
        text = f"Schedule {what!r} missed {len(runs)} slot(s): {listed}{more}.\nReason: {reason or run.last_error}\n"
    else:
        verb = {
            "dead": f"is dead after {run.attempt} attempt(s)",
            "failed": "failed with a non-retryable error",
            "recovered": f"lost its worker on attempt {run.attempt - 1} and was re-queued",
        }.get(event, event)
        subject = f"[supervisor] {what}: run {run.pk} {event}"
        text = f"Run {run.pk} of {run.task_name} {verb}."
        if reason:
            text += f"\nReason: {reason}"
        if run.last_error and event in ("dead", "failed"):
            text += f"\nLast error: {run.last_error[:MAX_ERROR]}"
        text += "\n"
    payload = {
        "event": event,
        "schedule": schedule or None,
        "reason": reason or None,
        "count": len(runs),
        "runs": [_run_dict(r) for r in runs[:100]],
        # Chat tools (Slack, Mattermost, Teams connectors) display ``text``.
        "text": f"{subject}\n{text}".strip(),
    }
    return Alert(event, subject, text, payload)


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
    from .models import SupervisionPolicy

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
        from .models import SupervisionPolicy

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
    from django.db.models import F

    from .health import db_now
    from .models import AlertWindow

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
    from .alert_tasks import deliver_webhook

    options: dict[str, Any] = {}
    if supervisor_settings.ALERT_QUEUE:
        options["queue"] = supervisor_settings.ALERT_QUEUE
    try:
        deliver_webhook.apply_async((payload, policy_id), **options)
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


# --------------------------------------------------------------------------- signal receivers


def on_run_dead(sender: Any, run: SupervisedRun, reason: str = "", **kwargs: Any) -> None:
    notify("dead", [run], {"lost": "its worker was lost", "timed_out": "it ran past its max runtime"}.get(reason, ""))


def on_run_failed(sender: Any, run: SupervisedRun, **kwargs: Any) -> None:
    notify("failed", [run])


def on_run_recovered(sender: Any, run: SupervisedRun, **kwargs: Any) -> None:
    notify("recovered", [run])


def on_run_missed(sender: Any, run: SupervisedRun, reason: str = "", batch: Sequence[Any] = (), **kwargs: Any) -> None:
    """Slots of one schedule missed together (``batch``) make one alert, sent with the first."""
    if batch and batch[0].pk != run.pk:
        return
    notify("missed", list(batch) or [run], reason)


def connect() -> None:
    """Connect the receivers (from ``AppConfig.ready``; idempotent through ``dispatch_uid``)."""
    from . import signals
    from .models import SupervisedRun

    for signal, receiver in (
        (signals.run_dead, on_run_dead),
        (signals.run_failed, on_run_failed),
        (signals.run_recovered, on_run_recovered),
        (signals.run_missed, on_run_missed),
    ):
        signal.connect(receiver, sender=SupervisedRun, dispatch_uid=f"supervisor_app.alerts.{receiver.__name__}")


# --------------------------------------------------------------------------- digests (a sweep phase)


_last_cleanup = 0.0


def digest_alert(row: Any, window: float, limit: int) -> Alert:
    from django.db.models import Count

    from .models import SupervisedRun
    from .states import RunStatus

    end = row.window_start + timedelta(seconds=window)
    counts = dict(
        SupervisedRun.objects.filter(
            status__in=[RunStatus.FAILED, RunStatus.DEAD, RunStatus.MISSED],
            finished_at__gte=row.window_start,
            finished_at__lt=end,
        )
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    summary = ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"
    subject = f"[supervisor] {row.suppressed} alert(s) held back by the rate limit"
    text = (
        f"{row.suppressed} further alert(s) of this channel were not sent between {row.window_start.isoformat()} "
        f"and {end.isoformat()} (limit: {limit} per {window:.0f}s).\n"
        f"Runs that ended failed, dead or missed in that window (all schedules): {summary}.\n"
    )
    payload = {
        "event": "digest",
        "suppressed": row.suppressed,
        "window_start": row.window_start.isoformat(),
        "window_end": end.isoformat(),
        "problems": counts,
        "text": f"{subject}\n{text}".strip(),
    }
    return Alert("digest", subject, text, payload)


def send_digests(report: SweepReport | None = None, deadline: float | None = None) -> int:
    """After each window, one digest per channel that held alerts back; claimed by one process only."""
    global _last_cleanup
    from django.db.models.functions import Now

    from .health import db_now
    from .models import AlertWindow

    now = db_now()
    window = float(supervisor_settings.ALERT_RATE_WINDOW)
    limit = int(supervisor_settings.ALERT_RATE_LIMIT or 0)
    sent = 0
    due = AlertWindow.objects.filter(
        suppressed__gt=0, digest_sent_at__isnull=True, window_start__lte=now - timedelta(seconds=window)
    ).order_by("window_start")[:50]
    for row in due:
        if deadline is not None and time.monotonic() > deadline:
            break
        if not AlertWindow.objects.filter(pk=row.pk, digest_sent_at__isnull=True).update(digest_sent_at=Now()):
            continue  # another supervisor claimed it
        alert = digest_alert(row, window, limit)
        route = row.route or {}
        if route.get("kind") == "email" and route.get("to"):
            send_email(alert, route["to"])
        elif route.get("kind") == "webhook":
            policy_id = route.get("policy")
            url = webhook_url_for(policy_id)
            if url:
                enqueue_webhook(alert.payload, policy_id, url)
        sent += 1
    if time.monotonic() - _last_cleanup > 600:
        _last_cleanup = time.monotonic()
        AlertWindow.objects.filter(window_start__lt=now - max(KEEP_WINDOWS, timedelta(seconds=2 * window))).delete()
    if sent and report is not None:
        report.extra["alert_digests"] = sent
    return sent


def install() -> None:
    """Connect the receivers and register the digest phase of the sweep (idempotent)."""
    from . import supervisor

    connect()
    if digest_phase not in supervisor.EXTRA_PHASES:
        supervisor.EXTRA_PHASES.append(digest_phase)


def digest_phase(report: SweepReport, deadline: float) -> None:
    """The sweep phase: :func:`send_digests` with the sweep's report and deadline."""
    send_digests(report, deadline)


# --------------------------------------------------------------------------- system check


def check_alert_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from django.core.checks import Error

    s = supervisor_settings
    errors: list[Any] = []
    try:
        parse_events(s.ALERT_ON)
    except (ValueError, AttributeError, TypeError) as exc:
        errors.append(Error(f"SUPERVISOR_ALERT_ON: {exc}", id="supervisor_app.E101"))
    url = s.ALERT_WEBHOOK_URL
    if url:
        try:
            check_webhook_url(str(url))
        except ValueError as exc:
            errors.append(Error(f"SUPERVISOR_ALERT_WEBHOOK_URL: {exc}", id="supervisor_app.E102"))
    limit = s.ALERT_RATE_LIMIT
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        errors.append(
            Error(
                f"SUPERVISOR_ALERT_RATE_LIMIT must be an integer >= 1 or None, got {limit!r}", id="supervisor_app.E103"
            )
        )
    retries = s.ALERT_WEBHOOK_RETRIES
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        errors.append(
            Error(
                f"SUPERVISOR_ALERT_WEBHOOK_RETRIES must be an integer >= 0, got {retries!r}", id="supervisor_app.E104"
            )
        )
    return errors
