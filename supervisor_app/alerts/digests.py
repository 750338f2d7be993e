"""Digests: after each rate-limit window, one message per channel that held alerts back (a sweep phase)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db.models import Count
from django.db.models.functions import Now

from ..conf import supervisor_settings
from ..core.alerting import Alert, build_digest
from ..core.states import INCIDENT_STATUSES
from ..db import db_now
from ..models import AlertWindow, SupervisedRun
from .channels import enqueue_webhook, send_email, webhook_url_for

if TYPE_CHECKING:
    from ..supervisor import SweepReport

#: Rate-limit rows older than this are deleted by the sweep.
KEEP_WINDOWS = timedelta(days=2)

_last_cleanup = 0.0


def digest_alert(row: AlertWindow, window: float, limit: int) -> Alert:
    """The digest of one window: the alerts it held back and what ended badly meanwhile."""
    end = row.window_start + timedelta(seconds=window)
    problems = dict(
        SupervisedRun.objects.filter(
            status__in=INCIDENT_STATUSES, finished_at__gte=row.window_start, finished_at__lt=end
        )
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    return build_digest(row.window_start, window, limit, row.suppressed, problems)


def send_digests(report: SweepReport | None = None, deadline: float | None = None) -> int:
    """After each window, one digest per channel that held alerts back; claimed by one process only."""
    global _last_cleanup
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


def digest_phase(report: SweepReport, deadline: float) -> None:
    """The sweep phase: :func:`send_digests` with the sweep's report and deadline."""
    send_digests(report, deadline)
