"""What an alert says and where it may go: pure helpers, no database, no network.

The channels that send alerts (e-mail, the webhook task) and the rate limit live in
:mod:`supervisor_app.alerts`; this module decides the events, builds the messages and keeps secrets
out of logs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Protocol
from urllib.parse import urlsplit

from .errors import NonRetryable
from .policies import AlertEvent

#: The supervised task that POSTs webhook alerts (``supervisor_app.tasks.deliver_webhook``).
WEBHOOK_TASK = "supervisor_app.deliver_webhook"
#: Events a schedule (or the settings) can choose to be alerted about.
EVENTS: tuple[str, ...] = tuple(e.value for e in AlertEvent)
#: Only so much of an error message goes into an alert.
MAX_ERROR = 2000


class WebhookError(Exception):
    """A webhook delivery failed (after its in-task retries): the supervisor retries the run later."""


class WebhookRefused(WebhookError, NonRetryable):
    """The webhook answered 4xx (not 429): asking again won't help, the delivery run fails at once."""


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


class RunLike(Protocol):
    """The fields of a run an alert shows (a ``SupervisedRun``, or anything shaped like one)."""

    pk: Any
    task_name: str
    status: str
    attempt: int
    max_attempts: int
    scheduled_for: datetime | None
    periodic_task_id: int | None
    last_error: str


@dataclass(frozen=True)
class Alert:
    """One message, ready for every channel: a subject and text for mail, a JSON payload for hooks."""

    event: str
    subject: str
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


def _run_dict(run: RunLike) -> dict[str, Any]:
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


def list_slots(runs: Sequence[RunLike], most: int = 20) -> str:
    """``2026-01-01T00:00:00+00:00, … and 3 more``: the slots of missed runs, for humans."""
    listed = ", ".join(r.scheduled_for.isoformat() if r.scheduled_for else f"run {r.pk}" for r in runs[:most])
    more = f" and {len(runs) - most} more" if len(runs) > most else ""
    return listed + more


def build_alert(event: str, runs: Sequence[RunLike], schedule: str = "", reason: str = "") -> Alert:
    """The alert for ``event`` on ``runs`` (several only for slots of one schedule missed together)."""
    run = runs[0]
    what = schedule or run.task_name
    if event == AlertEvent.MISSED:
        subject = f"[supervisor] {what}: {len(runs)} missed slot(s)"
        text = (
            f"Schedule {what!r} missed {len(runs)} slot(s): {list_slots(runs)}.\nReason: {reason or run.last_error}\n"
        )
    elif event == AlertEvent.PAUSED:
        subject = f"[supervisor] {what}: schedule paused after {len(runs)} failed run(s)"
        ids = ", ".join(str(r.pk) for r in runs[:20])
        text = (
            f"Schedule {what!r} was disabled after {len(runs)} consecutive failed or dead runs ({ids}).\n"
            f"Reason: {reason}\nEnable it again in the admin to resume it (the count starts from zero).\n"
        )
        if run.last_error:
            text += f"Last error: {run.last_error[:MAX_ERROR]}\n"
    else:
        verbs: dict[str, str] = {
            AlertEvent.DEAD: f"is dead after {run.attempt} attempt(s)",
            AlertEvent.FAILED: "failed with a non-retryable error",
            AlertEvent.RECOVERED: f"lost its worker on attempt {run.attempt - 1} and was re-queued",
        }
        verb = verbs.get(event, event)
        subject = f"[supervisor] {what}: run {run.pk} {event}"
        text = f"Run {run.pk} of {run.task_name} {verb}."
        if reason:
            text += f"\nReason: {reason}"
        if run.last_error and event in (AlertEvent.DEAD, AlertEvent.FAILED):
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


def build_digest(start: datetime, window: float, limit: int, suppressed: int, problems: dict[str, int]) -> Alert:
    """The digest of one channel's window: how many alerts the rate limit held back, and what ended
    badly meanwhile (``problems``: status → runs)."""
    end = start + timedelta(seconds=window)
    summary = ", ".join(f"{status} {n}" for status, n in sorted(problems.items())) or "none"
    subject = f"[supervisor] {suppressed} alert(s) held back by the rate limit"
    text = (
        f"{suppressed} further alert(s) of this channel were not sent between {start.isoformat()} "
        f"and {end.isoformat()} (limit: {limit} per {window:.0f}s).\n"
        f"Runs that ended failed, dead or missed in that window (all schedules): {summary}.\n"
    )
    payload = {
        "event": "digest",
        "suppressed": suppressed,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "problems": problems,
        "text": f"{subject}\n{text}".strip(),
    }
    return Alert("digest", subject, text, payload)


#: Why a run is dead, as an alert says it (by the ``reason`` of ``run_dead``).
DEAD_REASONS: dict[str, str] = {
    "lost": "its worker was lost",
    "timed_out": "it ran past its max runtime",
    "never_started": "never started: no worker took it (unknown task or unconsumed queue?)",
}
