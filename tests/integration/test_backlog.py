"""Only lost work is published again (issue 13 item 5), with real processes: PostgreSQL, RabbitMQ,
`celery worker` and `manage.py supervise`, start timeouts of about a second.

A healthy backlog (one worker, runs longer than the start timeout, the last waiting over ten start
timeouts) gets about one message per run; a purged message is published again within the start
timeout and a sweep; a queue nobody consumes is reported by ``health/`` and its run ends ``dead``
after ``SUPERVISOR_MAX_PUBLISHES``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from project.models import Execution
from project.processes import wait_until
from project.tasks import quiet_job
from supervisor_app.models import SupervisedRun
from supervisor_app.ops.health import check_health
from tests.conftest import FAST, Live

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

#: Each run's start timeout (stored in its row at dispatch, from this process's settings).
START = 1.0
SWEEP = float(FAST["SUPERVISOR_SWEEP_INTERVAL"])
MARGIN = 2.0


def statuses(run_ids: list[int]) -> set[str]:
    return set(SupervisedRun.objects.filter(pk__in=run_ids).values_list("status", flat=True))


def publishes(run_ids: list[int]) -> list[int]:
    return list(SupervisedRun.objects.filter(pk__in=run_ids).order_by("pk").values_list("publish_count", flat=True))


def test_a_healthy_backlog_gets_one_message_per_run(live: Live, settings: Any) -> None:
    settings.SUPERVISOR_START_TIMEOUT = START
    live.supervisor(SUPERVISOR_START_TIMEOUT=str(START))
    live.worker("single", concurrency=1)
    runs, seconds = 12, 1.2
    run_ids = [quiet_job.delay(seconds, f"backlog-{i}").run_id for i in range(runs)]
    wait_until(lambda: statuses(run_ids) == {"succeeded"}, 90, what="the backlog to drain")
    counts = publishes(run_ids)
    last = SupervisedRun.objects.filter(pk__in=run_ids).order_by("-started_at").first()
    assert last is not None and last.started_at is not None
    waited = (last.started_at - last.created_at).total_seconds()
    per_run = sum(counts) / runs
    print(f"backlog: {runs} runs of {seconds}s on one worker, start timeout {START}s, the last waited "
          f"{waited:.1f}s ({waited / START:.0f} start timeouts): {per_run:.2f} messages per run {counts}")  # fmt: skip
    assert waited >= 10 * START
    # The tail may be published once more: with no message left ready in the queue, the worker's
    # prefetched one can't be told from a lost one.
    assert per_run <= 1.25 and max(counts) <= 2, counts
    assert Execution.objects.filter(run_id__in=run_ids).count() == runs


def test_a_purged_message_is_published_again_within_the_start_timeout(live: Live, settings: Any) -> None:
    from celery import current_app

    settings.SUPERVISOR_START_TIMEOUT = START
    live.supervisor(SUPERVISOR_START_TIMEOUT=str(START))
    busy = live.worker("busy", concurrency=1)
    first = quiet_job.delay(4, "running").run_id
    wait_until(lambda: statuses([first]) == {"running"}, 30, what="the first run to start")
    # Taken off the queue by the busy worker (its prefetch), so the next message stays in the queue.
    # Its own start timeout is long: a prefetched message can't be told from a lost one, and its
    # duplicate, once published, would be a ready message in the queue, which makes any other
    # unstarted run of that queue look like a backlog (the verdict is per queue; see the README).
    settings.SUPERVISOR_START_TIMEOUT = 60.0
    second = quiet_job.delay(0.1, "prefetched").run_id
    wait_until(lambda: busy.output().count("received") >= 2, 10, what="the second message prefetched")
    settings.SUPERVISOR_START_TIMEOUT = START
    lost = quiet_job.delay(0.1, "purged").run_id
    dispatched = time.time()
    with current_app.connection_for_write() as conn:
        purged = current_app.amqp.queues[live.queue](conn.default_channel).purge()
    assert purged == 1, purged
    wait_until(lambda: publishes([lost]) == [2], START + SWEEP + MARGIN + 1, what="the purged run published again")
    assert time.time() - dispatched <= START + SWEEP + MARGIN + 1
    wait_until(lambda: statuses([first, second, lost]) == {"succeeded"}, 60, what="all three runs")
    assert Execution.objects.filter(run_id__in=[first, second, lost]).count() == 3


def test_a_queue_nobody_consumes_is_reported_and_its_run_ends_never_started(live: Live, settings: Any) -> None:
    from celery import current_app

    settings.SUPERVISOR_START_TIMEOUT = 0.5
    nobody = f"{live.queue}-nobody"
    live.supervisor(SUPERVISOR_START_TIMEOUT="0.5", SUPERVISOR_MAX_PUBLISHES="4")
    live.worker("default-only", concurrency=1)  # workers are up: it's this queue nobody reads
    try:
        run_id = quiet_job.apply_async((0.1, "nobody"), queue=nobody).run_id
        reported: list[str] = []

        def seen() -> bool:
            reported[:] = [p for p in check_health().problems if nobody in p]
            return bool(reported)

        wait_until(seen, 20, what="health to report the unconsumed queue")
        assert "which no worker consumes" in reported[0]
        wait_until(lambda: statuses([run_id]) == {"dead"}, 30, what="the run to end never started")
        run = SupervisedRun.objects.get(pk=run_id)
        assert run.last_error.startswith("never started") and run.publish_count == 4
    finally:
        with current_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(nobody)
