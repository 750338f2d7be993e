"""Concurrency limits at the database level (PostgreSQL's one-statement claim and the portable path)."""

from __future__ import annotations

from typing import Any

import pytest

from project.tasks import limited_job, per_customer_job
from supervisor_app import runs
from supervisor_app.core.states import RunStatus
from supervisor_app.core.unique import arguments_key
from supervisor_app.models import SupervisedRun
from supervisor_app.supervisor import run_sweep
from supervisor_app.worker.execute import concurrency_limit

KEY = ("project.tasks.limited_job", 2)


@pytest.fixture
def queued(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Any:
    def _queued(n: int) -> list[int]:
        with django_capture_on_commit_callbacks(execute=True):
            return [int(limited_job.delay(0.1).run_id) for _ in range(n)]

    return _queued


@pytest.mark.django_db(transaction=True)  # outside atomic(): PostgreSQL takes its one-statement claim
def test_claims_take_free_slots_and_refuse_past_the_limit(queued: Any, sent: list[Any]) -> None:
    a, b, c = queued(3)
    first = runs.claim(a, 1, "w1", limit=KEY)
    second = runs.claim(b, 1, "w2", limit=KEY)
    assert first is not None and second is not None
    slots = dict(SupervisedRun.objects.filter(pk__in=[a, b]).values_list("pk", "concurrency_slot"))
    assert sorted(slots.values()) == [0, 1]
    assert runs.claim(c, 1, "w3", limit=KEY) is None  # no free slot
    # The same delivery retrying after a lost reply keeps its slot, even with every slot taken.
    assert runs.claim(a, 1, "w1", token=first.token, limit=KEY) is not None
    assert runs.wait_for_slot(c, 1, *KEY) == "waiting"
    assert SupervisedRun.objects.get(pk=c).status == RunStatus.WAITING
    assert runs.wait_for_slot(c, 1, *KEY) == "gone"  # not queued any more: a duplicate delivery drops
    assert run_sweep("t").republished == 0  # a waiting run is not "unstarted": no message to republish
    before = len(sent)
    assert runs.finish_success(a, 1, "w1", first.token)
    with runs.RunPublisher() as publisher:
        assert runs.release_waiters(KEY[0], publisher) == 1
    assert sent[before:] == [(c, 1, "project.tasks.limited_job")]
    assert SupervisedRun.objects.get(pk=c).status == RunStatus.QUEUED
    third = runs.claim(c, 1, "w3", limit=KEY)
    assert third is not None
    assert SupervisedRun.objects.get(pk=c).concurrency_slot == 0  # the slot the finished run freed


@pytest.mark.django_db(transaction=True)
def test_the_sweep_releases_waiters_into_slots_freed_by_recovery(queued: Any, expire: Any, sent: list[Any]) -> None:
    a, b = queued(2)
    SupervisedRun.objects.filter(pk=a).update(max_attempts=1)
    assert runs.claim(a, 1, "victim", limit=("project.tasks.limited_job", 1)) is not None
    assert runs.claim(b, 1, "w", limit=("project.tasks.limited_job", 1)) is None
    assert runs.wait_for_slot(b, 1, "project.tasks.limited_job", 1) == "waiting"
    expire(a)  # the victim was killed: its lease expires
    report = run_sweep("t")
    assert report.dead == 1  # its only attempt was lost
    assert report.extra.get("released_waiters") == 1
    assert SupervisedRun.objects.get(pk=b).status == RunStatus.QUEUED


@pytest.mark.django_db(transaction=True)
def test_a_waiting_run_can_be_cancelled(queued: Any) -> None:
    a, b = queued(2)
    limit = ("project.tasks.limited_job", 1)
    assert runs.claim(a, 1, "w", limit=limit) is not None
    assert runs.claim(b, 1, "w", limit=limit) is None
    assert runs.wait_for_slot(b, 1, *limit) == "waiting"
    assert runs.request_cancel(b) == RunStatus.CANCELLED


def test_a_limit_per_key_uses_the_named_arguments_by_position_or_keyword() -> None:
    name = per_customer_job.name
    by_position = concurrency_limit(per_customer_job, (7, 0.1), {})
    by_keyword = concurrency_limit(per_customer_job, (), {"customer": 7, "seconds": 3})
    assert by_position == by_keyword == (f"{name}:{arguments_key(per_customer_job.run, ('customer',), (7,), {})}", 1)
    assert concurrency_limit(per_customer_job, (8,), {}) != by_position
    assert len(by_position[0]) <= 200  # type: ignore[index]
    assert concurrency_limit(per_customer_job, (), {}) is None  # the call lacks the argument: not limited
    assert concurrency_limit(limited_job, (), {}) == ("project.tasks.limited_job", 2)
