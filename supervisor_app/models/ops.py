"""Rows about the processes and channels around the runs: liveness of supervisors and beats, and the
alert rate-limit windows."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class ProcessHeartbeat(models.Model):
    """Liveness of supervisors and beats, so the admin and health checks can tell they are alive."""

    class Kind(models.TextChoices):
        SUPERVISOR = "supervisor", "supervisor"
        BEAT = "beat", "beat"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=255, help_text="host:pid of the process.")
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    #: Figures of the last cycle (sweep counts and duration, beat sends...).
    stats = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "name"], name="supervisor_process_unique")]
        indexes = [models.Index(fields=["kind", "-last_seen"], name="supervisor_process_seen")]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


class AlertWindow(models.Model):
    """How many alerts one channel (a recipient list, a webhook) sent in one fixed time window.

    The rate limit is a conditional ``UPDATE … SET sent = sent + 1 WHERE sent < limit`` on this row
    (created with ``ON CONFLICT DO NOTHING``), so any number of supervisors and workers share it.
    Alerts over the limit only count ``suppressed``; one digest per window reports them.
    """

    #: ``email:<hash>`` or ``webhook:<hash>``: a hash of the destination, never the destination.
    channel = models.CharField(max_length=80)
    window_start = models.DateTimeField()
    sent = models.PositiveIntegerField(default=0)
    suppressed = models.PositiveIntegerField(default=0)
    #: Where the digest goes: ``{"kind": "email", "to": [...]}`` or ``{"kind": "webhook", "policy": pk}``
    #: (a webhook URL is looked up again at sending time and never stored here).
    route = models.JSONField(default=dict, blank=True)
    digest_sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["channel", "window_start"], name="supervisor_alert_window")]
        indexes = [
            # The sweep's digest query: only windows that suppressed something and await their digest.
            models.Index(
                fields=["window_start"],
                condition=Q(suppressed__gt=0, digest_sent_at__isnull=True),
                name="supervisor_alert_digest_due",
            )
        ]

    def __str__(self) -> str:
        return f"{self.channel} from {self.window_start:%Y-%m-%d %H:%M} ({self.sent} sent, {self.suppressed} held)"
