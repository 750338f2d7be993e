"""Issue 14 in the database: run ids, stored results, the handle, and workflow continuations.

Messages are captured instead of sent (``published``) and executed in this process as a worker
would execute them (``deliver_run``: the message's canvas comes from the run, as the broker carries
it). The same behaviour with real workers killed mid-workflow is in tests/integration/test_workflows.py.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import chain, group
from celery.exceptions import Retry, TimeoutError
from django.utils import timezone

from project.models import Execution
from project.tasks import add, add_fail_once, failed_step, flaky, total
from supervisor_app import broker, runs
from supervisor_app.core.errors import RunFailed
from supervisor_app.core.workflow import as_request
from supervisor_app.models import SupervisedRun
from supervisor_app.supervisor import run_sweep
from supervisor_app.worker.results import RunResult

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[broker.Message]:
    """Every attempt published (not sent), whole."""
    messages: list[broker.Message] = []
    monkeypatch.setattr(broker, "send", lambda message, producer=None: messages.append(message))
    return messages


def deliver_run(task: Any, message: broker.Message) -> Any:
    """Execute a captured message as a worker would: its id, run headers and canvas."""
    request = {broker.HEADER_RUN: message.run_id, broker.HEADER_ATTEMPT: message.attempt, **as_request(message.options)}
    task.push_request(id=message.task_id, hostname="w@test", called_directly=False, is_eager=False, **request)
    try:
        return task(*message.args, **message.kwargs)
    finally:
        task.pop_request()


def run_of(result: Any) -> SupervisedRun:
    return SupervisedRun.objects.get(task_id=result.id)


# --------------------------------------------------------------------------- ids


def test_a_run_is_published_under_one_uuid_on_every_attempt(published: list[broker.Message], expire: Any) -> None:
    result = add.delay(1, 2)
    assert isinstance(result, RunResult)
    assert str(uuid.UUID(result.id)) == result.id  # a UUID, not "<run>.<attempt>"
    run = run_of(result)
    assert run.pk == result.run_id
    assert [m.task_id for m in published] == [result.id]
    # Its agent dies: the recovered attempt goes out under the same id, so the handle follows it.
    runs.claim(run.pk, 1, "w1")
    expire(run.pk)
    run_sweep("t")
    assert [(m.attempt, m.task_id) for m in published] == [(1, result.id), (2, result.id)]


def test_task_id_is_honoured_and_a_second_dispatch_with_it_records_nothing(published: list[broker.Message]) -> None:
    tid = str(uuid.uuid4())
    first = add.apply_async((1, 2), task_id=tid)
    again = add.apply_async((5, 6), task_id=tid)
    assert first.id == again.id == tid
    assert (first.deduplicated, again.deduplicated) == (False, True)
    assert again.run_id == first.run_id
    assert SupervisedRun.objects.filter(task_id=tid).count() == 1
    assert SupervisedRun.objects.get(task_id=tid).args == [1, 2]
    assert [m.task_id for m in published] == [tid]


def test_task_id_dedup_leaves_the_callers_transaction_usable(published: list[broker.Message]) -> None:
    from django.db import transaction

    tid = str(uuid.uuid4())
    add.apply_async((1,), task_id=tid)
    with transaction.atomic():
        again = add.apply_async((1,), task_id=tid)
        other = add.apply_async((2,))  # the transaction goes on after the conflict
    assert again.deduplicated and not other.deduplicated
    assert SupervisedRun.objects.count() == 2


# --------------------------------------------------------------------------- results and handles


def test_the_return_value_is_stored_and_get_returns_it(published: list[broker.Message]) -> None:
    result = add.delay(20, 22)
    assert result.state == "PENDING" and not result.ready()
    assert deliver_run(add, published[0]) == 42
    run = run_of(result)
    assert run.status == "succeeded" and run.result == 42
    assert result.state == result.status == "SUCCESS"
    assert result.ready() and result.successful() and not result.failed()
    assert result.get(timeout=1) == 42
    assert result.result == 42


def test_values_json_cannot_hold_are_not_stored_and_the_run_still_succeeds(
    published: list[broker.Message], settings: Any
) -> None:
    from supervisor_app.runs.results import decode_result, encode_result

    assert encode_result("t", object()) is None
    settings.SUPERVISOR_MAX_RESULT_BYTES = 10
    assert encode_result("t", "x" * 100) is None
    settings.SUPERVISOR_MAX_RESULT_BYTES = 1000
    import datetime

    when = datetime.datetime(2026, 12, 2, 8, 0, tzinfo=datetime.UTC)
    stored = encode_result("t", {"at": when})
    assert stored is not None
    import json

    assert decode_result(json.loads(stored)) == {"at": when}  # kombu's JSON: a datetime comes back one


def test_a_retryable_failure_reaches_celery_as_retry_and_the_handle_waits(published: list[broker.Message]) -> None:
    result = add_fail_once.delay(3, 4)
    with pytest.raises(Retry):  # not a failure: no result backend FAILURE, no errback, no chord part
        deliver_run(add_fail_once, published[0])
    assert result.state == "RETRY" and not result.ready()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.3, interval=0.05)
    run = run_of(result)
    SupervisedRun.objects.filter(pk=run.pk).update(next_check_at=timezone.now() - timedelta(seconds=1))  # due
    run_sweep("t")
    assert published[-1].attempt == 2 and published[-1].task_id == result.id
    assert deliver_run(add_fail_once, published[-1]) == 7
    assert result.get(timeout=1) == 7  # the value of the run, which succeeded on its second attempt


def test_a_final_failure_raises_run_failed_with_the_last_error(published: list[broker.Message]) -> None:
    result = flaky.delay(mode="fatal")
    with pytest.raises(Exception, match="bad input"):
        deliver_run(flaky, published[0])
    assert result.state == "FAILURE" and result.failed()
    with pytest.raises(RunFailed, match="bad input"):
        result.get(timeout=1)
    assert isinstance(result.get(timeout=1, propagate=False), RunFailed)


def test_a_handle_for_an_unknown_id_is_pending(published: list[broker.Message]) -> None:
    handle = add.AsyncResult(str(uuid.uuid4()))
    assert handle.state == "PENDING" and not handle.ready()
    with pytest.raises(TimeoutError):
        handle.get(timeout=0.2, interval=0.05)


# --------------------------------------------------------------------------- chains


def test_a_chain_runs_every_step_once_in_order(published: list[broker.Message]) -> None:
    result = chain(add.s(1, 2, label="a"), add.s(10, label="b"), add.s(100, label="c")).apply_async()
    assert isinstance(result, RunResult)
    assert len(published) == 1  # only the first step is recorded: the rest travel with it
    first = published[0]
    assert [s["kwargs"]["label"] for s in first.options["chain"]] == ["c", "b"]
    deliver_run(add, first)
    assert len(published) == 2
    second = published[1]
    assert second.args == [3, 10] and second.options["parent_id"] == first.task_id
    deliver_run(add, second)
    third = published[2]
    assert third.task_id == result.id  # the chain's handle is its last step's run
    assert result.state == "PENDING"
    deliver_run(add, third)
    assert result.get(timeout=1) == 113
    labels = list(Execution.objects.order_by("created_at", "id").values_list("label", flat=True))
    assert labels == ["a", "b", "c"]
    # Every step of the workflow shares its root.
    roots = {m.options.get("root_id") for m in published}
    assert len(roots) == 1 and None not in roots


def test_a_continuation_dispatched_again_after_a_crash_is_the_same_run(published: list[broker.Message]) -> None:
    chain(add.s(1, 2), add.s(10)).apply_async()
    deliver_run(add, published[0])
    first = SupervisedRun.objects.get(task_id=published[0].task_id)
    assert not first.follow_up
    # As if the flag's clearing were lost: a second follow-up (the sweep's) finds the step recorded.
    SupervisedRun.objects.filter(pk=first.pk).update(follow_up=True)
    assert runs.follow_up([first.pk]) == 1
    assert SupervisedRun.objects.filter(task_name=add.name).count() == 2
    assert len(published) == 2  # published once


def test_the_sweep_dispatches_what_the_agent_did_not(published: list[broker.Message], monkeypatch: Any) -> None:
    from supervisor_app.worker import execute

    monkeypatch.setattr(execute, "follow_up", lambda run_id, error=None: None)  # the agent dies right after its finish
    chain(add.s(1, 2), add.s(10)).apply_async()
    deliver_run(add, published[0])
    assert len(published) == 1
    report = run_sweep("t")
    assert report.extra.get("followed_up") == 1
    assert published[1].args == [3, 10]
    assert run_sweep("t").extra.get("followed_up") is None  # once


# --------------------------------------------------------------------------- link, link_error


def test_link_and_link_error_fire_once_each_and_only_for_a_final_outcome(published: list[broker.Message]) -> None:
    ok = add.apply_async((2, 3), link=add.s(100, label="linked"), link_error=failed_step.s(label="never"))
    deliver_run(add, published[0])
    callback = published[1]
    assert callback.task_name == add.name and callback.args == [5, 100]
    assert callback.options["parent_id"] == ok.id

    bad = add_fail_once.apply_async((1,), link_error=failed_step.s(label="err"))
    SupervisedRun.objects.filter(task_id=bad.id).update(max_attempts=1)
    with pytest.raises(ConnectionError):
        deliver_run(add_fail_once, published[2])  # its only attempt: a final failure
    errback = published[3]
    assert errback.task_name == failed_step.name and errback.args == [bad.id]
    assert len(published) == 4


def test_no_errback_for_an_attempt_that_will_be_retried(published: list[broker.Message]) -> None:
    add_fail_once.apply_async((1,), link_error=failed_step.s(label="err"))
    with pytest.raises(Retry):
        deliver_run(add_fail_once, published[0])
    assert [m.task_name for m in published] == [add_fail_once.name]
    assert runs.follow_up() == 0


def test_a_run_the_supervisor_buries_fires_its_errback(published: list[broker.Message], expire: Any) -> None:
    result = add.apply_async((1,), link_error=failed_step.s(label="err"))
    SupervisedRun.objects.filter(task_id=result.id).update(max_attempts=1)
    run = run_of(result)
    runs.claim(run.pk, 1, "w1")
    expire(run.pk)
    run_sweep("t")  # lost on its last attempt: dead
    assert SupervisedRun.objects.get(pk=run.pk).status == "dead"
    assert [m.task_name for m in published] == [add.name, failed_step.name]
    assert published[1].args == [result.id]
    with pytest.raises(RunFailed, match="lost"):
        result.get(timeout=1)


# --------------------------------------------------------------------------- groups and bad input


def test_a_group_of_supervised_tasks_records_each_member_with_its_frozen_id(published: list[broker.Message]) -> None:
    result = group(add.s(i, i) for i in range(3)).apply_async()
    ids = [r.id for r in result.results]
    assert [m.task_id for m in published] == ids
    assert {m.options["group_id"] for m in published} == {result.id}
    assert [m.options["group_index"] for m in published] == [0, 1, 2]
    for message in published:
        deliver_run(add, message)
    assert result.get(timeout=2) == [0, 2, 4]  # no result backend: each member's handle reads its run


def test_a_signature_that_is_not_json_is_refused_at_dispatch(published: list[broker.Message]) -> None:
    with pytest.raises(TypeError, match=r"callbacks .* must be JSON"):
        add.apply_async((1,), link=add.s(object()))
    assert SupervisedRun.objects.count() == 0


def test_a_chord_without_a_result_backend_fails_at_dispatch_as_in_celery(published: list[broker.Message]) -> None:
    from celery import chord

    with pytest.raises(NotImplementedError):
        chord([add.s(1, 1), add.s(2, 2)])(total.s())
    assert published == []


# --------------------------------------------------------------------------- admin


def test_the_admin_shows_a_runs_place_and_lists_every_step_of_its_workflow(
    published: list[broker.Message], admin_client: Any
) -> None:
    from django.urls import reverse

    final = chain(add.s(1, 2), add.s(10), add.s(100)).apply_async()
    for index in range(3):
        deliver_run(add, published[index])
    first, second, third = (SupervisedRun.objects.get(task_id=m.task_id) for m in published)
    page = admin_client.get(reverse("admin:supervisor_app_supervisedrun_change", args=[second.pk])).content.decode()
    # Its parent and root (the first step), its child (the third), with links, and the result it stored.
    first_url = reverse("admin:supervisor_app_supervisedrun_change", args=[first.pk])
    third_url = reverse("admin:supervisor_app_supervisedrun_change", args=[third.pk])
    assert page.count(f'href="{first_url}"') == 2 and f'href="{third_url}"' in page
    assert "every step of this workflow" in page and ">13<" in page.replace(" ", "")
    # The workflow view: the changelist filtered to the root's steps, each with its status.
    other = add.delay(5)  # not a step of it
    listing = admin_client.get(
        reverse("admin:supervisor_app_supervisedrun_changelist") + f"?workflow={first.task_id}"
    ).content.decode()
    for run in (first, second, third):
        assert f'href="{reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])}' in listing
    assert listing.count("succeeded") >= 3
    assert f"/{other.run_id}/change/" not in listing
    assert final.id == third.task_id


def test_a_handle_taken_before_the_upgrade_still_finds_its_run(published: list[broker.Message]) -> None:
    result = add.delay(2, 2)
    run = run_of(result)
    deliver_run(add, published[0])
    # Rows recorded before migration 0014 kept no id until claimed, and handles read "<run>.<attempt>".
    SupervisedRun.objects.filter(pk=run.pk).update(task_id="")
    for legacy in (f"{run.pk}.1", f"{run.pk}.2.0a1b2c3d4e5f"):
        assert add.AsyncResult(legacy).get(timeout=1) == 4
    assert add.AsyncResult(f"{run.pk + 1000}.1").state == "PENDING"


def test_revoking_a_handle_cancels_its_run(published: list[broker.Message], monkeypatch: Any) -> None:
    from celery import current_app

    broadcasts: list[Any] = []
    monkeypatch.setattr(current_app.control, "revoke", lambda *a, **k: broadcasts.append(a))
    result = add.delay(1, 1)
    result.revoke()
    assert run_of(result).status == "cancelled" and result.state == "REVOKED"
    # Not Celery's revoke: workers would drop every later attempt of the run, all under this id.
    assert broadcasts == []
    with pytest.raises(Exception, match="cancelled"):
        result.get(timeout=1)


def test_a_continuation_that_can_never_be_dispatched_is_given_up_with_a_reason(
    published: list[broker.Message],
) -> None:
    result = chain(add.s(1, 2), add.s(10)).apply_async()
    first = SupervisedRun.objects.get(task_id=published[0].task_id)
    # A kept signature that is not one (a row edited by hand, a bug of an older version).
    broken = {"task": add.name, "args": [], "kwargs": "not a mapping", "options": {}, "subtask_type": None}
    SupervisedRun.objects.filter(pk=first.pk).update(options={**first.options, "chain": [broken]})
    deliver_run(add, published[0])
    first.refresh_from_db()
    assert first.status == "succeeded" and not first.follow_up
    assert first.last_error.startswith("workflow continuation not dispatched:")
    assert runs.follow_up() == 0 and len(published) == 1  # not tried again at every sweep
    assert result.state == "PENDING"
