"""Every run has a way out (issue 13): a run no worker ever takes ends ``dead`` with the reason and an
alert after ``SUPERVISOR_MAX_PUBLISHES`` publishes; counters that grow for ever can't break the sweep.
PostgreSQL in `make test`, SQLite too; publishes captured by ``sent``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from project.tasks import noop
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def dispatched(sent: list[Any], django_capture_on_commit_callbacks: Any, fast_settings: Any) -> Callable[[], int]:
    def _dispatch() -> int:
        with django_capture_on_commit_callbacks(execute=True):
            return int(noop.delay().run_id)

    return _dispatch


def overdue(run_id: int, publish_count: int) -> None:
    """As if the run had been published ``publish_count`` times and its next check were due."""
    from datetime import timedelta

    from django.db.models import F

    SupervisedRun.objects.filter(pk=run_id).update(
        publish_count=publish_count, next_check_at=F("next_check_at") - timedelta(hours=1)
    )


def test_a_run_no_worker_takes_ends_dead_never_started_with_an_alert(
    dispatched: Callable[[], int],
    sent: list[Any],
    settings: Any,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.SUPERVISOR_MAX_PUBLISHES = 3
    settings.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    run_id = dispatched()
    overdue(run_id, 2)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").republished == 1  # the third publish
    assert SupervisedRun.objects.get(pk=run_id).publish_count == 3
    overdue(run_id, 3)
    published = len(sent)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    assert (report.republished, report.dead) == (0, 1)
    assert len(sent) == published  # not published a fourth time
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == RunStatus.DEAD and run.finished_at is not None and run.next_check_at is None
    assert run.last_error.startswith("never started: no worker took it — unknown task or unconsumed queue?")
    assert "published 3 times" in run.last_error
    assert len(mailoutbox) == 1 and f"run {run_id} dead" in mailoutbox[0].subject
    assert "never started" in mailoutbox[0].body


def test_a_week_of_republishing_no_longer_overflows_the_backoff(
    dispatched: Callable[[], int], sent: list[Any], settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """~1,000 publishes (a week every 10 minutes): start_timeout * 2**1007 raised OverflowError, which
    failed every sweep that met the row."""
    settings.SUPERVISOR_MAX_PUBLISHES = 10**6  # the count alone must not end it here
    run_id = dispatched()
    overdue(run_id, 1_008)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    assert report.republished == 1 and report.errors.count == 0
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.publish_count == 1_009 and run.status == RunStatus.QUEUED
    from supervisor_app.db import db_now

    wait = (run.next_check_at - db_now()).total_seconds()
    assert 590 < wait <= 600  # capped at 10 minutes
