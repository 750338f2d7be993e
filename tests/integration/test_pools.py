"""Worker pools other than prefork: solo, threads and gevent, with real workers.

Most integration tests run prefork workers (Celery's default). Projects also run ``-P solo`` (one
body on the main thread), ``-P threads`` (several bodies on threads of one process: one lease
keeper renews all of them, and a body can't be interrupted by a signal) and ``-P gevent`` (bodies
and the lease keeper are greenlets: the keeper renews whenever the bodies yield). Each pool must
keep leases past the lease timeout without any heartbeat from the body, be recovered when killed,
and end a cancelled run.
"""

from __future__ import annotations

import time

import pytest

from project.processes import wait_until
from project.tasks import effect_job, quiet_job
from supervisor_app import runs
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import FAST, Live
from tests.faults.test_faults import settle, verify
from tests.integration.test_recovery_integration import MARGIN, all_status, executions, running_on

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE = float(FAST["SUPERVISOR_LEASE_TIMEOUT"])
SWEEP = float(FAST["SUPERVISOR_SWEEP_INTERVAL"])
POOLS = ["solo", "threads", "gevent"]
ALL_POOLS = ["prefork", *POOLS]


def concurrency(pool: str) -> int:
    return 1 if pool == "solo" else 3


@pytest.mark.parametrize("pool", POOLS)
def test_quiet_bodies_longer_than_the_lease_keep_it(live: Live, pool: str) -> None:
    """Bodies that never heartbeat, each running past the lease: the process's keeper renews them."""
    live.supervisor()
    worker = live.worker(f"{pool}-w", concurrency=concurrency(pool), pool=pool)
    n = concurrency(pool)
    run_ids = [quiet_job.delay(LEASE * 1.75, f"{pool}-quiet-{i}").run_id for i in range(n)]
    if n > 1:
        wait_until(lambda: len(running_on(run_ids, f"{pool}-w@")) == n, 30, what="every thread busy at once")
    settle(run_ids, timeout=60)
    v = verify(
        f"`-P {pool}` worker (concurrency {n}): bodies running {LEASE * 1.75:.1f}s without heartbeat(), "
        f"lease {LEASE:.0f}s",
        "one lease keeper per process renewed every lease: no attempt lost, each run once on attempt 1",
        run_ids,
        expect=["succeeded"],
    )
    assert v.recovered == 0
    assert executions(run_ids) == {r: 1 for r in run_ids}
    assert "lost its lease" not in worker.output()


@pytest.mark.parametrize("pool", ALL_POOLS)
def test_a_quiet_long_body_keeps_its_lease_under_a_stream_of_short_tasks(live: Live, pool: str) -> None:
    """One long body that never calls heartbeat(), next to a steady stream of short tasks on the same
    worker. Each short task registers a lease with the process's keeper; before, each registration
    reset the keeper's wait, so while they kept coming the long body's lease was never renewed: it
    was recovered while still running, ran twice and ended dead."""
    live.supervisor()
    worker = live.worker(f"{pool}-mixed", concurrency=concurrency(pool), pool=pool)
    long_id = quiet_job.delay(LEASE * 2.5, f"{pool}-long").run_id
    if pool != "solo":  # solo runs one body at a time: the stream queues behind it
        wait_until(lambda: running_on([long_id], f"{pool}-mixed@"), 30, what="the long body to start")
    short_ids: list[int] = []
    deadline = time.monotonic() + LEASE * 2.5
    while time.monotonic() < deadline:  # a new short task every tenth of a second
        short_ids.append(quiet_job.delay(0.05, f"{pool}-short").run_id)
        time.sleep(0.1)  # the stream's pace, not a synchronisation
    settle([long_id, *short_ids], timeout=90)
    v = verify(
        f"`-P {pool}` worker: a {LEASE * 2.5:.0f}s body without heartbeat() beside {len(short_ids)} short tasks",
        "the long body kept its lease: attempt 1, executed once",
        [long_id, *short_ids],
        expect=["succeeded"],
    )
    assert v.recovered == 0
    assert SupervisedRun.objects.get(pk=long_id).attempt == 1
    assert executions([long_id]) == {long_id: 1}
    assert "lost its lease" not in worker.output()


@pytest.mark.parametrize("pool", POOLS)
def test_a_killed_worker_is_recovered_on_a_worker_of_the_same_pool(live: Live, pool: str) -> None:
    live.supervisor()
    victim = live.worker(f"{pool}-victim", concurrency=concurrency(pool), pool=pool)
    run_ids = [effect_job.delay(10, 0.2, f"{pool}-kill-{i}").run_id for i in range(concurrency(pool) + 1)]
    wait_until(lambda: running_on(run_ids, f"{pool}-victim@"), 30, what="a run on the victim")
    victim.kill()
    live.worker(f"{pool}-survivor", concurrency=concurrency(pool), pool=pool)
    settle(run_ids, timeout=90)
    v = verify(
        f"`-P {pool}` worker SIGKILLed mid-run, a `-P {pool}` worker takes over",
        "the victim's attempts recovered after the lease; effects written once per run",
        run_ids,
        expect=["succeeded"],
    )
    assert v.recovered >= 1
    assert executions(run_ids) == {r: 1 for r in run_ids}


@pytest.mark.parametrize("pool", POOLS)
def test_a_cancelled_quiet_body_ends_cancelled(live: Live, pool: str) -> None:
    """solo and gevent: the body is interrupted at the keeper's next renewal (a signal to the main
    thread; an exception thrown into the body's own greenlet). threads: nothing can reach a thread,
    so the supervisor ends the run after the cancel grace (the lease); the thread's body runs on,
    its completion fenced. No revoke: no signal from outside that could hit another task. The
    other threads or greenlets go on serving."""
    live.supervisor()
    worker = live.worker(f"{pool}-w", concurrency=concurrency(pool), pool=pool)
    run_id = quiet_job.delay(6, f"{pool}-cancel").run_id
    wait_until(lambda: running_on([run_id], f"{pool}-w@"), 30, what="the run to start")
    cancelled_at = time.time()
    assert runs.request_cancel(run_id) == "running"
    wait_until(lambda: all_status([run_id], "cancelled"), 30, what="the cancel to take effect")
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.finished_at is not None
    took = run.finished_at.timestamp() - cancelled_at
    bound = float(FAST["SUPERVISOR_HEARTBEAT_INTERVAL"]) if pool != "threads" else LEASE + SWEEP
    assert took <= bound + MARGIN, f"cancelled after {took:.2f}s"
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id)] == ["cancelled"]
    after = quiet_job.delay(0.1, f"{pool}-after").run_id
    wait_until(lambda: all_status([after], "succeeded"), 30, what="the next run")
    if pool in ("solo", "gevent"):
        assert "interrupting the body (cancelled)" in worker.output()
        assert executions([run_id]) == {}  # stopped mid-sleep: its last line never ran
    else:
        # The thread's body ran to its end (its own write is not fenced: at-least-once); its
        # outcome was: the run stays cancelled, the attempt too.
        wait_until(lambda: executions([run_id]) == {run_id: 1}, 30, what="the thread's body to return")
        wait_until(lambda: "completion refused" in worker.output(), 10, what="the fenced completion")
    assert SupervisedRun.objects.get(pk=run_id).status == "cancelled"
    assert [a.outcome for a in RunAttempt.objects.filter(run_id=run_id)] == ["cancelled"]
