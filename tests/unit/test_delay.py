"""``countdown=`` and ``eta=`` of a supervised dispatch, as one pure rule (``core.delay``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from supervisor_app.core.delay import dispatch_delay

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def test_countdown_is_seconds_from_now_and_wins_over_eta() -> None:
    assert dispatch_delay(30, None, NOW) == 30.0
    assert dispatch_delay(2.5, NOW + timedelta(hours=1), NOW) == 2.5  # as Celery: countdown sets the eta
    assert dispatch_delay(-5, None, NOW) == 0.0  # in the past: at once
    assert dispatch_delay(None, None, NOW) == 0.0


def test_eta_aware_naive_and_iso_times() -> None:
    assert dispatch_delay(None, NOW + timedelta(minutes=10), NOW) == 600.0
    assert dispatch_delay(None, datetime(2026, 12, 2, 12, 1), NOW) == 60.0  # naive: UTC, as Celery takes it
    assert dispatch_delay(None, "2026-12-02T13:00:00+01:00", NOW) == 0.0  # the same instant as NOW
    assert dispatch_delay(None, "2026-12-02T12:00:30+00:00", NOW) == 30.0
    assert dispatch_delay(None, NOW - timedelta(days=1), NOW) == 0.0


@pytest.mark.parametrize(
    ("countdown", "eta", "error", "match"),
    [
        ("10", None, TypeError, "countdown must be a number"),
        (True, None, TypeError, "countdown must be a number"),
        (None, "tomorrow", ValueError, "eta must be a datetime or an ISO 8601 time"),
        (None, 1700000000, TypeError, "eta must be a datetime or an ISO 8601 time"),
    ],
)
def test_values_that_are_neither_are_refused_clearly(countdown: object, eta: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        dispatch_delay(countdown, eta, NOW)
