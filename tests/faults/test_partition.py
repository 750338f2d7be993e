"""A worker cut off from the database by a partition that silently drops packets (issue 12).

A TCP proxy of our own (:mod:`tests.faults.proxy`) sits between one worker and PostgreSQL; mid-body
it starts dropping everything. The worker gets no error and no answer. Its lease keeper must notice
that it can no longer prove the lease, stop the body before the supervisor can hand the run on,
and write nothing more; the run then completes once on another worker.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from typing import Any

import pytest
from django.db import connection

from project.models import Execution
from project.processes import wait_until
from project.tasks import effect_job, quiet_job
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live
from tests.faults.proxy import Proxy
from tests.faults.report import record
from tests.integration.test_recovery_integration import all_status, running_on

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

#: Longer than the suite's 2 s, so a busy machine can't fake a partition; short enough to be quick.
LEASE = 4.0
HEARTBEAT = 0.5
TIMING = {"SUPERVISOR_LEASE_TIMEOUT": str(LEASE), "SUPERVISOR_HEARTBEAT_INTERVAL": str(HEARTBEAT)}
STAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})[: ]")


def logged_at(output: str, needle: str) -> float:
    """When a worker logged the first line containing ``needle`` (Celery's local-time stamp)."""
    for line in output.splitlines():
        if needle in line:
            match = STAMP.match(line)
            assert match, line
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{needle!r} not logged")


@pytest.fixture
def proxy() -> Any:
    params = connection.settings_dict
    with Proxy((params["HOST"] or "127.0.0.1", int(params["PORT"] or 5432))) as p:
        yield p


#: The body blocked in a query that gets no answer covers the most (keeper fence, interrupt, the
#: body's socket cut); ``make chaos`` also runs a sleeping body (PARTITION_BODIES=all).
BODIES = ["sleeping", "in-heartbeat"] if os.environ.get("PARTITION_BODIES") == "all" else ["in-heartbeat"]


@pytest.mark.parametrize("body", BODIES)
def test_a_partitioned_worker_stops_its_body_before_the_run_is_handed_on(
    live: Live, proxy: Proxy, settings: Any, body: str
) -> None:
    settings.SUPERVISOR_LEASE_TIMEOUT = LEASE  # the runs are dispatched from here: their lease
    settings.SUPERVISOR_HEARTBEAT_INTERVAL = HEARTBEAT
    live.supervisor(**TIMING)
    cut_off = live.worker("cut-off", DATABASE_URL=proxy.url(live.env["DATABASE_URL"]), **TIMING)
    if body == "sleeping":  # a quiet body: only the lease keeper talks to the database
        run_id = quiet_job.delay(LEASE * 3, "partition").run_id
    else:  # heartbeat() every 0.2 s: the body itself is blocked in a query that gets no answer
        run_id = effect_job.delay(int(LEASE * 3 / 0.2), 0.2, "partition").run_id
    wait_until(lambda: running_on([run_id], "cut-off@"), 30, what="the run to start on the cut-off worker")
    live.worker("healthy", **TIMING)
    proxy.blackhole()
    cut_at = time.time()

    wait_until(lambda: "self-fenced" in cut_off.output(), LEASE * 2, what="the cut-off worker to self-fence")
    wait_until(lambda: all_status([run_id], "succeeded"), 60, what="the run to complete on the healthy worker")
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.attempt == 2 and run.worker.startswith("healthy@")
    fenced_at = logged_at(cut_off.output(), "stopping the body and writing nothing more")
    handed_on = RunAttempt.objects.get(run_id=run_id, number=2).started_at
    assert handed_on is not None
    # The body was told to stop within one lease of the partition, and before the next agent started.
    assert fenced_at - cut_at <= LEASE, f"self-fenced {fenced_at - cut_at:.2f}s after the cut"
    assert fenced_at < handed_on.timestamp(), "the run was handed on before the cut-off body stopped"
    wait_until(lambda: "interrupting the body (lease lost)" in cut_off.output(), 10, what="the body interrupted")

    proxy.heal()  # the partition ends: the cut-off worker must not write anything for attempt 1
    wait_until(lambda: "self-fenced, nothing recorded" in cut_off.output(), 30, what="the stopped body's exit")
    first = RunAttempt.objects.get(run_id=run_id, number=1)
    assert first.outcome == "lost", first.outcome
    marks = list(Execution.objects.filter(run_id=run_id).values_list("attempt", flat=True))
    assert marks == [2], marks  # the cut-off body never reached its end; the run executed once
    record(
        f"partition between a worker and PostgreSQL (packets dropped), body {body}",
        f"self-fenced {fenced_at - cut_at:.2f}s after the cut (lease {LEASE:.0f}s), "
        f"{handed_on.timestamp() - fenced_at:.2f}s before attempt 2 started elsewhere; nothing written by it",
        None,
        held=True,
    )
