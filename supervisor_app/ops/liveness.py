"""Liveness of supervisors and beats: each records its own row, ``last_seen`` by the database clock."""

from __future__ import annotations

import os
import socket
from typing import Any

from django.db.models.functions import Now
from django.utils import timezone

from ..models import ProcessHeartbeat


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
