"""Deferred completions (issue 15): a worker process queues the successes of returned bodies and its
lease keeper writes them in one statement. Driven by hand here, no threads, no broker; the real-worker
scenarios (kill before the write, warm shutdown) are in ``tests/integration/test_deferred_finish.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from project.tasks import noop
from supervisor_app import runs
from supervisor_app.models import RunAttempt, SupervisedRun
from supervisor_app.worker import execute, lease_keeper

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def claimed(sent: list[Any], fast_settings: Any) -> Callable[[], runs.Claim]:
    def _claim() -> runs.Claim:
        run_id = int(noop.delay().run_id)
        won = runs.claim(run_id, 1, "w@test", f"{run_id}.1")
        assert won is not None
        return won

    return _claim


@pytest.fixture
def keeper(monkeypatch: pytest.MonkeyPatch) -> lease_keeper.LeaseKeeper:
    """A lease keeper whose threads never start: the test runs its passes by hand."""
    fresh = lease_keeper.LeaseKeeper()
    monkeypatch.setattr(fresh, "_ensure_thread", lambda: None)
    return fresh


def hold(keeper: lease_keeper.LeaseKeeper, won: runs.Claim, lease: float = 30.0) -> None:
    keeper.register(won.run_id, won.attempt, interval=1.0, lease_timeout=lease, since=time.monotonic(), token=won.token)


def statuses(*run_ids: int) -> list[str]:
    return list(SupervisedRun.objects.filter(pk__in=run_ids).order_by("pk").values_list("status", flat=True))


def test_many_successes_are_one_statement_and_each_is_fenced_by_its_claim(
    claimed: Callable[[], runs.Claim],
) -> None:
    held, superseded, other = claimed(), claimed(), claimed()
    done = [
        (held.run_id, 1, held.token, "w@test", '{"n": 1}'),
        (superseded.run_id, 1, "00000000-0000-0000-0000-000000000000", "zombie@test", None),  # another claim's token
        (other.run_id, 1, other.token, "w@test", None),
    ]
    with CaptureQueriesContext(connection) as ctx:
        written = runs.finish_successes(done)
    assert written == {(held.run_id, 1), (other.run_id, 1)}
    assert statuses(held.run_id, superseded.run_id, other.run_id) == ["succeeded", "running", "succeeded"]
    # Each run stores its own return value, in the same statement.
    assert SupervisedRun.objects.get(pk=held.run_id).result == {"n": 1}
    assert SupervisedRun.objects.get(pk=other.run_id).result is None
    assert RunAttempt.objects.get(run_id=held.run_id, number=1).outcome == "succeeded"
    refused = RunAttempt.objects.get(run_id=superseded.run_id, number=1)
    assert refused.outcome == "fenced" and refused.error.startswith("completion refused")
    if connection.vendor == "postgresql":
        # One statement writes every success; the refused one adds its fenced record.
        writes = [q["sql"] for q in ctx.captured_queries if "unnest" in q["sql"]]
        assert len(writes) == 1


def test_the_keeper_writes_queued_completions_together_after_the_delay(
    keeper: lease_keeper.LeaseKeeper, claimed: Callable[[], runs.Claim], settings: Any
) -> None:
    settings.SUPERVISOR_FINISH_DELAY = 0.05
    first, second = claimed(), claimed()
    hold(keeper, first)
    hold(keeper, second)
    assert keeper.complete(first.run_id, 1, "w@test") and keeper.complete(second.run_id, 1, "w@test")
    assert not keeper.complete(first.run_id, 1, "w@test")  # queued already
    assert statuses(first.run_id, second.run_id) == ["running", "running"]  # the task returned; not written yet
    now = time.monotonic()
    keeper.tick(now)
    assert not keeper._flush_wanted  # not due before the delay
    keeper.tick(now + 0.06)
    assert keeper._flush_wanted and not keeper._renew_wanted  # a queued completion is never renewed
    keeper.flush_completions()
    assert statuses(first.run_id, second.run_id) == ["succeeded", "succeeded"]
    assert (keeper.completions, keeper.flushes) == (2, 1)
    assert keeper.state(first.run_id, 1) is None and keeper.pending_completions() == 0


def test_a_lost_lease_is_not_queued_and_a_full_batch_is_written_at_once(
    keeper: lease_keeper.LeaseKeeper, claimed: Callable[[], runs.Claim], monkeypatch: pytest.MonkeyPatch
) -> None:
    won = claimed()
    hold(keeper, won)
    keeper.mark(won.run_id, 1, held=False, cancel_requested=False, since=time.monotonic())
    assert not keeper.complete(won.run_id, 1, "w@test")  # the caller writes (and is fenced) itself
    monkeypatch.setattr(lease_keeper, "FLUSH_BATCH", 2)
    a, b = claimed(), claimed()
    hold(keeper, a)
    hold(keeper, b)
    keeper.complete(a.run_id, 1, "w@test")
    assert not keeper._flush_wanted
    keeper.complete(b.run_id, 1, "w@test")
    assert keeper._flush_wanted and keeper._renew_now.is_set()


def test_a_completion_the_database_refuses_is_retried_while_the_lease_holds_then_left_to_the_supervisor(
    keeper: lease_keeper.LeaseKeeper,
    claimed: Callable[[], runs.Claim],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    won = claimed()
    hold(keeper, won)
    keeper.complete(won.run_id, 1, "w@test")
    real = runs.finish_successes

    def down(done: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(runs, "finish_successes", down)
    monkeypatch.setattr(lease_keeper, "recover_connection", lambda: None)
    keeper.flush_completions()
    lease = keeper.state(won.run_id, 1)
    assert lease is not None and lease.completed_at is not None  # kept, to be tried again
    assert lease.flush_at > time.monotonic()
    monkeypatch.setattr(runs, "finish_successes", real)
    keeper.flush_completions()
    assert statuses(won.run_id) == ["succeeded"]

    late = claimed()
    hold(keeper, late, lease=0.5)
    keeper.complete(late.run_id, 1, "w@test")
    monkeypatch.setattr(runs, "finish_successes", down)
    state = keeper.state(late.run_id, 1)
    assert state is not None
    state.held_until = time.monotonic() - 0.1  # the outage outlasted the lease
    keeper.flush_completions()
    assert keeper.state(late.run_id, 1) is None  # dropped: the supervisor recovers the attempt
    assert "outcome not recorded, database unavailable past the lease" in caplog.text
    assert statuses(late.run_id) == ["running"]


def test_drain_writes_what_is_queued_before_the_process_exits(
    keeper: lease_keeper.LeaseKeeper, claimed: Callable[[], runs.Claim], settings: Any
) -> None:
    import threading

    from django.db import connections

    settings.SUPERVISOR_FINISH_DELAY = 60.0  # only the drain can write it in time
    won = claimed()
    hold(keeper, won)
    assert keeper.complete(won.run_id, 1, "w@test")

    def renewer() -> None:  # one pass of the renewer's loop, then its connection closed
        keeper._renew_now.wait(10)
        keeper._renew_now.clear()
        if keeper._flush_wanted:
            keeper.flush_completions()
        connections.close_all()

    thread = threading.Thread(target=renewer)
    thread.start()
    assert keeper.drain(timeout=10.0) == 0
    thread.join(10)
    assert statuses(won.run_id) == ["succeeded"]


def test_which_successes_are_deferred(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute.lease_keeper, "in_worker", True)
    settings.SUPERVISOR_STRICT_FINISH = False
    assert execute.defers_finish(noop, limited=False)
    assert not execute.defers_finish(noop, limited=True)  # its slot is handed on after the write
    monkeypatch.setattr(noop, "strict_finish", True)
    assert not execute.defers_finish(noop, limited=False)  # the task's own setting wins
    monkeypatch.setattr(noop, "strict_finish", None)
    settings.SUPERVISOR_STRICT_FINISH = True
    assert not execute.defers_finish(noop, limited=False)
    settings.SUPERVISOR_STRICT_FINISH = False
    monkeypatch.setattr(execute.lease_keeper, "in_worker", False)
    assert not execute.defers_finish(noop, limited=False)  # in-process calls (tests, apply()) stay exact
