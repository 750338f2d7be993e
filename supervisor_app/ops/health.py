"""Is supervision working right now? One answer for the health URL, the status command and probes.

Reads only, each query bounded by an index: the liveness table is tiny, stuck runs come from the
partial indexes over active runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count

from ..conf import supervisor_settings
from ..core.states import ACTIVE_STATUSES, RunStatus
from ..db import db_now
from ..models import ProcessHeartbeat, SupervisedRun


@dataclass(frozen=True)
class ProcessState:
    kind: str
    name: str
    last_seen: datetime
    age: float
    stale: bool
    stats: dict[str, Any]


@dataclass
class HealthReport:
    ok: bool
    problems: list[str]
    checked_at: datetime
    stale_after: float
    supervisors: list[ProcessState] = field(default_factory=list)
    beats: list[ProcessState] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)
    stuck_running: int = 0
    stuck_queued: int = 0
    #: Rows, schedules or phases that failed in the last sweep of each live supervisor (isolated and
    #: skipped by the sweep, see ``ops.isolation``): a fault the supervisor can't fix by itself.
    sweep_errors: int = 0
    #: Queued runs allowed to wait, by reason (the liveness table's explicit reasons): ``held``, a
    #: ``queue_one`` run behind its schedule's active run; ``backlog``, a run whose start timeout passed
    #: while its queue still has ready messages and consumers. Not problems: they have a way out.
    #: (``outage``, runs waiting while no queue has a consumer, are counted here and reported as a problem.)
    waiting: dict[str, int] = field(default_factory=dict)
    #: Per queue, what the live supervisors' last sweeps saw: runs left waiting (``backlog``,
    #: ``outage``) or published to a queue nobody consumes (``unconsumed``), and the broker's
    #: ``ready`` and ``consumers`` figures.
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checked_at"] = self.checked_at.isoformat()
        for kind in ("supervisors", "beats"):
            for proc in data[kind]:
                proc["last_seen"] = proc["last_seen"].isoformat()
        return data


def beat_required() -> bool:
    """A beat must be alive when ``SUPERVISOR_REQUIRE_BEAT`` says so; by default (None) when any
    periodic task is enabled."""
    setting = supervisor_settings.raw("REQUIRE_BEAT")
    if setting is not None:
        return bool(setting)
    from django_celery_beat.models import PeriodicTask

    return PeriodicTask.objects.filter(enabled=True).exists()


def check_health() -> HealthReport:
    now = db_now()
    stale_after = supervisor_settings.stale_after
    report = HealthReport(ok=True, problems=[], checked_at=now, stale_after=stale_after)
    for row in ProcessHeartbeat.objects.order_by("-last_seen")[:50]:
        age = max((now - row.last_seen).total_seconds(), 0.0)
        state = ProcessState(row.kind, row.name, row.last_seen, age, age > stale_after, row.stats)
        (report.supervisors if row.kind == ProcessHeartbeat.Kind.SUPERVISOR else report.beats).append(state)

    if not report.supervisors:
        report.problems.append("no supervisor has ever run (start `manage.py supervise`)")
    elif all(p.stale for p in report.supervisors):
        report.problems.append(f"supervisor stale: last seen {report.supervisors[0].age:.0f}s ago")
    if beat_required():
        if not report.beats:
            report.problems.append("no beat has ever run, but periodic tasks are enabled")
        elif all(p.stale for p in report.beats):
            report.problems.append(f"beat stale: last seen {report.beats[0].age:.0f}s ago")

    runs = SupervisedRun.objects.all()
    counts = runs.filter(status__in=ACTIVE_STATUSES).values("status").annotate(n=Count("id"))
    report.active = {row["status"]: row["n"] for row in counts}
    # A lease that expired a moment ago is the supervisor's next job; one that expired longer ago
    # than the stale limit means nobody is handling it.
    late = now - timedelta(seconds=stale_after)
    report.stuck_running = runs.filter(status=RunStatus.RUNNING, lease_expires_at__lt=late).count()
    report.stuck_queued = runs.filter(status=RunStatus.QUEUED, next_check_at__lt=late).count()
    held = runs.filter(status=RunStatus.QUEUED, next_check_at__isnull=True).count()
    report.waiting = {"held": held} if held else {}
    if report.stuck_running:
        report.problems.append(
            f"{report.stuck_running} running run(s) with a lease expired over {stale_after:.0f}s ago"
        )
    if report.stuck_queued:
        report.problems.append(f"{report.stuck_queued} queued run(s) overdue by over {stale_after:.0f}s")
    _sweep_errors(report)
    _queues(report)
    report.ok = not report.problems
    return report


def _sweep_errors(report: HealthReport) -> None:
    """What the last sweep of each live supervisor could not do, with the ids it failed on."""
    for proc in report.supervisors:
        errors = proc.stats.get("errors") or {}
        count = int(errors.get("count") or 0)
        if proc.stale or not count:
            continue
        report.sweep_errors += count
        first = (errors.get("recent") or [{}])[0]
        where = ", ".join(v for v in (first.get("phase"), first.get("key")) if v)
        report.problems.append(
            f"supervisor {proc.name}: {count} failure(s) in its last sweep, skipped "
            f"(first: {where}: {first.get('error', '?')})"
        )


def _queues(report: HealthReport) -> None:
    """Runs waiting on their queue, from the live supervisors' last sweeps (``broker.QueueProbe``): a
    healthy backlog is waiting, not a problem; a queue nobody consumes, or no consumer anywhere (a
    worker outage), is a problem."""
    for proc in report.supervisors:
        if proc.stale:
            continue
        for queue, seen in ((proc.stats.get("extra") or {}).get("queues") or {}).items():
            entry = report.queues.setdefault(
                queue, {"runs": {}, "ready": seen.get("ready"), "consumers": seen.get("consumers")}
            )
            for verdict, n in (seen.get("runs") or {}).items():
                entry["runs"][verdict] = entry["runs"].get(verdict, 0) + int(n)
    for queue, entry in sorted(report.queues.items()):
        runs = entry["runs"]
        for verdict in ("backlog", "outage"):
            if runs.get(verdict):
                report.waiting[verdict] = report.waiting.get(verdict, 0) + runs[verdict]
        if runs.get("unconsumed"):
            report.problems.append(
                f"{runs['unconsumed']} queued run(s) on queue {queue!r}, which no worker consumes: published "
                "again until SUPERVISOR_MAX_PUBLISHES, then dead (never started)"
            )
        if runs.get("outage"):
            report.problems.append(
                f"{runs['outage']} queued run(s) on queue {queue!r} waiting for a worker: no queue has a "
                "consumer (workers down?)"
            )
