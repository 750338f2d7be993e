"""Prometheus exposition, computed from the database at scrape time (every name ``supervisor_*``).

The web process that serves ``metrics/`` is not the one that sweeps or executes runs, so nothing
here lives in process memory: counts come from indexed queries, sweep figures from the supervisors'
liveness rows. Needs the optional ``prometheus-client`` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.db.models import Count

from ..core.states import ACTIVE_STATUSES, AttemptOutcome, RunStatus
from ..db import db_now
from ..models import ProcessHeartbeat, RunAttempt, SupervisedRun
from .health import check_health

WINDOW = timedelta(hours=24)
#: What ``metrics/`` answers (501) when prometheus-client is missing.
MISSING = (
    "supervisor_app metrics need the prometheus-client package, which is not installed.\n"
    'Install the metrics extra: pip install "supervisor-app[metrics]" (or: pip install prometheus-client).\n'
)


def available() -> bool:
    """Whether prometheus-client (the optional ``metrics`` extra) can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class SupervisorCollector:
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        now = db_now()
        since = now - WINDOW
        health = check_health()

        active = GaugeMetricFamily("supervisor_runs_active", "Runs in an active status, by status.", labels=["status"])
        for status in sorted(ACTIVE_STATUSES):
            active.add_metric([status], health.active.get(status, 0))
        yield active

        recent = GaugeMetricFamily(
            "supervisor_runs_finished_24h", "Runs finished in the last 24 h, by final status.", labels=["status"]
        )
        rows = (
            SupervisedRun.objects.filter(created_at__gte=since)
            .exclude(status__in=ACTIVE_STATUSES)
            .values("status")
            .annotate(n=Count("id"))
        )
        finished = {row["status"]: row["n"] for row in rows}
        for status in RunStatus:
            if status.value not in ACTIVE_STATUSES:
                recent.add_metric([status.value], finished.get(status.value, 0))
        yield recent

        recoveries = GaugeMetricFamily(
            "supervisor_recoveries_24h", "Attempts recovered by the supervisor in the last 24 h.", labels=["outcome"]
        )
        for outcome in (AttemptOutcome.LOST, AttemptOutcome.TIMED_OUT):
            n = RunAttempt.objects.filter(outcome=outcome, ended_at__gte=since).count()
            recoveries.add_metric([outcome.value], n)
        yield recoveries

        yield GaugeMetricFamily(
            "supervisor_stuck_runs", "Runs nobody is handling.", value=health.stuck_running + health.stuck_queued
        )
        yield GaugeMetricFamily("supervisor_healthy", "1 when the health check passes.", value=1 if health.ok else 0)

        last_seen = GaugeMetricFamily(
            "supervisor_process_last_seen_seconds",
            "Seconds since a supervisor or beat last reported.",
            labels=["kind", "name"],
        )
        sweep = GaugeMetricFamily("supervisor_sweep_duration_seconds", "Duration of the last sweep.", labels=["name"])
        hist: dict[str, float] = {}
        total, total_sum = 0, 0.0
        actions = GaugeMetricFamily(
            "supervisor_last_sweep_actions", "Actions of each supervisor's last sweep.", labels=["name", "action"]
        )
        for proc in health.supervisors + health.beats:
            last_seen.add_metric([proc.kind, proc.name], proc.age)
            if proc.kind == ProcessHeartbeat.Kind.SUPERVISOR:
                sweep.add_metric([proc.name], float(proc.stats.get("duration", 0.0)))
                for action in ("recovered", "timed_out", "dead", "retried", "republished"):
                    actions.add_metric([proc.name, action], float(proc.stats.get(action, 0)))
                latency = proc.stats.get("detection_latency") or {}
                for bound, count in (latency.get("buckets") or {}).items():
                    hist[bound] = hist.get(bound, 0) + count
                total += int(latency.get("count", 0))
                total_sum += float(latency.get("sum", 0.0))
        yield last_seen
        yield sweep
        yield actions
        histogram = HistogramMetricFamily(
            "supervisor_detection_latency_seconds",
            "Time from a lease's expiry to the sweep that recovered the run (since each supervisor started).",
        )
        ordered = sorted(hist.items(), key=lambda item: float(item[0]))
        histogram.add_metric([], [*((b, c) for b, c in ordered), ("+Inf", total)], total_sum)
        yield histogram


def render() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector())  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
