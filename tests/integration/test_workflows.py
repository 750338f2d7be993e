"""Workflows with real workers (issue 14): a worker killed mid-chain and mid-chord, link/link_error
once each, and the handle's ``.get()`` returning the value of a run that succeeded on its second
attempt. Every step records an ``Execution`` row when its body completes (a killed attempt records
none), so "once" is counted in the database."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator

import pytest
from celery import chain, chord

from project.models import Execution
from project.processes import wait_until
from project.tasks import add, add_fail_once, failed_step, flaky, plain_callback, total
from supervisor_app import NonRetryable
from supervisor_app.core.errors import RunFailed
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REDIS = os.environ.get("SUPERVISOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def labels() -> list[str]:
    return list(Execution.objects.order_by("created_at", "id").values_list("label", flat=True))


def step_running_on(label: str, prefix: str) -> bool:
    return SupervisedRun.objects.filter(kwargs__label=label, status="running", worker__startswith=prefix).exists()


def recorded_succeeded(*names: str) -> bool:
    return SupervisedRun.objects.filter(kwargs__label__in=names, status="succeeded").count() == len(names)


def outcomes(label: str) -> list[str]:
    run = SupervisedRun.objects.get(kwargs__label=label)
    return list(RunAttempt.objects.filter(run=run).order_by("number").values_list("outcome", flat=True))


@pytest.fixture
def redis_backend(live: Live) -> Iterator[Live]:
    """A Redis result backend, in this process and in the workers the test starts (chords need one)."""
    from celery import current_app

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    before = app.conf.result_backend
    app.conf.result_backend = REDIS
    app._local.backend = app._get_backend()
    live.env["CELERY_RESULT_BACKEND"] = REDIS
    try:
        yield live
    finally:
        backend = app.backend
        backend.result_consumer.stop()  # its pub/sub connection (a handle's .get() may have opened it)
        backend.client.connection_pool.disconnect()
        app.conf.result_backend = before
        app._local.backend = app._get_backend()
        del backend
        # This process's own client, closed above: collected here, not in whichever later test the
        # collector happens to run (where an unclosed socket's ResourceWarning fails that test).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_a_chain_survives_a_worker_killed_mid_step(live: Live) -> None:
    live.supervisor()
    doomed = live.worker("doomed")
    result = chain(add.s(1, 2, label="a"), add.s(10, label="b", seconds=4.0), add.s(100, label="c")).apply_async()
    wait_until(lambda: step_running_on("b", "doomed@"), 30, what="step b to run")
    doomed.kill()
    live.worker("rescuer")
    assert result.get(timeout=60) == 113
    # Every step once, in order; the killed step ran again on its second attempt.
    assert labels() == ["a", "b", "c"]
    assert outcomes("b") == ["lost", "succeeded"]
    assert SupervisedRun.objects.filter(task_name=add.name).count() == 3
    first, second, third = (SupervisedRun.objects.get(kwargs__label=x) for x in "abc")
    assert third.options["parent_id"] == second.task_id and second.options["parent_id"] == first.task_id
    assert {r.options.get("root_id") for r in (second, third)} == {first.task_id}
    assert not SupervisedRun.objects.filter(follow_up=True).exists()


def test_a_chord_survives_a_worker_killed_mid_header(redis_backend: Live) -> None:
    live = redis_backend
    live.supervisor()
    doomed = live.worker("doomed", concurrency=2)
    header = [add.s(1, 1, label="h0"), add.s(2, 2, label="h1", seconds=4.0), add.s(3, 3, label="h2")]
    result = chord(header)(total.s(label="body"))
    wait_until(lambda: step_running_on("h1", "doomed@"), 30, what="header step h1 to run")
    # The quick parts finish on doomed's other pool process: killed between a body and its recorded
    # outcome, a part would rightly run again (at-least-once). Only h1 is to be killed mid-run.
    wait_until(lambda: recorded_succeeded("h0", "h2"), 30, what="header steps h0 and h2 recorded")
    assert step_running_on("h1", "doomed@")  # h1 sleeps 4 s: still running
    doomed.kill()
    live.worker("rescuer", concurrency=2)
    assert result.get(timeout=60) == 12
    wait_until(lambda: "body" in labels(), 10, what="the body's execution row")
    done = labels()
    assert sorted(done) == ["body", "h0", "h1", "h2"] and done[-1] == "body"  # the callback once, last
    assert outcomes("h1") == ["lost", "succeeded"]
    assert SupervisedRun.objects.filter(task_name=total.name).count() == 1


def test_link_and_link_error_once_each_and_get_after_a_second_attempt(redis_backend: Live) -> None:
    live = redis_backend
    live.supervisor()
    live.worker("w", concurrency=2)
    ok = add_fail_once.apply_async(
        (3, 4), {"label": "flaky"}, link=plain_callback.s(label="linked"), link_error=failed_step.s(label="errback")
    )
    assert ok.get(timeout=60) == 7  # the value of the run, which succeeded on its second attempt
    assert outcomes("flaky") == ["failed", "succeeded"]
    # The result backend holds the run's final outcome under the handle's id.
    from celery import current_app

    # (told right after the run's success is committed, which .get() saw first)
    wait_until(lambda: current_app.backend.get_task_meta(ok.id)["status"] == "SUCCESS", 10, what="the backend")
    assert current_app.backend.get_task_meta(ok.id)["result"] == 7
    bad = flaky.apply_async(
        kwargs={"mode": "fatal", "label": "doomed"},
        link=plain_callback.s(label="never"),
        link_error=failed_step.s(label="errback"),
    )
    with pytest.raises(RunFailed, match="NonRetryable: bad input"):
        bad.get(timeout=60)
    # The result backend holds the task's own exception, stored by the worker that ran it.
    wait_until(lambda: current_app.backend.get_task_meta(bad.id)["status"] == "FAILURE", 10, what="the backend")
    assert isinstance(current_app.AsyncResult(bad.id).result, NonRetryable)
    wait_until(lambda: "errback" in labels() and "linked" in labels(), 30, what="the callbacks")
    errback = SupervisedRun.objects.get(kwargs__label="errback")
    assert errback.args == [bad.id]
    assert sorted(x for x in labels() if x in ("linked", "errback", "never")) == ["errback", "linked"]


def test_a_chain_mixing_plain_and_supervised_steps(live: Live) -> None:
    live.supervisor()
    live.worker("w", concurrency=2)
    # supervised -> plain -> supervised: each hands the value on, whoever dispatches the next step.
    result = chain(add.s(1, 2, label="a"), plain_callback.s(label="p"), add.s(10, label="c")).apply_async()
    assert result.get(timeout=60) == 13
    assert labels() == ["a", "p", "c"]
    assert SupervisedRun.objects.filter(task_name=add.name).count() == 2


def test_a_chord_whose_part_fails_finally_fails_its_body_once(redis_backend: Live) -> None:
    from celery.exceptions import ChordError

    live = redis_backend
    live.supervisor()
    live.worker("w", concurrency=2)
    header = [add.s(1, 1, label="ok"), flaky.s(mode="fatal", label="bad")]
    result = chord(header)(total.s(label="body"))
    # As Celery's own handle: the failed header part's error (the body's parent), once the
    # backend's join has failed the body, for which no run is recorded.
    with pytest.raises(NonRetryable, match="bad input"):
        result.get(timeout=60)
    wait_until(lambda: result.state == "FAILURE", 30, what="the body to be failed by the join")
    assert isinstance(result.result, ChordError)
    assert "body" not in labels() and not SupervisedRun.objects.filter(task_name=total.name).exists()


def test_a_chain_through_a_group_becomes_a_chord_and_completes(redis_backend: Live) -> None:
    from celery import group

    live = redis_backend
    live.supervisor()
    live.worker("w", concurrency=2)
    # Celery turns chain(a, group(b, c), d) into chain(a, chord([b, c], d)): a's continuation is a chord.
    result = chain(
        add.s(1, 1, label="a"), group(add.s(1, label="b"), add.s(2, label="c")), total.s(label="d")
    ).apply_async()
    assert result.get(timeout=60) == 7  # (2 + 1) + (2 + 2)
    assert sorted(labels()) == ["a", "b", "c", "d"] and labels()[0] == "a" and labels()[-1] == "d"
