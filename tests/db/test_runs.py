"""Service-level behaviour on the database (PostgreSQL in `make test`, SQLite too), no broker:
publishes are captured by the ``sent`` fixture."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from project.tasks import noop, slow_job
from supervisor_app import broker, runs, signals
from supervisor_app.core.retry import FailureDecision
from supervisor_app.core.states import RunStatus
from supervisor_app.models import RunAttempt, SupervisedRun
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def dispatched(sent: list[Any], django_capture_on_commit_callbacks: Any, fast_settings: Any) -> Callable[..., int]:
    def _dispatch(task: Any = noop, *args: Any) -> int:
        with django_capture_on_commit_callbacks(execute=True):
            result = task.delay(*args)
        return int(result.run_id)

    return _dispatch


@pytest.fixture
def listen() -> Any:
    received: list[tuple[str, dict[str, Any]]] = []
    connected = []
    for name in [
        "run_recovered",
        "run_dead",
        "run_failed",
        "run_retrying",
        "run_succeeded",
        "run_fenced",
        "run_timed_out",
    ]:
        sig = getattr(signals, name)

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            received.append((_name, kwargs))

        sig.connect(receiver, weak=False)
        connected.append((sig, receiver))
    yield received
    for sig, receiver in connected:
        sig.disconnect(receiver)


def test_delay_records_then_publishes_after_commit(dispatched: Callable[..., int], sent: list[Any]) -> None:
    run_id = dispatched(noop)
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == RunStatus.QUEUED and run.attempt == 1 and run.task_name == "project.tasks.noop"
    assert sent == [(run_id, 1, "project.tasks.noop")]


def test_nothing_is_published_when_the_transaction_rolls_back(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            noop.delay()
            raise RuntimeError("rollback")
    assert not SupervisedRun.objects.exists()
    assert sent == []


def test_non_json_arguments_are_refused_and_nothing_is_recorded(sent: list[Any]) -> None:
    with pytest.raises(TypeError, match="JSON"):
        slow_job.delay(object())
    with pytest.raises(TypeError, match="JSON"):
        slow_job.delay(float("nan"))
    assert not SupervisedRun.objects.exists()


def test_only_one_claim_of_an_attempt_wins(dispatched: Callable[..., int]) -> None:
    run_id = dispatched()
    assert runs.claim(run_id, 1, "w1") is not None
    assert runs.claim(run_id, 1, "w2") is None  # duplicate delivery
    assert runs.claim(run_id, 2, "w3") is None  # no such attempt
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.status == RunStatus.RUNNING and run.worker == "w1"
    assert run.lease_expires_at is not None and run.lease_expires_at > run.started_at


@pytest.mark.django_db(transaction=True)  # outside atomic(): PostgreSQL takes its one-statement path
def test_a_claim_retried_after_a_lost_reply_is_granted_to_the_same_delivery_only(
    dispatched: Callable[..., int],
) -> None:
    run_id = dispatched()
    first = runs.claim(run_id, 1, "w1", task_id="t1", token="00000000-0000-4000-8000-000000000001")
    assert first is not None
    # The reply was lost and the agent retries with its own token: granted, the attempt not burnt.
    again = runs.claim(run_id, 1, "w1", task_id="t1", token=first.token)
    assert again is not None and again.token == first.token
    # Any other delivery of the same attempt is refused.
    assert runs.claim(run_id, 1, "w2", task_id="t2") is None
    assert RunAttempt.objects.filter(run_id=run_id).count() == 1
    assert runs.finish_success(run_id, 1, "w1", first.token) is True


@pytest.mark.django_db(transaction=True)
def test_the_fence_is_unique_per_claim_not_per_attempt_number(dispatched: Callable[..., int]) -> None:
    """A claim forgotten by a database crash (asynchronous commit), the attempt then claimed again by
    a second worker: the first worker's renewals and finish must not match the second's lease."""
    run_id = dispatched()
    forgotten = runs.claim(run_id, 1, "w1", token="00000000-0000-4000-8000-0000000000aa")
    assert forgotten is not None
    SupervisedRun.objects.filter(pk=run_id).update(status=RunStatus.QUEUED, lease_token=None)  # the crash
    second = runs.claim(run_id, 1, "w2")
    assert second is not None and second.token != forgotten.token
    key = (run_id, 1)
    assert runs.renew_leases([key], {key: forgotten.token})[key].held is False
    assert runs.heartbeat(run_id, 1, token=forgotten.token).held is False
    assert runs.finish_success(run_id, 1, "w1", forgotten.token) is False
    assert runs.renew_leases([key], {key: second.token})[key].held is True
    assert runs.finish_success(run_id, 1, "w2", second.token) is True


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_agent_writes_are_one_statement_with_asynchronous_commit_inside_it(
    dispatched: Callable[..., int], settings: Any, django_assert_max_num_queries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg2 and psycopg 3's server-side binding refuse ``SET LOCAL …; UPDATE …`` in one string:
    the setting travels inside the statement, and is in force for the transaction that wrote."""
    from django.db import connection

    from supervisor_app.runs import leases

    settings.SUPERVISOR_ASYNC_AGENT_COMMIT = True
    run_id = dispatched()
    with django_assert_max_num_queries(1) as queries:
        won = runs.claim(run_id, 1, "w")
    assert won is not None
    # Migration 0013's function, planned once per session; asynchronous commit is its parameter.
    sql = queries.captured_queries[0]["sql"]
    assert ";" not in sql.strip().rstrip(";") and "supervisor_claim_v1(" in sql and sql.endswith(", true)")
    with transaction.atomic(), connection.cursor() as cursor:
        # In force for the transaction of the call that wrote (here, the caller's).
        cursor.execute(
            "SELECT o_max_attempts FROM supervisor_claim_v1(%s, 1, 'w', '', %s::uuid, 'running', 'running', "
            "'running', true)",
            [run_id, won.token],
        )
        assert cursor.fetchone() is not None  # the same claim, retried: granted again
        cursor.execute("SELECT current_setting('synchronous_commit')")
        assert cursor.fetchone() == ("off",)
    with django_assert_max_num_queries(1):
        assert runs.finish_success(run_id, 1, "w", won.token) is True

    # Before the migration is applied (code deployed first), the same statements go as text.
    monkeypatch.setattr(leases._Functions, "present", False)
    again = dispatched()
    with django_assert_max_num_queries(1) as queries:
        won = runs.claim(again, 1, "w")
    assert won is not None
    sql = queries.captured_queries[0]["sql"]
    assert ";" not in sql.strip().rstrip(";") and "set_config('synchronous_commit', 'off', true)" in sql
    with django_assert_max_num_queries(1):
        assert runs.finish_success(again, 1, "w", won.token) is True


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_database_without_the_agent_functions_falls_back_to_text_statements(
    dispatched: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import connection

    from supervisor_app.runs import leases

    with connection.cursor() as cursor:
        cursor.execute("ALTER FUNCTION supervisor_claim_v1 RENAME TO supervisor_claim_v1_hidden")
    monkeypatch.setattr(leases._Functions, "present", None)
    try:
        run_id = dispatched()
        won = runs.claim(run_id, 1, "w")  # "function does not exist": the text statement, same answer
        assert won is not None and leases._Functions.present is False
        assert SupervisedRun.objects.get(pk=run_id).status == "running"
        assert runs.finish_success(run_id, 1, "w", won.token) is True
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER FUNCTION supervisor_claim_v1_hidden RENAME TO supervisor_claim_v1")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_per_task_statements_skip_django_s_cursor_only_when_nothing_observes_it(
    dispatched: Callable[..., int],
) -> None:
    """The claim and the success go through the driver's cursor (a tenth of a millisecond a task
    less): its errors still arrive as Django's, and the connection is still judged after one. With an
    execute wrapper installed (tracing, instrumentation), they go through Django's cursor, seen."""
    from django.db import DataError, connection

    run_id = dispatched()
    with pytest.raises(DataError):
        runs.claim(run_id, 1, "w", token="not-a-uuid")  # the driver's error, as Django's
    assert connection.is_usable()
    seen: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        won = runs.claim(run_id, 1, "w")
        assert won is not None
        assert runs.finish_success(run_id, 1, "w", won.token) is True
    assert [sql.split("(")[0] for sql in seen] == [
        "SELECT * FROM supervisor_claim_v1",
        "SELECT supervisor_succeed_v1",
    ]
    # Without one: nothing in between, the same outcome.
    again = dispatched()
    won = runs.claim(again, 1, "w")
    assert won is not None and runs.finish_success(again, 1, "w", won.token) is True
    assert SupervisedRun.objects.get(pk=again).status == RunStatus.SUCCEEDED
    assert len(seen) == 2


def test_expired_lease_is_recovered_once_and_the_zombie_is_fenced(
    dispatched: Callable[..., int], sent: list[Any], expire: Any, listen: Any, django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "zombie")
    expire(run_id)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    assert report.recovered == 1
    run = SupervisedRun.objects.get(pk=run_id)
    assert (run.status, run.attempt, run.worker) == (RunStatus.QUEUED, 2, "")
    assert sent[-1] == (run_id, 2, "project.tasks.noop")
    # A second sweep finds nothing: the attempt was re-enqueued once.
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").recovered == 0
    # The zombie wakes up: its heartbeat and completion are refused.
    assert runs.renew_leases([(run_id, 1)])[(run_id, 1)].held is False
    with django_capture_on_commit_callbacks(execute=True):
        assert runs.finish_success(run_id, 1, "zombie") is False
    attempt1 = RunAttempt.objects.get(run_id=run_id, number=1)
    assert attempt1.outcome == "fenced"
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.QUEUED
    # The new attempt runs normally.
    assert runs.claim(run_id, 2, "w2") is not None
    assert runs.finish_success(run_id, 2, "w2") is True
    names = [name for name, _ in listen]
    assert names.count("run_recovered") == 1 and "run_fenced" in names


def test_lost_on_the_last_attempt_is_dead(
    dispatched: Callable[..., int], expire: Any, listen: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    settings.SUPERVISOR_MAX_ATTEMPTS = 1
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    expire(run_id)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    assert report.dead == 1
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.DEAD
    assert RunAttempt.objects.get(run_id=run_id, number=1).outcome == "lost"
    assert [kw["reason"] for name, kw in listen if name == "run_dead"] == ["lost"]


def test_live_lease_is_left_alone(dispatched: Callable[..., int]) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    assert run_sweep("t").acted == 0
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.RUNNING


def test_renewal_extends_the_lease_and_reports_cancel(dispatched: Callable[..., int], expire: Any) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    expire(run_id, seconds=1)
    before = SupervisedRun.objects.get(pk=run_id).lease_expires_at
    state = runs.renew_leases([(run_id, 1)])[(run_id, 1)]
    assert state.held and not state.cancel_requested
    assert SupervisedRun.objects.get(pk=run_id).lease_expires_at > before
    assert runs.request_cancel(run_id) == RunStatus.RUNNING
    assert runs.renew_leases([(run_id, 1)])[(run_id, 1)].cancel_requested is True
    assert runs.finish_cancelled(run_id, 1, "w") is True
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.CANCELLED


def test_checkpoint_is_handed_to_the_next_attempt(
    dispatched: Callable[..., int], expire: Any, django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w1")
    state = runs.heartbeat(run_id, 1, progress={"done": 40}, checkpoint={"offset": 40})
    assert state.held
    expire(run_id)
    with django_capture_on_commit_callbacks(execute=True):
        run_sweep("t")
    second = runs.claim(run_id, 2, "w2")
    assert second is not None and second.checkpoint == {"offset": 40}
    assert SupervisedRun.objects.get(pk=run_id).progress == {"done": 40}


def test_retryable_failure_waits_its_backoff_then_a_new_attempt_is_queued(
    dispatched: Callable[..., int], sent: list[Any], expire: Any, django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    assert runs.finish_failure(run_id, 1, FailureDecision(RunStatus.RETRYING, 30.0), "ValueError: x", "tb")
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").retried == 0  # backoff not over
    expire(run_id, "next_check_at", 60)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").retried == 1
    run = SupervisedRun.objects.get(pk=run_id)
    assert (run.status, run.attempt) == (RunStatus.QUEUED, 2)
    assert sent[-1] == (run_id, 2, "project.tasks.noop")
    assert RunAttempt.objects.get(run_id=run_id, number=1).error == "ValueError: x"


def test_unstarted_run_is_republished_with_backoff(
    dispatched: Callable[..., int], sent: list[Any], expire: Any, django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatched()
    assert len(sent) == 1
    expire(run_id, "next_check_at", 60)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").republished == 1
    assert sent[-1] == (run_id, 1, "project.tasks.noop")  # same attempt: the claim drops duplicates
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.publish_count == 2 and run.status == RunStatus.QUEUED


def test_run_past_max_runtime_is_timed_out_and_requeued(
    dispatched: Callable[..., int], expire: Any, settings: Any, django_capture_on_commit_callbacks: Any, listen: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    settings.SUPERVISOR_MAX_RUNTIME = 100
    run_id = dispatched()
    won = runs.claim(run_id, 1, "w", task_id="tid-1")
    assert won is not None
    assert SupervisedRun.objects.get(pk=run_id).deadline_at is not None
    expire(run_id, "deadline_at", 200)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").timed_out == 1
    # No revoke: the agent learns it at its next renewal, and its keeper stops the body in-process.
    assert not runs.renew_leases([(run_id, 1)], {(run_id, 1): won.token})[(run_id, 1)].held
    assert RunAttempt.objects.get(run_id=run_id, number=1).outcome == "timed_out"
    assert SupervisedRun.objects.get(pk=run_id).attempt == 2
    assert "run_timed_out" in [name for name, _ in listen]


@pytest.mark.parametrize("max_runtime", [None, 3600], ids=["no-max-runtime", "a-later-max-runtime"])
def test_a_cancelled_run_that_does_not_stop_within_the_grace_is_cancelled_and_its_agent_told(
    dispatched: Callable[..., int], expire: Any, settings: Any, django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch, max_runtime: float | None,
) -> None:  # fmt: skip
    settings.SUPERVISOR_MAX_RUNTIME = max_runtime
    settings.SUPERVISOR_CANCEL_GRACE = 30
    run_id = dispatched()
    runs.claim(run_id, 1, "w", task_id="tid-1")
    assert runs.request_cancel(run_id) == RunStatus.RUNNING
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.deadline_at is not None and run.lease_expires_at is not None
    grace = (run.deadline_at - run.started_at).total_seconds()
    assert 29 <= grace <= 31, grace  # the grace, not the max runtime
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").cancelled == 0  # within the grace: the body may still stop itself
    expire(run_id, "deadline_at", 60)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").cancelled == 1
    assert not runs.renew_leases([(run_id, 1)])[(run_id, 1)].held  # its keeper stops the body
    run = SupervisedRun.objects.get(pk=run_id)
    assert (run.status, run.attempt) == (RunStatus.CANCELLED, 1)
    assert RunAttempt.objects.get(run_id=run_id, number=1).outcome == "cancelled"
    assert runs.finish_success(run_id, 1, "w") is False  # the body finished late: fenced


def test_a_cancelled_run_whose_agent_died_is_cancelled_not_retried(
    dispatched: Callable[..., int], expire: Any, django_capture_on_commit_callbacks: Any, sent: list[Any]
) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    runs.request_cancel(run_id)
    expire(run_id)
    with django_capture_on_commit_callbacks(execute=True):
        report = run_sweep("t")
    assert (report.recovered, report.cancelled) == (0, 1)
    run = SupervisedRun.objects.get(pk=run_id)
    assert (run.status, run.attempt) == (RunStatus.CANCELLED, 1)
    assert RunAttempt.objects.get(run_id=run_id, number=1).outcome == "lost"
    assert len(sent) == 1  # attempt 1 only: nothing published for a cancelled run


def test_a_retry_of_a_cancelled_run_is_not_dispatched(
    dispatched: Callable[..., int], django_capture_on_commit_callbacks: Any, sent: list[Any]
) -> None:
    run_id = dispatched()
    # A retryable failure and a cancel that raced it: the backoff is over.
    SupervisedRun.objects.filter(pk=run_id).update(
        status=RunStatus.RETRYING, cancel_requested=True, next_check_at=timezone.now() - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").retried == 0
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.CANCELLED
    assert len(sent) == 1


def test_broker_down_at_dispatch_keeps_the_run_for_the_supervisor(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any, fast_settings: Any
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(broker, "send", refuse)
    with django_capture_on_commit_callbacks(execute=True):
        result = noop.delay()  # does not raise: the run is recorded
    run = SupervisedRun.objects.get(pk=result.run_id)
    assert run.status == RunStatus.QUEUED and run.publish_count == 0
    delivered: list[int] = []
    monkeypatch.setattr(broker, "send", lambda message, producer=None: delivered.append(message.run_id))
    with django_capture_on_commit_callbacks(execute=True):
        assert run_sweep("t").republished == 1
    assert delivered == [run.pk]


def test_retry_now_reopens_a_dead_run(
    dispatched: Callable[..., int], sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    run_id = dispatched()
    runs.claim(run_id, 1, "w")
    runs.finish_failure(run_id, 1, FailureDecision(RunStatus.FAILED, None), "NonRetryable: x", "")
    with django_capture_on_commit_callbacks(execute=True):
        assert runs.retry_now(run_id) is True
    run = SupervisedRun.objects.get(pk=run_id)
    assert (run.status, run.attempt) == (RunStatus.QUEUED, 2)
    assert sent[-1] == (run_id, 2, "project.tasks.noop")


def test_cancel_of_a_queued_run_is_immediate(dispatched: Callable[..., int]) -> None:
    run_id = dispatched()
    assert runs.request_cancel(run_id) == RunStatus.CANCELLED
    assert runs.claim(run_id, 1, "w") is None
    assert runs.request_cancel(run_id) is None  # terminal: nothing more to cancel


def test_supervisor_records_its_liveness(dispatched: Callable[..., int]) -> None:
    from supervisor_app.models import ProcessHeartbeat

    run_sweep("sup-1")
    run_sweep("sup-1")
    beat = ProcessHeartbeat.objects.get(kind="supervisor", name="sup-1")
    assert beat.last_seen >= beat.started_at
    assert "recovered" in beat.stats


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_single_statement_agent_path_on_postgres(sent: list[Any], settings: Any) -> None:
    """Outside a transaction, claim / renew / finish run as one statement each, fenced like the rest,
    and their relaxed commit (SET LOCAL) does not leak into the connection the task body uses."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.SUPERVISOR_ASYNC_AGENT_COMMIT = True
    run_id = int(noop.delay().run_id)
    with CaptureQueriesContext(connection) as ctx:
        won = runs.claim(run_id, 1, "w1", task_id="t1")
        assert runs.renew_leases([(run_id, 1)])[(run_id, 1)].held
        assert runs.finish_success(run_id, 1, "w1") is True
    assert len(ctx.captured_queries) == 3
    assert won is not None and won.max_attempts == 3 and won.checkpoint is None
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    attempt = RunAttempt.objects.get(run_id=run_id, number=1)
    assert (attempt.outcome, attempt.worker, attempt.task_id) == ("succeeded", "w1", "t1")
    assert attempt.ended_at is not None
    # A second delivery and a zombie finish both find nothing to do.
    assert runs.claim(run_id, 1, "w2") is None
    assert runs.finish_success(run_id, 1, "w2") is False
    assert SupervisedRun.objects.get(pk=run_id).status == RunStatus.SUCCEEDED


def test_a_schedule_policy_backoff_wins_over_the_task_default(sent: list[Any], fast_settings: Any) -> None:
    from datetime import timedelta

    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from project.tasks import flaky
    from supervisor_app.models import SupervisionPolicy
    from supervisor_app.worker.execute import effective_retry_policy

    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    schedule = PeriodicTask.objects.create(name="p", task="project.tasks.flaky", interval=every)
    policy = runs.RunPolicy(max_attempts=3, lease_timeout=30, start_timeout=30, max_runtime=None)
    scheduled = runs.create_run("project.tasks.flaky", [], {}, policy, periodic_task_id=schedule.pk,
                                    scheduled_for="2026-01-01T00:00:00Z")  # fmt: skip
    adhoc = runs.create_run("project.tasks.flaky", [], {}, policy)
    assert scheduled is not None and adhoc is not None
    # No policy row yet: the task's own backoff (flaky: 0.2 s, cap 1 s).
    assert effective_retry_policy(flaky, scheduled.pk, 3).backoff == 0.2
    SupervisionPolicy.objects.create(
        periodic_task=schedule, backoff=timedelta(seconds=30), backoff_max=timedelta(minutes=5)
    )
    chosen = effective_retry_policy(flaky, scheduled.pk, 3)
    assert (chosen.backoff, chosen.backoff_max) == (30.0, 300.0)
    assert effective_retry_policy(flaky, adhoc.pk, 3).backoff == 0.2  # ad-hoc runs: the task's


def test_publishing_one_run_by_id_returns_its_producer(
    sent: list[Any], monkeypatch: pytest.MonkeyPatch, dispatched: Callable[..., int]
) -> None:
    """The sweep's queue_one release publishes by id: it used to keep a producer out of the pool each time."""
    from supervisor_app.runs import publishing

    run_id = dispatched()
    closed: list[bool] = []
    real_close = publishing.RunPublisher.close

    def close(self: Any) -> None:
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(publishing.RunPublisher, "close", close)
    assert publishing.publish_by_id(run_id)
    assert closed == [True] and sent[-1][0] == run_id


def test_an_eta_waits_in_the_database_and_a_past_one_is_published_at_once(
    dispatched: Callable[..., int], sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    from datetime import timezone as tz

    with django_capture_on_commit_callbacks(execute=True):
        later = noop.apply_async(eta=timezone.now() + timedelta(minutes=10)).run_id
        now = noop.apply_async(eta=timezone.now().astimezone(tz.utc) - timedelta(seconds=5)).run_id
    waiting = SupervisedRun.objects.get(pk=later)
    assert waiting.publish_count == 0 and waiting.status == RunStatus.QUEUED
    assert 590 < (waiting.next_check_at - waiting.created_at).total_seconds() < 610
    assert [s[0] for s in sent] == [now]  # the past eta: published after commit, like a plain delay()
    with pytest.raises(TypeError, match="countdown must be a number"):
        noop.apply_async(countdown="soon")
