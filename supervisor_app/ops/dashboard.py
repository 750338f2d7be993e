"""Reads behind the admin dashboard and the admin's incident filters. Reads only: writes live in ``runs``.

Every query here is bounded so the dashboard stays quick on a table of millions of runs: the time
windows are served by the ``created_at`` index, the incident rows by the partial index over failed,
dead, missed and cancelled runs, stale runs by the partial lease index, and recoveries by the
partial index over lost / timed-out attempts. The number of queries is constant (no query per row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import BooleanField, Count, DateTimeField, ExpressionWrapper, F, Q, QuerySet, Value
from django.db.models.functions import Now, TruncHour
from django.utils import timezone

from ..conf import supervisor_settings
from ..core.states import ACTIVE_STATUSES, INCIDENT_STATUSES, AttemptOutcome, RunStatus
from ..models import ProcessHeartbeat, RunAttempt, SupervisedRun

#: Width of the dashboard's recent window and its chart.
WINDOW = timedelta(hours=24)
#: Stale runs listed by name on the dashboard (the count covers all of them).
STALE_LISTED = 20
#: Attempt outcomes that mean the supervisor had to step in: a lease expired or a runtime ran out.
RECOVERED_OUTCOMES = (AttemptOutcome.LOST, AttemptOutcome.TIMED_OUT)


def open_incidents(qs: QuerySet[SupervisedRun] | None = None) -> QuerySet[SupervisedRun]:
    """Failed, dead and missed runs no operator has marked resolved since they last finished.

    A resolved run that is retried and ends badly again finishes after its ``resolved_at``, so it
    counts as open again without anyone having to clear the mark.
    """
    qs = SupervisedRun.objects.all() if qs is None else qs
    return qs.filter(status__in=INCIDENT_STATUSES).filter(
        Q(resolved_at__isnull=True) | Q(resolved_at__lt=F("finished_at"))
    )


def recovered_since(since: datetime) -> QuerySet[RunAttempt]:
    """Attempts the supervisor recovered (lost or timed out) that ended after ``since``."""
    return RunAttempt.objects.filter(outcome__in=RECOVERED_OUTCOMES, ended_at__gte=since)


def runs_recovered_since(qs: QuerySet[SupervisedRun], since: datetime) -> QuerySet[SupervisedRun]:
    return qs.filter(pk__in=recovered_since(since).values("run_id"))


@dataclass(frozen=True)
class Bar:
    """One hour of the chart: stacked segments, heights already scaled to the drawing."""

    start: datetime
    end: datetime
    total: int
    x: float
    segments: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Liveness:
    kind: str
    name: str
    started_at: datetime
    last_seen: datetime
    stale: bool
    stats: dict[str, Any]


#: Chart series: how each status is grouped and coloured (the admin's badge colours).
SERIES: list[tuple[str, str, frozenset[str]]] = [
    ("succeeded", "#2e7d32", frozenset({RunStatus.SUCCEEDED})),
    ("active", "#1565c0", ACTIVE_STATUSES),
    ("failed / dead / missed", "#c62828", INCIDENT_STATUSES),
    ("cancelled / skipped", "#757575", frozenset({RunStatus.CANCELLED, RunStatus.SKIPPED})),
]

CHART_WIDTH = 720
CHART_HEIGHT = 160


def _chart(rows: Sequence[Mapping[str, Any]], start: datetime, hours: int) -> tuple[list[Bar], int]:
    """Hourly stacked bars from ``(hour, status, n)`` rows, scaled to ``CHART_HEIGHT``."""
    per_hour: dict[datetime, dict[str, int]] = {}
    for row in rows:
        hour = row["hour"]
        if timezone.is_naive(hour):  # SQLite without tz support in the truncation
            hour = timezone.make_aware(hour, timezone.get_current_timezone())
        per_hour.setdefault(hour, {})
        per_hour[hour][row["status"]] = per_hour[hour].get(row["status"], 0) + row["n"]
    peak = max((sum(v.values()) for v in per_hour.values()), default=0)
    slot = CHART_WIDTH / hours
    bars = []
    for i in range(hours):
        hour_start = start + timedelta(hours=i)
        counts = per_hour.get(hour_start, {})
        y = float(CHART_HEIGHT)
        segments = []
        for label, colour, statuses in SERIES:
            n = sum(counts.get(s, 0) for s in statuses)
            if not n:
                continue
            height = CHART_HEIGHT * n / peak
            y -= height
            segments.append({"label": label, "colour": colour, "n": n, "y": round(y, 1), "height": round(height, 1)})
        bars.append(
            Bar(
                start=hour_start,
                end=hour_start + timedelta(hours=1),
                total=sum(counts.values()),
                x=round(i * slot + 1, 1),
                segments=segments,
            )
        )
    return bars, peak


def liveness() -> list[Liveness]:
    """Beats and supervisors with their last-seen time; stale is judged by the database clock."""
    cutoff = ExpressionWrapper(Now() - Value(timedelta(seconds=supervisor_settings.stale_after)), DateTimeField())
    rows = (
        ProcessHeartbeat.objects.annotate(
            is_stale=ExpressionWrapper(Q(last_seen__lt=cutoff), output_field=BooleanField())
        )
        .order_by("kind", "-last_seen")
        .values("kind", "name", "started_at", "last_seen", "is_stale", "stats")[:50]
    )
    return [
        Liveness(r["kind"], r["name"], r["started_at"], r["last_seen"], bool(r["is_stale"]), r["stats"] or {})
        for r in rows
    ]


def summary(now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, in a constant number of queries (eight)."""
    now = now or timezone.now()
    # Whole hours of the current time zone, so the chart's buckets line up with TruncHour's.
    end = timezone.localtime(now).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    hours = int(WINDOW.total_seconds() // 3600)
    since = end - timedelta(hours=hours)
    runs = SupervisedRun.objects.all()

    # 1. Runs created in the window, per hour and status (the created_at index bounds the scan).
    hourly = list(
        runs.filter(created_at__gte=since)
        .annotate(hour=TruncHour("created_at"))
        .values("hour", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    recent: dict[str, int] = {}
    for row in hourly:
        recent[row["status"]] = recent.get(row["status"], 0) + row["n"]
    # 2. Active runs of any age (partial indexes over the active rows).
    active = {r["status"]: r["n"] for r in runs.active().values("status").annotate(n=Count("id")).order_by()}
    # 3-4. Runs whose lease expired right now: the count and the first few.
    stale_qs = runs.stale()
    stale_count = stale_qs.count()
    stale = list(stale_qs.select_related("periodic_task").order_by("lease_expires_at")[:STALE_LISTED])
    # 5. Recoveries by the supervisor in the window.
    recovered = recovered_since(since).aggregate(
        lost=Count("id", filter=Q(outcome=AttemptOutcome.LOST)),
        timed_out=Count("id", filter=Q(outcome=AttemptOutcome.TIMED_OUT)),
    )
    # 6. Incidents nobody resolved yet (any age: they stay until someone looks).
    incidents = open_incidents().count()
    # 7. Beat and supervisor liveness.
    processes = liveness()

    bars, peak = _chart(hourly, since, hours)
    statuses = [
        {
            "status": status.value,
            "label": status.label,
            "recent": recent.get(status.value, 0),
            # None for terminal statuses: counting those over the whole history is what we avoid.
            "active": active.get(status.value, 0) if status.value in ACTIVE_STATUSES else None,
        }
        for status in RunStatus
    ]
    return {
        "now": now,
        "since": since,
        "window_hours": hours,
        "statuses": statuses,
        "recent_total": sum(recent.values()),
        "stale_count": stale_count,
        "stale": stale,
        "recovered_lost": recovered["lost"],
        "recovered_timed_out": recovered["timed_out"],
        "recovered_total": recovered["lost"] + recovered["timed_out"],
        "missed": recent.get(RunStatus.MISSED, 0),
        "incidents": incidents,
        "processes": processes,
        "beats": [p for p in processes if p.kind == ProcessHeartbeat.Kind.BEAT],
        "supervisors": [p for p in processes if p.kind == ProcessHeartbeat.Kind.SUPERVISOR],
        "stale_after": supervisor_settings.stale_after,
        "bars": bars,
        "peak": peak,
        "series": [{"label": label, "colour": colour} for label, colour, _ in SERIES],
        "chart_width": CHART_WIDTH,
        "chart_height": CHART_HEIGHT,
    }
