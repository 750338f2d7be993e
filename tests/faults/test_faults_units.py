"""Fault-suite findings that need no processes (issue 6)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import OperationalError, ProgrammingError

from project.tasks import bad_heartbeat, noop
from supervisor_app import NonRetryable, runs
from supervisor_app.core.errors import LeaseLost, RunCancelled
from supervisor_app.core.retry import decide_failure
from supervisor_app.core.states import RunStatus
from supervisor_app.worker import execute, interrupt, lease_keeper
from tests.conftest import deliver


def test_retry_policy_of_a_task_without_its_own_backoff_uses_the_settings(settings: Any) -> None:
    """Regression: the policy read ``supervisor_settings.backoff``/``backoff_max``, which do not exist,
    so every failure of a task without its own backoff crashed the agent's finish: the error was not
    recorded, a non-retryable error was retried, and the attempt waited for its lease to expire."""
    settings.SUPERVISOR_BACKOFF = 3.0
    settings.SUPERVISOR_BACKOFF_MAX = 30.0
    policy = noop.retry_policy()
    assert (policy.backoff, policy.backoff_max) == (3.0, 30.0)
    assert decide_failure(policy, 1, NonRetryable("bad")).status == RunStatus.FAILED
    assert decide_failure(policy, 1, ValueError("again")).status == RunStatus.RETRYING
    assert bad_heartbeat.retry_policy().backoff == 0.1  # a task's own value still wins


# ---------------------------------------------------------------- database outages seen by an agent


@pytest.fixture
def keeper(monkeypatch: pytest.MonkeyPatch) -> lease_keeper.LeaseKeeper:
    """A lease keeper that never starts its thread (these tests drive it by hand)."""
    fresh = lease_keeper.LeaseKeeper()
    monkeypatch.setattr(fresh, "_ensure_thread", lambda: None)
    monkeypatch.setattr(execute, "lease_keeper", fresh)
    monkeypatch.setattr(execute.time, "sleep", lambda seconds: None)
    return fresh


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("connection refused")


def test_a_heartbeat_during_an_outage_goes_on_while_the_lease_surely_holds(
    keeper: lease_keeper.LeaseKeeper, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runs, "heartbeat", _unavailable)
    keeper.register(1, 1, interval=1.0, lease_timeout=10.0, since=time.monotonic())
    execute.heartbeat(1, 1, progress={"step": 1})  # no exception: 10 s of lease left
    assert "heartbeat not saved, database unavailable" in caplog.text


def test_a_heartbeat_during_an_outage_past_the_lease_stops_the_body(
    keeper: lease_keeper.LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper.register(1, 1, interval=1.0, lease_timeout=10.0, since=time.monotonic() - 5.0)

    def unavailable_for_long(*args: Any, **kwargs: Any) -> Any:
        lease = keeper.state(1, 1)
        assert lease is not None
        lease.held_until -= 5.0  # the statement hung for the rest of the lease before failing
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(runs, "heartbeat", unavailable_for_long)
    with pytest.raises(LeaseLost, match="database unreachable past the lease"):
        execute.heartbeat(1, 1)
    lease = keeper.state(1, 1)
    assert lease is not None and lease.lost and lease.unprovable


def test_a_body_resuming_past_its_lease_fences_itself_before_any_database_call(
    keeper: lease_keeper.LeaseKeeper, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A body paused (SIGSTOP, a frozen VM) past its lease may run before the keeper's thread: its
    heartbeat must not send a write past the lease, and its finish must record nothing."""
    from celery.exceptions import Ignore

    def no_database(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a self-fenced body touched the database")

    monkeypatch.setattr(runs, "heartbeat", no_database)
    keeper.register(1, 1, interval=1.0, lease_timeout=10.0, since=time.monotonic() - 9.5)  # 0.5 s left < margin
    with pytest.raises(LeaseLost):
        execute.heartbeat(1, 1)
    lease = keeper.unregister(1, 1)
    assert lease is not None and lease.unprovable
    with pytest.raises(Ignore):
        execute.finish(lease, no_database, 1, 1)
    assert "self-fenced, nothing recorded" in caplog.text


def test_a_successful_renewal_extends_the_lease_from_when_it_was_sent(keeper: lease_keeper.LeaseKeeper) -> None:
    sent = time.monotonic() - 11.0
    keeper.register(1, 1, interval=1.0, lease_timeout=10.0, since=sent)
    keeper.mark(1, 1, held=True, cancel_requested=False, since=sent + 5.0)
    lease = keeper.state(1, 1)
    assert lease is not None and lease.held_until == pytest.approx(sent + 15.0)
    keeper.mark(1, 1, held=False, cancel_requested=False, since=sent + 9.0)  # refused: lost, not extended
    assert lease.lost and lease.held_until == pytest.approx(sent + 15.0)


def test_ride_out_retries_only_while_the_database_is_unavailable() -> None:
    calls: list[int] = []

    def flaky_write() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("server closed the connection")
        return "written"

    assert execute.ride_out(flaky_write, time.monotonic() + 60, "test") == "written"
    assert len(calls) == 3
    with pytest.raises(OperationalError):
        execute.ride_out(_unavailable, time.monotonic() - 1, "test")  # past the deadline: raised

    def buggy_write() -> None:
        calls.append(1)
        raise ProgrammingError("syntax error")  # not an outage: never retried

    before = len(calls)
    with pytest.raises(ProgrammingError):
        execute.ride_out(buggy_write, time.monotonic() + 60, "test")
    assert len(calls) == before + 1


def test_a_finish_that_cannot_be_written_within_the_lease_is_left_to_the_supervisor(
    keeper: lease_keeper.LeaseKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    from celery.exceptions import Ignore

    keeper.register(1, 1, interval=1.0, lease_timeout=10.0, since=time.monotonic() - 11.0)
    lease = keeper.unregister(1, 1)
    with pytest.raises(Ignore):
        execute.finish(lease, _unavailable, 1, 1)
    assert "outcome not recorded" in caplog.text and "the supervisor will recover the attempt" in caplog.text


@pytest.mark.django_db  # the loop drops broken connections after a failure
def test_a_failing_supervisor_logs_one_traceback_per_outage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from supervisor_app import supervisor

    stop = threading.Event()
    outcomes = iter([OperationalError("connection refused\nIs the server running?")] * 3 + [None])

    def sweep(name: str) -> None:
        outcome = next(outcomes)
        if outcome is None:
            stop.set()  # the database is back: one good sweep, then stop the loop
            return
        raise outcome

    monkeypatch.setattr(supervisor, "run_sweep", sweep)
    assert supervisor.loop(stop, interval=0.0, name="t") == 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "sweep failed; retrying" in tracebacks[0].getMessage()
    again = [r.getMessage() for r in caplog.records if "failed again" in r.getMessage()]
    assert again == ["sweep failed again (OperationalError: connection refused)"] * 2
    assert "sweeping again after 3 failed sweeps" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_message_without_a_run_is_adopted_and_executed_supervised(caplog: pytest.LogCaptureFixture) -> None:
    from supervisor_app.models import RunAttempt, SupervisedRun

    deliver(noop, "sent-by-another-service")
    run = SupervisedRun.objects.get(task_name=noop.name)
    assert (run.status, run.attempt, run.publish_count) == ("succeeded", 1, 1)
    assert list(RunAttempt.objects.filter(run=run).values_list("outcome", flat=True)) == ["succeeded"]
    assert f"adopted as run {run.pk}" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_message_without_a_run_is_adopted_once_and_run_once(caplog: pytest.LogCaptureFixture) -> None:
    """acks_late + a lost connection, or a worker killed after the body: the broker delivers the
    same message again. The first delivery's run is found by the message's id; its attempt 1 is
    not claimable any more, so the body does not run again and no second run is recorded."""
    from celery.exceptions import Ignore

    from project.models import Execution
    from project.tasks import slow_job
    from supervisor_app.models import SupervisedRun

    assert deliver(slow_job, "foreign-1", 0, 0.0, "once") == 0
    with pytest.raises(Ignore):
        deliver(slow_job, "foreign-1", 0, 0.0, "once")
    run = SupervisedRun.objects.get(task_name=slow_job.name)
    assert (run.status, run.attempt, run.adopted_message.message_id) == ("succeeded", 1, "foreign-1")
    assert Execution.objects.filter(label="once").count() == 1
    assert f"message foreign-1 redelivered; adopted before as run {run.pk}" in caplog.text
    assert deliver(slow_job, "foreign-2", 0, 0.0, "other") == 0  # another message: another run
    assert SupervisedRun.objects.filter(task_name=slow_job.name).count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_message_runs_if_its_first_delivery_never_started_it() -> None:
    """The first delivery recorded the run, then its worker died before the claim."""
    from project.models import Execution
    from project.tasks import slow_job
    from supervisor_app.models import RunAttempt, SupervisedRun

    first = runs.create_run(
        slow_job.name, [0, 0.0, "late"], {}, slow_job.run_policy(), publish=False, adopted_message_id="foreign-3"
    )
    assert first is not None
    assert deliver(slow_job, "foreign-3", 0, 0.0, "late") == 0
    assert SupervisedRun.objects.filter(task_name=slow_job.name).count() == 1
    assert SupervisedRun.objects.get(pk=first.pk).status == "succeeded"
    assert list(RunAttempt.objects.filter(run=first).values_list("number", "outcome")) == [(1, "succeeded")]
    assert Execution.objects.filter(label="late").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_message_whose_run_was_taken_over_is_dropped() -> None:
    """The first delivery's worker died mid-body; the supervisor already published attempt 2."""
    from celery.exceptions import Ignore

    from project.models import Execution
    from project.tasks import slow_job
    from supervisor_app.models import SupervisedRun

    first = runs.create_run(
        slow_job.name, [0, 0.0, "taken"], {}, slow_job.run_policy(), publish=False, adopted_message_id="foreign-4"
    )
    assert first is not None
    SupervisedRun.objects.filter(pk=first.pk).update(attempt=2)
    with pytest.raises(Ignore):
        deliver(slow_job, "foreign-4", 0, 0.0, "taken")
    assert not Execution.objects.filter(label="taken").exists()
    assert SupervisedRun.objects.filter(task_name=slow_job.name).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_message_without_a_run_whose_arguments_cannot_be_recorded_runs_once_unsupervised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from project.tasks import slow_job
    from supervisor_app.models import SupervisedRun

    slow_job.push_request(id="odd", hostname="w@test", called_directly=False, is_eager=False)
    try:
        assert slow_job(1, 0.0, label={1, 2}) == 1  # a set is not JSON
    finally:
        slow_job.pop_request()
    assert not SupervisedRun.objects.exists()
    assert "none could be recorded (TypeError); executed unsupervised" in caplog.text


# ---------------------------------------------------------------- interrupting a body


@pytest.fixture
def interrupt_handler() -> Any:
    import signal

    previous = signal.getsignal(interrupt.INTERRUPT_SIGNAL)
    signal.signal(interrupt.INTERRUPT_SIGNAL, signal.SIG_DFL)
    yield
    signal.signal(interrupt.INTERRUPT_SIGNAL, previous)
    interrupt.body.current = interrupt.body.pending = interrupt.body.fired = None


def test_an_interrupt_raises_in_the_body_it_was_meant_for_only(interrupt_handler: None) -> None:
    import threading

    assert interrupt.can_interrupt()  # pytest runs tests on the main thread: the handler is installed
    interrupt.body.current = (7, 2)

    def from_the_lease_keeper(cancel: bool, key: tuple[int, int] = (7, 2)) -> threading.Timer:
        timer = threading.Timer(0.05, interrupt.interrupt_body, args=(key, cancel))
        timer.start()
        return timer

    started = time.monotonic()
    with pytest.raises(RunCancelled):
        from_the_lease_keeper(cancel=True)
        time.sleep(5)  # a blocking sleep is broken by the signal's handler
    assert time.monotonic() - started < 2
    assert interrupt.body.fired == (7, 2)
    with pytest.raises(LeaseLost):
        from_the_lease_keeper(cancel=False)
        time.sleep(5)
    interrupt.body.current = (8, 1)  # that body finished; another one runs now
    from_the_lease_keeper(cancel=False).join()  # signal sent; the handler runs here, and ignores it
    assert interrupt.body.pending is None and interrupt.body.fired == (7, 2)


def test_no_interrupts_off_the_main_thread_or_over_a_foreign_handler(interrupt_handler: None) -> None:
    import signal
    import threading

    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(interrupt.can_interrupt()))
    thread.start()
    thread.join()
    assert seen == [False]  # threads pool: bodies stop at heartbeat(), or after the cancel grace

    def theirs(signum: int, frame: Any) -> None:
        pass

    signal.signal(interrupt.INTERRUPT_SIGNAL, theirs)
    assert interrupt.can_interrupt() is False
    assert signal.getsignal(interrupt.INTERRUPT_SIGNAL) is theirs  # left in place
