"""Presentation helpers of the admin: status badges, short durations, JSON and text blocks."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.html import format_html

from ..core.states import AttemptOutcome, RunStatus

BADGE_COLOURS: dict[str, str] = {
    RunStatus.QUEUED: "#6d4c41",
    RunStatus.RUNNING: "#1565c0",
    RunStatus.RETRYING: "#ef6c00",
    RunStatus.SUCCEEDED: "#2e7d32",
    RunStatus.FAILED: "#c62828",
    RunStatus.DEAD: "#6a1b9a",
    RunStatus.CANCELLED: "#757575",
    RunStatus.MISSED: "#ad1457",
    RunStatus.SKIPPED: "#9e9e9e",
    AttemptOutcome.PENDING: "#6d4c41",
    AttemptOutcome.LOST: "#ad1457",
    AttemptOutcome.TIMED_OUT: "#ef6c00",
    AttemptOutcome.FENCED: "#37474f",
}


def badge(value: str, label: str) -> str:
    colour = BADGE_COLOURS.get(value, "#555")
    return format_html(
        '<span class="sv-badge sv-{}" style="background:{};color:#fff;border-radius:.8em;'
        'padding:.1em .6em;font-size:.85em;white-space:nowrap">{}</span>',
        value,
        colour,
        label,
    )


def human_duration(delta: timedelta) -> str:
    """``4 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``: short enough for a table cell."""
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def age(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "—"
    return f"{human_duration((now or timezone.now()) - moment)} ago"


def pretty_json(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "—"
    return format_html('<pre class="sv-pre">{}</pre>', json.dumps(value, indent=2, sort_keys=True, default=str))


def pre(text: str) -> str:
    return format_html('<pre class="sv-pre">{}</pre>', text) if text else "—"
