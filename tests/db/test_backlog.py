"""Only lost work is published again (issue 13 item 5), with the broker's answer about each queue
given by a fake ``broker.inspect_queue``; and a dropped duplicate never writes to a result backend,
through Celery's own tracer. PostgreSQL in `make test`, SQLite too; publishes captured by ``sent``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db.models import F

from project.tasks import noop
from supervisor_app import broker
from supervisor_app.core.backlog import QueueState
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.ops.health import check_health
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db(transaction=False)


class States(dict):  # type: ignore[type-arg]
    asked: list[str]


@pytest.fixture
def broker_says(monkeypatch: pytest.MonkeyPatch) -> States:
    """What the broker says, by queue name (a queue not listed: it can't say); questions logged."""
    states = States()
    states.asked = []

    def inspect(name: str) -> QueueState | None:
        states.asked.append(name)
        return states.get(name)

    monkeypatch.setattr(broker, "inspect_queue", inspect)
    broker.QueueProbe._seen.clear()
    return states


@pytest.fixture
def dispatch(sent: list[Any], django_capture_on_commit_callbacks: Any, fast_settings: Any) -> Callable[..., int]:
    def _dispatch(**options: Any) -> int:
        with django_capture_on_commit_callbacks(execute=True):
            return int(noop.apply_async(**options).run_id)

    return _dispatch


def overdue(*run_ids: int, by: timedelta = timedelta(hours=1)) -> None:
    """As if each run's start timeout had passed ``by`` ago (and it was recorded that long before)."""
    SupervisedRun.objects.filter(pk__in=run_ids).update(
        next_check_at=F("next_check_at") - by, created_at=F("created_at") - by
    )


def sweep(capture: Any) -> Any:
    with capture(execute=True):
        return run_sweep("t")


def default_queue() -> str:
    from celery import current_app

    return str(current_app.conf.task_default_queue)


def test_a_run_behind_a_healthy_backlog_is_left_alone_and_not_counted(
    dispatch: Callable[..., int], sent: list[Any], broker_says: States, django_capture_on_commit_callbacks: Any
) -> None:
    q = default_queue()
    broker_says[q] = QueueState(q, ready=500, consumers=2)
    ids = [dispatch() for _ in range(3)]
    overdue(*ids, by=timedelta(minutes=5))
    published = len(sent)
    report = sweep(django_capture_on_commit_callbacks)
    assert report.republished == 0 and len(sent) == published
    assert broker_says.asked == [q]  # one question per queue per sweep, for the whole batch
    for run in SupervisedRun.objects.filter(pk__in=ids):
        assert run.status == RunStatus.QUEUED and run.publish_count == 1
        assert run.next_check_at is not None and run.next_check_at > run.created_at + timedelta(minutes=5)
    health = check_health()
    assert health.waiting.get("backlog") == 3 and health.queues[q]["ready"] == 500
    assert not [p for p in health.problems if "queue" in p]


def test_a_message_gone_from_its_queue_is_published_again(
    dispatch: Callable[..., int], sent: list[Any], broker_says: States, django_capture_on_commit_callbacks: Any
) -> None:
    q = default_queue()
    broker_says[q] = QueueState(q, ready=0, consumers=1)  # purged, lost, or held by a hung consumer
    run_id = dispatch()
    overdue(run_id)
    report = sweep(django_capture_on_commit_callbacks)
    assert report.republished == 1 and sent[-1][0] == run_id
    assert SupervisedRun.objects.get(pk=run_id).publish_count == 2


def test_past_the_bound_a_run_behind_a_backlog_is_published_once_per_bound(
    dispatch: Callable[..., int],
    sent: list[Any],
    broker_says: States,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.SUPERVISOR_MAX_BACKLOG_WAIT = 600.0
    settings.SUPERVISOR_MAX_PUBLISHES = 2
    q = default_queue()
    broker_says[q] = QueueState(q, ready=50, consumers=1)
    run_id = dispatch()
    overdue(run_id, by=timedelta(minutes=11))
    assert sweep(django_capture_on_commit_callbacks).republished == 1  # waited 11 min > 10 min x 1
    overdue(run_id, by=timedelta(minutes=5))  # 16 min < 10 min x 2 publishes: waits
    assert sweep(django_capture_on_commit_callbacks).republished == 0
    overdue(run_id, by=timedelta(minutes=5))  # 21 min: one more, and a healthy queue never ends it
    report = sweep(django_capture_on_commit_callbacks)
    run = SupervisedRun.objects.get(pk=run_id)
    assert report.republished == 1 and report.dead == 0 and run.status == RunStatus.QUEUED
    assert run.publish_count == 3


def test_a_queue_nobody_consumes_is_reported_and_its_runs_end_never_started(
    dispatch: Callable[..., int],
    sent: list[Any],
    broker_says: States,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.SUPERVISOR_MAX_PUBLISHES = 2
    q = default_queue()
    broker_says[q] = QueueState(q, ready=7, consumers=3)  # workers are up, on the default queue
    broker_says["nobody"] = QueueState("nobody", ready=1, consumers=0)
    run_id = dispatch(queue="nobody")
    overdue(run_id)
    assert sweep(django_capture_on_commit_callbacks).republished == 1  # counted: publish 2
    health = check_health()
    assert any("'nobody', which no worker consumes" in p for p in health.problems) and not health.ok
    overdue(run_id)
    report = sweep(django_capture_on_commit_callbacks)
    run = SupervisedRun.objects.get(pk=run_id)
    assert report.dead == 1 and run.status == RunStatus.DEAD and run.last_error.startswith("never started")


def test_a_worker_outage_leaves_runs_waiting_uncounted_and_is_reported(
    dispatch: Callable[..., int],
    sent: list[Any],
    broker_says: States,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.SUPERVISOR_MAX_PUBLISHES = 1
    q = default_queue()
    broker_says[q] = QueueState(q, ready=40, consumers=0)  # no queue has a consumer
    run_id = dispatch()
    for _ in range(3):
        overdue(run_id)
        report = sweep(django_capture_on_commit_callbacks)
        assert (report.republished, report.dead) == (0, 0)
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == RunStatus.QUEUED and run.publish_count == 1
    health = check_health()
    assert health.waiting.get("outage") == 1
    assert any("waiting for a worker: no queue has a consumer" in p for p in health.problems)
    broker_says[q] = QueueState(q, ready=0, consumers=1)  # the workers are back; the message is gone
    overdue(run_id)
    assert sweep(django_capture_on_commit_callbacks).dead == 1  # the first publish that counts ends it (max 1)


def test_without_an_answer_the_run_is_published_again_as_before(
    dispatch: Callable[..., int], sent: list[Any], broker_says: States, django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatch()  # the broker can't say (filesystem transport, unreachable)
    overdue(run_id)
    assert sweep(django_capture_on_commit_callbacks).republished == 1
    # A run whose message was never sent is published whatever its queue holds.
    q = default_queue()
    broker_says[q] = QueueState(q, ready=9, consumers=1)
    SupervisedRun.objects.filter(pk=run_id).update(publish_count=0)
    overdue(run_id)
    assert sweep(django_capture_on_commit_callbacks).republished == 1


def test_a_dropped_duplicate_never_writes_to_the_result_backend(
    monkeypatch: pytest.MonkeyPatch, sent: list[Any], django_capture_on_commit_callbacks: Any, fast_settings: Any
) -> None:
    """Through Celery's tracer (what a worker runs), a result backend and ``track_started``: the
    delivery that wins stores STARTED then SUCCESS; a duplicate of it stores nothing. Before, the
    tracer stored STARTED for every delivery, over the SUCCESS."""
    from celery import current_app, states
    from celery.app.trace import build_tracer

    from project.tasks import quiet_job
    from supervisor_app.broker import HEADER_ATTEMPT, HEADER_RUN

    app = current_app._get_current_object()
    backend = app.backend
    try:
        app._local.backend = _memory_backend(app)
        app.conf.task_track_started = True
        app.conf.task_ignore_result = False
        task = app.tasks[quiet_job.name]
        monkeypatch.setattr(type(task), "ignore_result", False)  # bound from task_ignore_result=True
        assert task.track_started is False and task.report_started is None  # the tracer never stores it
        with django_capture_on_commit_callbacks(execute=True):
            result = quiet_job.delay(0.0, "dup")
        run = SupervisedRun.objects.get(pk=result.run_id)
        tid = run.celery_task_id
        tracer = build_tracer(task.name, task, app=app, eager=False, propagate=False)
        request = {
            "id": tid,
            "hostname": "w@test",
            HEADER_RUN: run.pk,
            HEADER_ATTEMPT: run.attempt,
            "delivery_info": {},
            "headers": {HEADER_RUN: run.pk, HEADER_ATTEMPT: run.attempt},
        }
        stored: list[str] = []
        store = app.backend.store_result

        def spy(task_id: str, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
            stored.append(state)
            return store(task_id, result, state, *args, **kwargs)

        app.backend.store_result = spy
        tracer(tid, (0.0, "dup"), {}, request)
        assert stored == [states.STARTED, states.SUCCESS]
        assert SupervisedRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
        tracer(tid, (0.0, "dup"), {}, request)  # the duplicate: dropped at its claim
        assert stored == [states.STARTED, states.SUCCESS]
        assert app.backend.get_state(tid) == states.SUCCESS
    finally:
        app._local.backend = backend
        app.conf.task_track_started = False
        app.conf.task_ignore_result = True


def _memory_backend(app: Any) -> Any:
    from celery.backends.cache import CacheBackend

    return CacheBackend(app=app, url="memory://")


def test_a_task_s_own_track_started_is_kept_for_the_agent() -> None:
    from celery import shared_task

    from supervisor_app.tasks import SupervisedTask

    @shared_task(base=SupervisedTask, bind=True, track_started=True, name="tests.tracked")
    def tracked(self: Any) -> None:
        return None

    from celery import current_app

    task = current_app.tasks["tests.tracked"]
    assert tracked.track_started is False and type(task).report_started is True
