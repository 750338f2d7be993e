"""Deferred completions with real processes (issue 15): what a crash between the body's return and the
write costs, and that a warm shutdown loses nothing. The worker's finish delay is stretched to 30 s so
that the window is wide open; by default it is 50 ms."""

from __future__ import annotations

import signal
import time

import pytest

from project.processes import wait_until
from project.tasks import quiet_job
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live
from tests.integration.test_recovery_integration import executions

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

WIDE = {"SUPERVISOR_FINISH_DELAY": "30"}


def returned(worker: object, run_id: int) -> bool:
    task_id = SupervisedRun.objects.get(pk=run_id).task_id
    return f"quiet_job[{task_id}] succeeded in" in worker.output()  # type: ignore[attr-defined]


def test_a_worker_killed_before_writing_a_completion_runs_the_body_again(live: Live) -> None:
    live.supervisor()
    doomed = live.worker("doomed", concurrency=1, **WIDE)
    run_id = quiet_job.delay(0.1, "deferred").run_id
    wait_until(lambda: returned(doomed, run_id), 30, what="the body to return")
    # Returned, its Execution row written by the body, its success only queued in the process.
    assert SupervisedRun.objects.get(pk=run_id).status == "running"
    doomed.kill()
    live.worker("rescuer", concurrency=1)
    wait_until(lambda: SupervisedRun.objects.get(pk=run_id).status == "succeeded", 60, what="the recovery")
    run = SupervisedRun.objects.get(pk=run_id)
    # At-least-once, as documented: the lost attempt is recovered and its body runs again.
    assert run.attempt == 2 and run.worker.startswith("rescuer@")
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id).order_by("number")] == ["lost", "succeeded"]
    assert executions([run_id]) == {run_id: 2}


def test_a_warm_shutdown_writes_the_queued_completions_first(live: Live) -> None:
    worker = live.worker("leaving", concurrency=2, **WIDE)
    run_ids = [quiet_job.delay(0.1, f"shutdown-{i}").run_id for i in range(4)]
    wait_until(lambda: all(returned(worker, r) for r in run_ids), 30, what="the bodies to return")
    assert set(SupervisedRun.objects.filter(pk__in=run_ids).values_list("status", flat=True)) == {"running"}
    stopping = time.monotonic()
    worker.signal_group(signal.SIGTERM)
    worker.popen.wait(timeout=20)
    assert time.monotonic() - stopping < 15  # written at shutdown, not after the 30 s delay
    assert set(SupervisedRun.objects.filter(pk__in=run_ids).values_list("status", flat=True)) == {"succeeded"}
    assert set(RunAttempt.objects.filter(run_id__in=run_ids).values_list("number", "outcome")) == {(1, "succeeded")}
    assert executions(run_ids) == {r: 1 for r in run_ids}
