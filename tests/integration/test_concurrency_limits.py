"""Concurrency limits across workers (issue 16 item 2), with real workers and real kills.

``concurrency_limit = N``: never more than N runs of the task execute at once, whatever the number
of workers; the others wait in the database (``waiting``) without holding a worker slot, and start as
slots free. ``concurrency_by`` limits per key. A killed worker's slot is freed by recovery.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from project.processes import wait_until
from project.tasks import limited_job, per_customer_job
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live
from tests.faults.report import record
from tests.integration.test_recovery_integration import all_status, executions, running_on

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def peak_overlap(run_ids: list[int]) -> int:
    """The most attempts of these runs that were executing at the same moment (database clock)."""
    events: list[tuple[datetime, int]] = []
    for started, ended in RunAttempt.objects.filter(run_id__in=run_ids, outcome="succeeded").values_list(
        "started_at", "ended_at"
    ):
        events += [(started, 1), (ended, -1)]
    peak = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same time
        current += step
        peak = max(peak, current)
    return peak


def test_never_more_than_the_limit_run_at_once_across_two_workers(live: Live) -> None:
    live.supervisor()
    live.worker("limit-a", concurrency=3)
    live.worker("limit-b", concurrency=3)
    run_ids = [limited_job.delay(0.4, f"limited-{i}").run_id for i in range(12)]
    peak_seen = 0
    deadline = time.monotonic() + 90
    while not all_status(run_ids, "succeeded"):
        assert time.monotonic() < deadline, "the limited runs did not all complete"
        peak_seen = max(peak_seen, SupervisedRun.objects.filter(pk__in=run_ids, status="running").count())
        time.sleep(0.02)  # sampling pace, not a synchronisation
    peak = peak_overlap(run_ids)
    assert peak == 2, f"{peak} ran at once"  # the limit was used, and never exceeded
    assert peak_seen <= 2
    assert executions(run_ids) == {r: 1 for r in run_ids}
    waited = SupervisedRun.objects.filter(pk__in=run_ids, publish_count__gte=1).count()
    assert waited == 12
    record(
        "concurrency_limit=2, 12 runs of 0.4 s, two workers with 3 processes each",
        f"peak {peak} at once (database clock), every run once",
        None,
        held=True,
    )


def test_a_limit_per_key_lets_other_keys_run_side_by_side(live: Live) -> None:
    live.supervisor()
    live.worker("per-key", concurrency=4)
    ids_7 = [per_customer_job.delay(7, 0.4, f"c7-{i}").run_id for i in range(3)]
    ids_8 = [per_customer_job.delay(customer=8, seconds=0.4, label=f"c8-{i}").run_id for i in range(3)]
    wait_until(lambda: all_status(ids_7 + ids_8, "succeeded"), 90, what="the runs of both customers")
    assert peak_overlap(ids_7) == 1 and peak_overlap(ids_8) == 1
    assert peak_overlap(ids_7 + ids_8) == 2  # one per customer, at the same time
    assert executions(ids_7 + ids_8) == {r: 1 for r in ids_7 + ids_8}


def test_a_killed_workers_slot_is_freed_by_recovery(live: Live) -> None:
    live.supervisor()
    # Acknowledging after the body, the victim's prefetch window is full while both bodies run: the
    # third message can only go to the survivor.
    victim = live.worker("slot-victim", concurrency=2, CELERY_TASK_ACKS_LATE="1")
    run_ids = [limited_job.delay(6, f"slot-{i}").run_id for i in range(2)]
    wait_until(lambda: len(running_on(run_ids, "slot-victim@")) == 2, 30, what="both slots taken on the victim")
    live.worker("slot-survivor", concurrency=3)
    run_ids.append(limited_job.delay(6, "slot-2").run_id)  # the survivor takes it: no slot free, it waits
    wait_until(
        lambda: SupervisedRun.objects.filter(pk__in=run_ids, status="waiting").count() == 1,
        30,
        what="the third run to wait for a slot",
    )
    victim.kill()
    wait_until(lambda: all_status(run_ids, "succeeded"), 90, what="every run, after recovery freed the slots")
    assert peak_overlap(run_ids) <= 2
    assert executions(run_ids) == {r: 1 for r in run_ids}
