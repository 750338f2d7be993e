"""Liveness of supervisors and beats: each records its own row, ``last_seen`` by the database clock,
and deletes it when it stops cleanly; the sweep deletes the rows of processes silent for longer than
``SUPERVISOR_PROCESS_RETENTION`` (killed, or their host gone), so they are not reported stale for ever."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db.models.functions import Now
from django.utils import timezone

from ..conf import supervisor_settings
from ..models import ProcessHeartbeat

if TYPE_CHECKING:
    from ..supervisor import SweepReport


def process_name() -> str:
    """``host:pid``: the name a supervisor or beat records its liveness under."""
    return f"{socket.gethostname()}:{os.getpid()}"


def record_liveness(kind: str, name: str, stats: dict[str, Any]) -> None:
    """Upsert this process's heartbeat row (``last_seen`` from the database clock)."""
    updated = ProcessHeartbeat.objects.filter(kind=kind, name=name).update(last_seen=Now(), stats=stats)
    if not updated:
        now = timezone.now()
        ProcessHeartbeat.objects.get_or_create(
            kind=kind, name=name, defaults={"started_at": now, "last_seen": now, "stats": stats}
        )


def beat_is_stale(now: Any, stale_after: float) -> bool:
    """No beat has recorded its liveness within ``stale_after`` seconds of ``now`` (database clock)."""
    newest = ProcessHeartbeat.objects.filter(kind=ProcessHeartbeat.Kind.BEAT).order_by("-last_seen").first()
    return newest is None or (now - newest.last_seen).total_seconds() > stale_after


def forget_process(kind: str, name: str) -> int:
    """A supervisor or beat stops cleanly: its row goes, so nobody reports it stale."""
    deleted, _ = ProcessHeartbeat.objects.filter(kind=kind, name=name).delete()
    return deleted


def prune_processes(older_than: float | None = None) -> int:
    """Delete the rows of processes silent for longer than ``older_than`` seconds (by default
    ``SUPERVISOR_PROCESS_RETENTION``), by the database clock. Returns how many."""
    retention = supervisor_settings.PROCESS_RETENTION if older_than is None else older_than
    if retention is None:
        return 0
    deleted, _ = ProcessHeartbeat.objects.filter(last_seen__lt=Now() - timedelta(seconds=retention)).delete()
    return deleted


def prune_phase(report: SweepReport, deadline: float) -> None:
    """A phase of the sweep: one ``DELETE`` on the (tiny) liveness table."""
    pruned = prune_processes()
    if pruned:
        report.extra["processes_pruned"] = pruned
