"""The one publish-options builder: what a run keeps and what each publish of it sends."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from supervisor_app.broker import (
    HEADER_ATTEMPT,
    HEADER_RUN,
    Message,
    expiry,
    run_options,
    schedule_options,
    send_options,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def test_kept_options_are_json_and_leave_out_unset_ones_and_our_headers() -> None:
    kept = run_options(
        {
            "queue": "reports",
            "routing_key": "reports.nightly",
            "priority": 3,
            "exchange": None,
            "countdown": 5,  # a dispatch option, not a publishing one
            "headers": {"tenant": "acme", HEADER_RUN: 99},
            "expires": 60,
        },
        now=NOW,
    )
    assert kept == {
        "queue": "reports",
        "routing_key": "reports.nightly",
        "priority": 3,
        "headers": {"tenant": "acme"},
        "expires": (NOW + timedelta(seconds=60)).isoformat(),
    }
    assert run_options(kept) == kept  # idempotent: kept options pass through unchanged


def test_an_expiry_is_absolute_so_a_republished_message_expires_when_the_first_would() -> None:
    kept = run_options({"expires": 30.0}, now=NOW)
    assert expiry(kept) == NOW + timedelta(seconds=30)
    at = datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert expiry(run_options({"expires": at})) == at
    assert expiry({"expires": 30}) is None  # rows from before: relative, as they always were
    with pytest.raises(TypeError, match="expires"):
        run_options({"expires": [1]})


def test_each_publish_carries_the_kept_options_and_the_fencing_headers() -> None:
    kept = run_options({"queue": "q", "headers": {"tenant": "acme"}, "expires": 60}, now=NOW)
    sent = send_options(Message(7, 2, "t", [], {}, kept, "7.2.x"))
    assert sent["queue"] == "q"
    assert sent["headers"] == {"tenant": "acme", HEADER_RUN: 7, HEADER_ATTEMPT: 2}
    assert sent["expires"] == NOW + timedelta(seconds=60)


def test_a_schedules_options_are_those_django_celery_beat_gives_its_messages() -> None:
    pt = SimpleNamespace(
        name="nightly",
        queue="reports",
        exchange=None,
        routing_key="r",
        priority=5,
        expires_=NOW,
        headers='{"tenant": "acme"}',
    )
    options = schedule_options(pt)
    assert options == {
        "queue": "reports",
        "routing_key": "r",
        "priority": 5,
        "expires": NOW,
        "headers": {"tenant": "acme", "periodic_task_name": "nightly"},
    }
    assert run_options(options)["headers"] == {"tenant": "acme", "periodic_task_name": "nightly"}
    with pytest.raises(ValueError, match="not a JSON object"):
        schedule_options(SimpleNamespace(**{**vars(pt), "headers": "[1]"}))
