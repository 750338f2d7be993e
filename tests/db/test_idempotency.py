"""Exactly-once effects: ``supervisor_app.idempotency`` and ``SupervisedTask.effect`` / ``idempotency_key``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models import F

from project.models import Execution
from project.tasks import effect_job
from supervisor_app import idempotency, runs
from supervisor_app.core.errors import LeaseLost
from supervisor_app.models import Effect, SupervisedRun
from supervisor_app.runs import effects
from supervisor_app.supervisor import run_sweep

POLICY = runs.RunPolicy(max_attempts=3, lease_timeout=60, start_timeout=60, max_runtime=None)


def claimed_run() -> int:
    run = runs.create_run("project.tasks.effect_job", [], {}, POLICY, countdown=3600)
    assert run is not None
    SupervisedRun.objects.filter(pk=run.pk).update(status="queued")
    assert runs.claim(run.pk, 1, "agent-1@host") is not None
    return run.pk


def take_over(run_id: int) -> None:
    """The lease expires and the supervisor gives the run to attempt 2."""
    SupervisedRun.objects.filter(pk=run_id).update(lease_expires_at=F("lease_expires_at") - timedelta(hours=1))
    assert run_sweep("sup").recovered == 1


def write(run_id: int, attempt: int, label: str = "effect") -> bool:
    with idempotency.effect(run_id, "record", attempt) as first:
        if first:
            Execution.objects.create(run_id=run_id, attempt=attempt, label=label, worker="agent-1@host")
    return first


# ---------------------------------------------------------------- no database


def test_idempotency_key_is_stable_per_run_and_distinct_between_runs() -> None:
    assert idempotency.idempotency_key(7) == idempotency.idempotency_key(7) == "supervisor-run-7"
    assert idempotency.idempotency_key(7) != idempotency.idempotency_key(8)
    assert idempotency.idempotency_key(7, "charge") == "supervisor-run-7:charge"


@pytest.mark.parametrize("key", ["", "x" * 256, None])
def test_bad_keys_are_refused(key: Any) -> None:
    with pytest.raises(ValueError, match="effect key"):
        effects._check_key(key)


@pytest.fixture
def task_request() -> Iterator[Callable[..., None]]:
    pushed = []

    def push(**headers: Any) -> None:
        effect_job.push_request(**headers)
        pushed.append(1)

    yield push
    for _ in pushed:
        effect_job.pop_request()


def test_task_idempotency_key_follows_the_run_not_the_attempt(task_request: Callable[..., None]) -> None:
    task_request(supervisor_run=41, supervisor_attempt=1)
    first = effect_job.idempotency_key
    task_request(supervisor_run=41, supervisor_attempt=3)
    assert effect_job.idempotency_key == first == "supervisor-run-41"


def test_task_idempotency_key_is_none_without_a_run() -> None:
    assert effect_job.idempotency_key is None  # called directly: no run


# ---------------------------------------------------------------- database


@pytest.mark.django_db
def test_an_effect_is_performed_once_per_run() -> None:
    run_id = claimed_run()
    assert write(run_id, 1) is True
    assert write(run_id, 1) is False  # the same attempt again (a body that loops back)
    assert Execution.objects.filter(run_id=run_id).count() == 1
    effect = Effect.objects.get(run_id=run_id)
    assert (effect.key, effect.attempt) == ("record", 1)
    assert idempotency.performed(run_id, "record") and not idempotency.performed(run_id, "other")


@pytest.mark.django_db
def test_a_failed_block_rolls_back_effect_and_record_so_the_next_attempt_performs_it() -> None:
    run_id = claimed_run()
    with pytest.raises(RuntimeError), idempotency.effect(run_id, "record", 1) as first:
        assert first
        Execution.objects.create(run_id=run_id, attempt=1, label="half")
        raise RuntimeError("crash after the write, before commit")
    assert not Execution.objects.filter(run_id=run_id).exists()
    assert not Effect.objects.filter(run_id=run_id).exists()
    assert write(run_id, 1) is True
    assert Execution.objects.filter(run_id=run_id).count() == 1


@pytest.mark.django_db
def test_the_next_attempt_does_not_repeat_an_effect_and_a_zombie_cannot_perform_one(sent: list[Any]) -> None:
    run_id = claimed_run()
    other = claimed_run()
    assert write(run_id, 1) is True
    take_over(run_id)
    assert runs.claim(run_id, 2, "agent-2@host") is not None
    assert write(run_id, 2) is False  # attempt 2 re-runs the body: the effect is not repeated
    # A zombie (attempt 1 of another run, superseded before its effect) is refused, writes nothing.
    take_over(other)
    with pytest.raises(LeaseLost):
        write(other, 1)
    assert not Execution.objects.filter(run_id=other).exists() and not Effect.objects.filter(run_id=other).exists()
    assert Execution.objects.filter(run_id=run_id).count() == 1


@pytest.mark.django_db
def test_without_a_run_the_block_runs_in_a_transaction() -> None:
    with idempotency.effect(None, "record") as first:
        assert first and connection.in_atomic_block


@pytest.mark.django_db(transaction=True)
def test_once_needs_a_transaction() -> None:
    run_id = claimed_run()
    with pytest.raises(RuntimeError, match=r"transaction\.atomic"):
        idempotency.once(run_id, "record")
    with transaction.atomic():
        assert idempotency.once(run_id, "record") is True
        assert idempotency.once(run_id, "record") is False


@pytest.mark.django_db
def test_oversize_arguments_are_refused_before_anything_is_recorded(settings: Any) -> None:
    settings.SUPERVISOR_MAX_ARGS_BYTES = 1000
    before = SupervisedRun.objects.count()
    with pytest.raises(ValueError, match="SUPERVISOR_MAX_ARGS_BYTES"):
        effect_job.delay(3, 0.1, "x" * 2000)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        effect_job.delay(3, 0.1, object())
    with pytest.raises(TypeError, match="JSON-serialisable"):
        effect_job.delay(3, float("nan"))
    assert SupervisedRun.objects.count() == before
    settings.SUPERVISOR_MAX_ARGS_BYTES = None
    runs.check_json("t", ["x" * 5000], {})  # no limit


def test_invalid_max_args_bytes_fails_the_checks(settings: Any) -> None:
    from supervisor_app.checks import check_settings

    for bad in (0, -1, "1MB", 1.5, True):
        settings.SUPERVISOR_MAX_ARGS_BYTES = bad
        assert "supervisor_app.E003" in [m.id for m in check_settings()], bad
    settings.SUPERVISOR_MAX_ARGS_BYTES = None
    assert check_settings() == []


# ---------------------------------------------------------------- concurrency (PostgreSQL)


def _in_thread(target: Callable[[], Any], results: list[Any]) -> threading.Thread:
    def body() -> None:
        try:
            results.append(target())
        except BaseException as exc:
            results.append(exc)
        finally:
            connection.close()

    t = threading.Thread(target=body)
    t.start()
    return t


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_executions_of_one_effect_commit_it_once() -> None:
    run_id = claimed_run()
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def racer() -> bool:
        barrier.wait()
        return write(run_id, 1)

    threads = [_in_thread(racer, results) for _ in range(4)]
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True]
    assert Execution.objects.filter(run_id=run_id).count() == 1 == Effect.objects.filter(run_id=run_id).count()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_supervisor_does_not_take_a_run_over_in_the_middle_of_an_effect(sent: list[Any]) -> None:
    run_id = claimed_run()
    SupervisedRun.objects.filter(pk=run_id).update(lease_expires_at=F("lease_expires_at") - timedelta(hours=1))
    inside, release = threading.Event(), threading.Event()
    results: list[Any] = []

    def slow_effect() -> bool:
        with idempotency.effect(run_id, "record", 1) as first:
            Execution.objects.create(run_id=run_id, attempt=1, label="slow")
            inside.set()
            release.wait(10)
        return first

    t = _in_thread(slow_effect, results)
    assert inside.wait(10)
    assert run_sweep("sup").recovered == 0  # the row is share-locked by the effect: skipped, not waited on
    release.set()
    t.join(10)
    assert results == [True]
    assert run_sweep("sup").recovered == 1  # after the effect commits, the expired lease is recovered
    assert Execution.objects.filter(run_id=run_id).count() == 1
