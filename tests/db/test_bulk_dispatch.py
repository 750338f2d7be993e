"""Bulk dispatch (``SupervisedTask.dispatch_many``): many runs in one multi-row statement, published
after commit through one producer, each as ``apply_async`` would record it; and ``.delay()`` inside a
caller's transaction adds no commit, no savepoint and no publish before that commit."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from project.tasks import noop, slow_job
from supervisor_app import broker
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.tasks import SupervisedTask

pytestmark = pytest.mark.django_db(transaction=False)


def inserts(ctx: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries if q["sql"].lstrip().upper().startswith("INSERT")]


def test_many_runs_are_recorded_in_one_statement_and_published_after_commit_through_one_publisher(
    sent: list[Any], django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor_app.runs import publishing

    publishers: list[Any] = []
    real_init = publishing.RunPublisher.__init__

    def init(self: Any) -> None:
        publishers.append(self)
        real_init(self)

    monkeypatch.setattr(publishing.RunPublisher, "__init__", init)
    calls = [([i], {"step_seconds": 0.0, "label": f"n{i}"}) for i in range(300)]
    with django_capture_on_commit_callbacks(execute=False) as callbacks, CaptureQueriesContext(connection) as ctx:
        handles = slow_job.dispatch_many(calls)
        assert sent == []  # nothing before the commit
    if connection.vendor == "postgresql":
        assert len(inserts(ctx)) == 1, inserts(ctx)
    else:  # a multi-row VALUES per parameter-limit's worth of rows
        assert len(inserts(ctx)) < 300 / 10
    assert len(callbacks) == 1
    callbacks[0]()
    assert len(publishers) == 1 and publishers[0].sent == 300
    ids = [h.run_id for h in handles]
    by_pk = dict(SupervisedRun.objects.filter(pk__in=ids).values_list("pk", "task_id"))
    assert [h.id for h in handles] == [by_pk[pk] for pk in ids] and not any(h.deduplicated for h in handles)
    assert len(set(by_pk.values())) == len(ids)  # one UUID per run
    assert [run_id for run_id, attempt, _ in sent] == ids and {a for _, a, _ in sent} == {1}
    rows = {r.pk: r for r in SupervisedRun.objects.filter(pk__in=ids)}
    assert [rows[pk].args for pk in ids] == [[i] for i in range(300)]
    assert rows[ids[7]].kwargs == {"step_seconds": 0.0, "label": "n7"}


def test_each_run_is_the_one_apply_async_records(sent: list[Any], django_capture_on_commit_callbacks: Any) -> None:
    """Every column but the id, the arguments and the times is what ``apply_async`` writes."""
    options = {"queue": "bulk-q", "priority": 4, "headers": {"tenant": "acme"}, "expires": 3600}
    with django_capture_on_commit_callbacks(execute=True):
        single = slow_job.apply_async([1], {"label": "x"}, **options)
        [bulk] = slow_job.dispatch_many([([1], {"label": "x"})], **options)
    a, b = (SupervisedRun.objects.get(pk=h.run_id) for h in (single, bulk))
    skip = {"id", "created_at", "next_check_at", "options", "task_id"}
    fields = [f.attname for f in SupervisedRun._meta.concrete_fields if f.attname not in skip]
    assert {f: getattr(b, f) for f in fields} == {f: getattr(a, f) for f in fields}
    assert {k: v for k, v in b.options.items() if k != "expires"} == {
        k: v for k, v in a.options.items() if k != "expires"
    }
    assert b.options["expires"] >= a.options["expires"]  # absolute, counted from each dispatch
    assert abs((b.next_check_at - a.next_check_at).total_seconds()) < 5
    assert b.status == RunStatus.QUEUED and b.publish_count == 1


def test_a_countdown_records_the_runs_waiting_and_publishes_nothing(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        handles = noop.dispatch_many([((), {})] * 3, countdown=600)
    runs = SupervisedRun.objects.filter(pk__in=[h.run_id for h in handles])
    assert sent == [] and runs.count() == 3
    assert set(runs.values_list("publish_count", flat=True)) == {0}
    for run in runs:
        assert 590 < (run.next_check_at - run.created_at).total_seconds() < 610


def test_a_call_that_is_not_json_refuses_the_whole_batch_and_names_the_call(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    before = SupervisedRun.objects.count()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(TypeError, match=r"call 2 of dispatch_many"):
        slow_job.dispatch_many([([1], {}), ([2], {}), ([object()], {}), ([4], {})])
    with pytest.raises(TypeError, match=r"call 1 of dispatch_many must be an \(args, kwargs\) pair"):
        slow_job.dispatch_many([([1], {}), [1, 2, 3]])
    with pytest.raises(TypeError, match=r"call 0 of dispatch_many: args must be a list"):
        slow_job.dispatch_many([("abc", {})])
    assert SupervisedRun.objects.count() == before and sent == []


def test_arguments_over_the_size_limit_are_refused(settings: Any, sent: list[Any]) -> None:
    settings.SUPERVISOR_MAX_ARGS_BYTES = 100
    with pytest.raises(ValueError, match=r"call 1 of dispatch_many.*SUPERVISOR_MAX_ARGS_BYTES"):
        slow_job.dispatch_many([([1], {}), (["x" * 200], {})])


def test_unique_calls_share_a_run_as_with_apply_async(sent: list[Any], django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        held = noop.apply_async(unique_key="bulk-held")
        handles = noop.dispatch_many([((), {})] * 3, unique_key="bulk-held")
        fresh = noop.dispatch_many([((), {})] * 2, unique_key="bulk-new")
    assert [h.run_id for h in handles] == [held.run_id] * 3 and all(h.deduplicated for h in handles)
    assert fresh[0].deduplicated is False and fresh[1].deduplicated is True
    assert fresh[1].run_id == fresh[0].run_id
    # Published: the first held run and the one new run, nothing for the deduplicated calls.
    assert sorted(r for r, _, _ in sent) == sorted([held.run_id, fresh[0].run_id])


def test_unique_by_arguments_dedupes_within_and_across_batches(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    from celery import current_app

    @current_app.task(name="tests.bulk.per_customer", base=SupervisedTask, bind=True, unique_by=("customer",))
    def per_customer(self: Any, customer: int, note: str = "") -> None:
        return None

    assert per_customer.name == "tests.bulk.per_customer"
    try:
        with django_capture_on_commit_callbacks(execute=True):
            handles = per_customer.dispatch_many([([1], {}), ([2], {}), ([1], {"note": "again"})])
        assert handles[2].run_id == handles[0].run_id and handles[2].deduplicated
        assert handles[1].run_id != handles[0].run_id and len(sent) == 2
    finally:
        current_app.tasks.pop("tests.bulk.per_customer", None)


def test_a_rolled_back_transaction_records_and_publishes_nothing(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    before = SupervisedRun.objects.count()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            noop.dispatch_many([((), {})] * 5)
            raise RuntimeError("the caller changed its mind")
    assert SupervisedRun.objects.count() == before and sent == []


def test_callbacks_are_refused_and_an_eta_waits_in_the_database(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    from datetime import datetime, timedelta, timezone

    with pytest.raises(NotImplementedError, match="link"):
        noop.dispatch_many([((), {})], link=noop.s())
    with django_capture_on_commit_callbacks(execute=True):
        handles = noop.dispatch_many([((), {})] * 2, eta=datetime.now(timezone.utc) + timedelta(minutes=10))
    waiting = SupervisedRun.objects.filter(pk__in=[h.run_id for h in handles])
    assert sent == [] and set(waiting.values_list("publish_count", flat=True)) == {0}
    for run in waiting:
        assert 590 < (run.next_check_at - run.created_at).total_seconds() < 610


def test_the_messages_carry_the_shared_options(django_capture_on_commit_callbacks: Any, monkeypatch: Any) -> None:
    messages: list[broker.Message] = []
    monkeypatch.setattr(broker, "send", lambda message, producer=None: messages.append(message))
    with django_capture_on_commit_callbacks(execute=True):
        noop.dispatch_many([((), {})] * 2, queue="bulk-q", headers={"tenant": "acme"}, expires=60)
    assert len(messages) == 2 and messages[0].options == messages[1].options
    sent_options = broker.send_options(messages[1])
    assert sent_options["queue"] == "bulk-q" and sent_options["headers"]["tenant"] == "acme"
    assert sent_options["headers"][broker.HEADER_RUN] == messages[1].run_id


@pytest.mark.django_db(transaction=True)
def test_delay_inside_the_callers_transaction_is_one_insert_no_commit_no_savepoint(
    sent: list[Any], fast_settings: Any
) -> None:
    """The caller's ``transaction.atomic()`` holds the dispatch: one INSERT, no SAVEPOINT, no COMMIT
    of its own, and the message leaves only after the caller's commit."""
    with CaptureQueriesContext(connection) as ctx:
        with transaction.atomic():
            result = noop.delay()
            inside = [q["sql"] for q in ctx.captured_queries]
            published_inside = list(sent)
        after = [q["sql"] for q in ctx.captured_queries][len(inside) :]
    assert published_inside == []
    # The caller's BEGIN, then our one statement: no SAVEPOINT, no COMMIT of our own.
    statements = [s for s in inside if not s.strip().upper().startswith("BEGIN")]
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("INSERT"), inside
    # Then the caller's COMMIT, and nothing else: the publish reads nothing back.
    assert [s.strip().upper() for s in after] == ["COMMIT"], after
    assert sent == [(result.run_id, 1, noop.name)]


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch, sent: list[Any]) -> list[list[int]]:
    """The run ids each ``publish_many`` call after a commit was given, in order (publishes are
    captured by ``sent``, nothing reaches a broker)."""
    from supervisor_app.runs import publishing

    calls: list[list[int]] = []
    real = publishing.RunPublisher.publish_many

    def publish_many(self: Any, messages: Any) -> int:
        calls.append([m.run_id for m in messages])
        return real(self, messages)

    monkeypatch.setattr(publishing.RunPublisher, "publish_many", publish_many)
    return calls


@pytest.mark.django_db(transaction=True)
def test_a_group_in_the_callers_transaction_is_one_statement_a_member_and_one_publish_after_commit(
    sent: list[Any], batches: list[list[int]], fast_settings: Any
) -> None:
    """A group's members carry frozen ids: each is one INSERT … ON CONFLICT (no savepoint), and
    the messages of the whole group leave together after the caller's commit."""
    from celery import group

    from project.tasks import add

    with CaptureQueriesContext(connection) as ctx:
        with transaction.atomic():
            result = group(add.s(i, i) for i in range(40)).delay()
            assert sent == [] and batches == []
    statements = [q["sql"].lstrip().upper() for q in ctx.captured_queries]
    assert not [s for s in statements if s.startswith(("SAVEPOINT", "RELEASE"))], statements[:5]
    assert len([s for s in statements if s.startswith("INSERT")]) == 40
    # The group's handles are its frozen ids: each names the run recorded for its member.
    by_task_id = dict(SupervisedRun.objects.values_list("task_id", "pk"))
    ids = [by_task_id[r.id] for r in result.results]
    assert len(set(ids)) == 40 and SupervisedRun.objects.count() == 40
    assert batches == [ids] and [run_id for run_id, _, _ in sent] == ids


@pytest.mark.django_db(transaction=True)
def test_dispatches_in_one_transaction_are_published_together_and_a_rolled_back_savepoint_takes_its_own(
    sent: list[Any], batches: list[list[int]], fast_settings: Any
) -> None:
    with transaction.atomic():
        a, b = noop.delay().run_id, noop.delay().run_id
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint, rolled back
            noop.delay()
            raise RuntimeError("rolled back")
        c = noop.delay().run_id
        with transaction.atomic():  # a savepoint, released
            d, e = noop.delay().run_id, noop.delay().run_id
        f = noop.delay().run_id
    assert SupervisedRun.objects.count() == 6  # (SQLite may give the rolled-back run's id to the next)
    # One batch per stretch of dispatches at one savepoint level; the rolled-back one is gone.
    assert batches == [[a, b, c], [d, e], [f]]
    assert [run_id for run_id, _, _ in sent] == [a, b, c, d, e, f]


@pytest.mark.django_db(transaction=True)
def test_a_callback_of_the_caller_between_dispatches_keeps_its_place_and_a_rollback_publishes_nothing(
    sent: list[Any], batches: list[list[int]], fast_settings: Any
) -> None:
    order: list[Any] = []
    with transaction.atomic():
        a = noop.delay().run_id
        transaction.on_commit(lambda: order.append(("caller", list(sent))))
        b = noop.delay().run_id
    # The caller's callback ran after a's batch and before b's.
    assert order == [("caller", [(a, 1, noop.name)])] and batches == [[a], [b]]
    with pytest.raises(RuntimeError), transaction.atomic():
        noop.delay()
        noop.delay()
        raise RuntimeError("rolled back")
    assert len(batches) == 2 and len(sent) == 2
    with transaction.atomic():  # the next transaction starts a batch of its own
        g = noop.delay().run_id
    assert batches[-1] == [g] and sent[-1] == (g, 1, noop.name)


def test_insert_row_writes_what_the_orm_s_create_writes(sent: list[Any]) -> None:
    """``db.insert_row`` (a dispatch's one INSERT, without the ORM's compiler) against ``create()``:
    the same values, field for field, defaults, expressions and JSON included."""
    from datetime import timedelta

    from django.db.models.functions import Now

    from supervisor_app.db import after, insert_row

    values: dict[str, Any] = dict(
        task_name="project.tasks.noop",
        args=[1, "two", {"three": [3.0, None]}],
        kwargs={"k": "ü", "n": None},
        options={"queue": "q", "headers": {"h": 1}},
        status=RunStatus.QUEUED,
        next_check_at=after(timedelta(seconds=30)),
        scheduled_for=None,
        lease_timeout=timedelta(seconds=7),
        start_timeout=timedelta(seconds=60),
        max_runtime=None,
        max_attempts=5,
    )
    pk = insert_row(SupervisedRun, {**values, "task_id": "row-1", "finished_at": Now()}, "default")
    orm = SupervisedRun.objects.create(**{**values, "task_id": "row-2", "finished_at": Now()})
    ours, theirs = SupervisedRun.objects.get(pk=pk), SupervisedRun.objects.get(pk=orm.pk)
    skip = {"id", "task_id", "created_at", "next_check_at", "finished_at"}
    fields = [f.attname for f in SupervisedRun._meta.concrete_fields if f.attname not in skip]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert ours.args == [1, "two", {"three": [3.0, None]}] and ours.lease_timeout == timedelta(seconds=7)
    assert ours.created_at is not None and abs(ours.created_at - theirs.created_at) < timedelta(seconds=5)
    assert ours.next_check_at is not None and theirs.next_check_at is not None
    assert abs(ours.next_check_at - theirs.next_check_at) < timedelta(seconds=5)
    assert ours.finished_at is not None and abs(ours.finished_at - ours.created_at) < timedelta(seconds=5)
    # A conflict clause that holds: nothing written, None returned.
    assert insert_row(SupervisedRun, {**values, "task_id": "row-1"}, "default", "ON CONFLICT DO NOTHING") is None
    assert SupervisedRun.objects.filter(task_id="row-1").count() == 1
