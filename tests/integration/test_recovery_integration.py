"""Crash tests with real processes: PostgreSQL, RabbitMQ, `celery worker` and `manage.py supervise`.

Every test really kills (or stops) a process and then checks the database: each run ends in one
terminal state, completes once, and the completion counted by ``project.models.Execution`` (a side
effect written at the end of the body) happens exactly once per run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from django.db.models import Count

from project.models import Execution
from project.processes import wait_until
from project.tasks import flaky, quiet_job, slow_job
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import FAST, Live

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE = float(FAST["SUPERVISOR_LEASE_TIMEOUT"])
SWEEP = float(FAST["SUPERVISOR_SWEEP_INTERVAL"])
#: Allowed slack over (lease timeout + sweep interval): publish, delivery and claim on a busy 2-core box.
MARGIN = 2.0


def statuses(run_ids: list[int]) -> dict[int, str]:
    return dict(SupervisedRun.objects.filter(pk__in=run_ids).values_list("pk", "status"))


def all_status(run_ids: list[int], status: str) -> bool:
    got = statuses(run_ids)
    return len(got) == len(run_ids) and set(got.values()) == {status}


def executions(run_ids: list[int]) -> dict[int, int]:
    rows = Execution.objects.filter(run_id__in=run_ids).values("run_id").annotate(n=Count("id"))
    return {row["run_id"]: row["n"] for row in rows}


def running_on(run_ids: list[int], prefix: str) -> list[int]:
    return list(
        SupervisedRun.objects.filter(pk__in=run_ids, status="running", worker__startswith=prefix).values_list(
            "pk", flat=True
        )
    )


def assert_recovered_within_bound(run_ids: list[int], killed_at: float, extra: float = 0.0) -> float:
    """Every run's attempt 2 started within lease + sweep (+ extra) + margin of the kill; returns the worst."""
    worst = 0.0
    for run_id in run_ids:
        second = RunAttempt.objects.get(run_id=run_id, number=2)
        assert second.started_at is not None
        delay = second.started_at.timestamp() - killed_at
        worst = max(worst, delay)
    assert worst <= LEASE + SWEEP + extra + MARGIN, f"recovery took {worst:.2f}s"
    return worst


def test_sigkill_of_a_whole_worker_recovers_its_runs_once_on_the_survivor(live: Live, capsys: Any) -> None:
    live.supervisor()
    victim = live.worker("victim", concurrency=2)
    run_ids = [slow_job.delay(16, 0.5, "kill").run_id for _ in range(2)]
    wait_until(lambda: len(running_on(run_ids, "victim@")) == 2, 30, what="both runs running on the victim")
    survivor = live.worker("survivor", concurrency=2)  # ready before the kill (its start-up is not timed)
    wait_until(
        lambda: SupervisedRun.objects.filter(pk__in=run_ids, checkpoint__gte=2).count() == 2, 30, what="progress"
    )
    assert len(running_on(run_ids, "victim@")) == 2, "the runs ended before the kill"
    killed_at = time.time()
    victim.kill()  # SIGKILL to the main process and its pool children: no ack, no goodbye

    wait_until(lambda: all_status(run_ids, "succeeded"), 60, what="runs to succeed")
    worst = assert_recovered_within_bound(run_ids, killed_at)
    assert executions(run_ids) == {run_id: 1 for run_id in run_ids}
    for run_id in run_ids:
        attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("number"))
        assert [a.outcome for a in attempts] == ["lost", "succeeded"]
        assert attempts[0].worker.startswith("victim@") and attempts[1].worker.startswith("survivor@")
        run = SupervisedRun.objects.get(pk=run_id)
        assert run.checkpoint == 16
    assert survivor.popen.poll() is None
    with capsys.disabled():
        print(f"\n  [kill test] worst recovery {worst:.2f}s (bound {LEASE + SWEEP:.1f}s + {MARGIN}s margin)")


def test_sigkill_of_the_pool_child_running_the_run(live: Live) -> None:
    """The OOM-killer case, made deterministic: the task body reports its own pid."""
    live.supervisor()
    worker = live.worker("oom", concurrency=2)
    run_id = slow_job.delay(10, 0.4, "oom").run_id
    wait_until(lambda: running_on([run_id], "oom@"), 30, what="the run to start")
    # slow_job reports its pool process's pid in its progress.
    run = wait_until(
        lambda: SupervisedRun.objects.filter(pk=run_id, progress__has_key="pid").first(), 10, what="progress"
    )
    pid = int(run.progress["pid"])
    assert pid in worker.children()
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all_status([run_id], "succeeded"), 60, what="the run to succeed")
    assert executions([run_id]) == {run_id: 1}
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id).order_by("number")] == ["lost", "succeeded"]
    assert_recovered_within_bound([run_id], killed_at)
    assert worker.popen.poll() is None


def test_sigstop_past_the_lease_is_recovered_and_the_zombie_is_fenced(live: Live) -> None:
    live.supervisor()
    hung = live.worker("hung", concurrency=1)
    run_id = slow_job.delay(8, 0.5, "zombie").run_id
    wait_until(lambda: running_on([run_id], "hung@"), 30, what="the run to start")
    live.worker("healthy", concurrency=1)
    stopped_at = time.time()
    hung.signal_group(signal.SIGSTOP)
    try:
        wait_until(lambda: all_status([run_id], "succeeded"), 60, what="recovery on the healthy worker")
        # The hung worker's prefetch slot is free while it runs the stopped attempt; RabbitMQ drops
        # its connection (AMQP heartbeat 1 s, below the lease), so attempt 2 can't be handed to it.
        # With heartbeats off it was, in every trial, and started a start timeout later.
        assert_recovered_within_bound([run_id], stopped_at)
    finally:
        hung.signal_group(signal.SIGCONT)
    # The zombie wakes up: whichever runs first, its body's heartbeat or its lease keeper, sees that
    # no renewal confirmed the lease for longer than the lease, stops the body and writes nothing
    # more (self-fenced); its attempt stays `lost`. (Stopped in the middle of a heartbeat's query,
    # it learns it from the database's answer instead: "lost its lease", a fenced write.)
    wait_until(
        lambda: "self-fenced, nothing recorded" in hung.output() or "lost its lease" in hung.output(),
        30,
        what="the zombie to fence itself",
    )
    assert RunAttempt.objects.get(run_id=run_id, number=1).outcome == "lost"
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == "succeeded" and run.attempt == 2 and run.worker.startswith("healthy@")
    assert executions([run_id]) == {run_id: 1}


def test_runs_prefetched_by_a_hung_worker_come_back(live: Live) -> None:
    live.supervisor()
    hung = live.worker("hoarder", concurrency=1)
    # The first run checks its lease (slow_job heart-beats): when the hung worker resumes, it stops
    # without a second side effect. (A body that never checks would write its effect again: the
    # guarantee is at-least-once execution with fenced completion; see the README.)
    first = slow_job.delay(12, 0.5, "first").run_id
    wait_until(lambda: running_on([first], "hoarder@"), 30, what="the first run to start")
    second = quiet_job.delay(0.1, "second").run_id  # prefetched by the busy worker, not started
    # The busy worker has already taken the second message off the queue (prefetch), not started it.
    wait_until(lambda: hung.output().count("received") >= 2, 10, what="the second message to be prefetched")
    live.worker("rescuer", concurrency=2)  # idle and ready before the hang: measures detection only
    stopped_at = time.time()
    hung.signal_group(signal.SIGSTOP)
    try:
        wait_until(lambda: all_status([first, second], "succeeded"), 60, what="both runs on the rescuer")
    finally:
        hung.signal_group(signal.SIGCONT)
    second_run = SupervisedRun.objects.get(pk=second)
    assert second_run.worker.startswith("rescuer@") and second_run.attempt == 1  # republished, same attempt
    assert second_run.started_at is not None
    assert second_run.started_at.timestamp() - stopped_at <= LEASE + SWEEP + MARGIN
    wait_until(lambda: "self-fenced, nothing recorded" in hung.output(), 30, what="the resumed zombie to fence itself")
    assert RunAttempt.objects.get(run_id=first, number=1).outcome == "lost"
    assert executions([first, second]) == {first: 1, second: 1}


def test_non_retryable_error_fails_on_the_first_attempt(live: Live) -> None:
    live.supervisor()
    live.worker("w")
    run_id = flaky.delay("fatal", "fatal").run_id
    wait_until(lambda: all_status([run_id], "failed"), 30, what="the run to fail")
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.attempt == 1 and "NonRetryable" in run.last_error
    attempt = RunAttempt.objects.get(run_id=run_id)
    assert attempt.outcome == "failed" and "Traceback" in attempt.traceback


def test_retryable_error_is_retried_with_backoff_until_dead(live: Live) -> None:
    live.supervisor()
    live.worker("w")
    run_id = flaky.delay("retryable", "retry").run_id
    wait_until(lambda: all_status([run_id], "dead"), 60, what="the run to be dead")
    attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("number"))
    assert [a.outcome for a in attempts] == ["failed", "failed", "failed"]
    # flaky's backoff is 0.2 s then 0.4 s (no jitter): each retry started no earlier than that.
    for prev, nxt, backoff in zip(attempts, attempts[1:], [0.2, 0.4], strict=False):
        assert prev.ended_at is not None and nxt.started_at is not None
        assert (nxt.started_at - prev.ended_at).total_seconds() >= backoff
    assert executions([run_id]) == {run_id: 3}


def test_broker_down_at_dispatch_keeps_the_run_and_delivers_it_later(live: Live) -> None:
    # A separate process whose broker URL points where nothing listens: a broker that is down.
    code = "from project.tasks import quiet_job; print('RUN', quiet_job.delay(0.1, 'late').run_id)"
    env = {**os.environ, **live.env, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr  # .delay() did not raise
    assert "could not publish" in out.stderr and "guest" not in out.stderr  # logged, without the URL
    run_id = int(out.stdout.split("RUN")[-1])
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == "queued" and run.publish_count == 0
    live.worker("w")
    live.supervisor()  # the broker is up for these: the supervisor publishes the run again
    wait_until(lambda: all_status([run_id], "succeeded"), 30, what="the run to be delivered")
    assert executions([run_id]) == {run_id: 1}


def test_a_cancelled_body_that_never_heartbeats_is_interrupted(live: Live) -> None:
    from supervisor_app import runs

    live.supervisor()
    worker = live.worker("w", concurrency=1)
    run_id = quiet_job.delay(30, "cancel-me").run_id  # sleeps 30 s, never calls heartbeat()
    wait_until(lambda: running_on([run_id], "w@"), 30, what="the run to start")
    child = worker.children()
    cancelled_at = time.time()
    assert runs.request_cancel(run_id) == "running"
    wait_until(lambda: all_status([run_id], "cancelled"), 30, what="the cancel to take effect")
    run = SupervisedRun.objects.get(pk=run_id)
    # The lease keeper saw the cancel at its next renewal and interrupted the body's sleep.
    assert run.finished_at is not None and run.finished_at.timestamp() - cancelled_at <= 0.3 + MARGIN
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id)] == ["cancelled"]
    assert "interrupting the body (cancelled)" in worker.output()
    assert executions([run_id]) == {}  # the body's effect, at its end, never happened
    assert worker.children() == child  # no process was killed for it
    after = quiet_job.delay(0.1, "after").run_id
    wait_until(lambda: all_status([after], "succeeded"), 30, what="the next run")


def test_an_attempt_past_its_max_runtime_is_stopped_and_retried(live: Live, settings: Any) -> None:
    settings.SUPERVISOR_MAX_RUNTIME = 1.0
    live.supervisor()
    worker = live.worker("w", concurrency=1)
    started = time.monotonic()
    run_id = quiet_job.delay(30, "too-long").run_id
    wait_until(lambda: all_status([run_id], "dead"), 60, what="three attempts timed out")
    # Each 30 s body was stopped right after its timeout (interrupted, or revoked), not run out.
    assert time.monotonic() - started < 3 * (1.0 + SWEEP + MARGIN)
    assert worker.output().count("interrupting the body (lease lost)") + worker.output().count("Terminating") >= 3
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id).order_by("number")] == ["timed_out"] * 3
    assert executions([run_id]) == {}
