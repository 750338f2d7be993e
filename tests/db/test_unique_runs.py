"""Unique runs (issue 16 item 1): ``unique_by`` on the task, ``unique_key`` per call, ``unique_for``.

PostgreSQL in `make test`, SQLite too; publishes captured by ``sent``. The concurrency test starts
real dispatching processes (``tests/db/unique_dispatcher.py``) against PostgreSQL and against a SQLite
file of its own.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from supervisor_app import runs
from supervisor_app.core import unique as keys
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun
from supervisor_app.runs import unique
from tests.db.unique_tasks import hourly, plain, send_report, sync

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def dispatch(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Callable[..., Any]:
    """``dispatch(task, *args, **kwargs)``: ``delay`` and the publishes after commit; the result."""

    def _dispatch(task: Any, *args: Any, **kwargs: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            return task.delay(*args, **kwargs)

    return _dispatch


@pytest.fixture
def apply(sent: list[Any], django_capture_on_commit_callbacks: Any) -> Callable[..., Any]:
    def _apply(task: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            return task.apply_async(args, kwargs, **options)

    return _apply


def end(run_id: int, status: str = RunStatus.SUCCEEDED) -> None:
    SupervisedRun.objects.filter(pk=run_id).update(status=status, finished_at=Now(), next_check_at=None)


def count(task: Any) -> int:
    return SupervisedRun.objects.filter(task_name=task.name).count()


# --------------------------------------------------------------------------- unique_by


def test_unique_by_a_name_positional_or_keyword_or_default_gives_one_run(
    dispatch: Callable[..., Any], apply: Callable[..., Any], sent: list[Any]
) -> None:
    first = dispatch(send_report, 7)
    again = [
        dispatch(send_report, customer=7),
        dispatch(send_report, 7, "daily"),
        dispatch(send_report, 7, kind="weekly"),  # not part of the key
        apply(send_report, [], {"kind": "daily", "customer": 7}),
    ]
    assert first.deduplicated is False
    assert {r.run_id for r in again} == {first.run_id}
    assert all(r.deduplicated for r in again)
    recorded = SupervisedRun.objects.get(pk=first.run_id).task_id
    assert {r.id for r in again} == {first.id} == {recorded}  # the same result handle
    assert count(send_report) == 1 and len(sent) == 1  # recorded once, published once
    run = SupervisedRun.objects.get(pk=first.run_id)
    assert run.unique_key is not None and run.unique_key.startswith(keys.HASHED) and run.unique_until is None
    other = dispatch(send_report, 8)
    assert other.run_id != first.run_id and not other.deduplicated
    assert count(send_report) == 2 and len(sent) == 2


def test_unique_by_args_takes_every_argument_by_name(dispatch: Callable[..., Any]) -> None:
    first = dispatch(sync, "crm")
    assert dispatch(sync, source="crm").run_id == first.run_id
    assert dispatch(sync, "crm", full=False).run_id == first.run_id  # a default, given or not
    assert dispatch(sync, "crm", full=True).run_id != first.run_id
    assert dispatch(sync, "erp").run_id != first.run_id
    extra = dispatch(sync, "crm", b=2, a=1)
    assert dispatch(sync, "crm", a=1, b=2).run_id == extra.run_id  # keyword order does not matter
    assert count(sync) == 4


def test_a_unique_key_per_call(apply: Callable[..., Any], dispatch: Callable[..., Any]) -> None:
    first = apply(plain, (1,), unique_key="nightly-import")
    assert apply(plain, (2,), unique_key="nightly-import").run_id == first.run_id  # the key, not the args
    assert apply(plain, (1,), unique_key="other").run_id != first.run_id
    # Without a key a task with no unique_by records every dispatch.
    assert dispatch(plain, 1).run_id != dispatch(plain, 1).run_id
    # A call's key replaces the task's unique_by.
    by_args = dispatch(send_report, 7)
    keyed = apply(send_report, (7,), unique_key="report-7")
    assert keyed.run_id != by_args.run_id
    assert apply(send_report, (9,), unique_key="report-7").run_id == keyed.run_id
    assert SupervisedRun.objects.get(pk=keyed.run_id).unique_key == "report-7"  # short keys kept as given


def test_every_active_status_holds_the_key_and_a_new_run_is_recorded_once_it_ends(
    dispatch: Callable[..., Any], sent: list[Any]
) -> None:
    first = dispatch(send_report, 7)
    for status in (RunStatus.RUNNING, RunStatus.RETRYING, RunStatus.QUEUED):
        SupervisedRun.objects.filter(pk=first.run_id).update(status=status)
        assert dispatch(send_report, 7).run_id == first.run_id
    end(first.run_id, RunStatus.FAILED)
    second = dispatch(send_report, 7)
    assert second.run_id != first.run_id and not second.deduplicated
    assert len(sent) == 2
    # The claim and finish of the agent release the key the same way.
    assert runs.claim(second.run_id, 1, "w@test") is not None
    assert dispatch(send_report, 7).run_id == second.run_id
    runs.finish_success(second.run_id, 1)
    third = dispatch(send_report, 7)
    assert third.run_id not in (first.run_id, second.run_id)
    assert count(send_report) == 3


def test_a_dispatch_with_countdown_holds_the_key_while_it_waits(apply: Callable[..., Any], sent: list[Any]) -> None:
    first = apply(send_report, (7,), countdown=60)
    assert apply(send_report, (7,)).run_id == first.run_id
    assert sent == []  # the countdown run is published by the supervisor when due


def test_twice_in_one_transaction_is_one_run_published_after_commit(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            a = send_report.delay(7)
            b = send_report.delay(customer=7)
            assert sent == []
    assert a.run_id == b.run_id and len(sent) == 1


# --------------------------------------------------------------------------- unique_for


def test_unique_for_dedupes_within_the_window_whatever_the_status(
    dispatch: Callable[..., Any], apply: Callable[..., Any], expire: Callable[..., None]
) -> None:
    first = dispatch(hourly, 1)
    run = SupervisedRun.objects.get(pk=first.run_id)
    assert run.unique_until is not None and 3590 < (run.unique_until - run.created_at).total_seconds() < 3610
    end(first.run_id)
    late = dispatch(hourly, 1)  # finished, but inside its hour
    assert late.run_id == first.run_id and late.deduplicated
    assert dispatch(hourly, 2).run_id != first.run_id

    expire(first.run_id, "unique_until", 2 * 3600)  # the hour is over
    second = dispatch(hourly, 1)
    assert second.run_id != first.run_id and not second.deduplicated
    assert SupervisedRun.objects.get(pk=first.run_id).unique_until is None  # the key released

    # A window that is over does not end an active run's hold on the key.
    expire(second.run_id, "unique_until", 2 * 3600)
    assert dispatch(hourly, 1).run_id == second.run_id
    # Per call, on any task: unique_for= (seconds) with a key.
    windowed = apply(plain, (1,), unique_key="daily-digest", unique_for=60)
    end(windowed.run_id, RunStatus.CANCELLED)
    assert apply(plain, (1,), unique_key="daily-digest").run_id == windowed.run_id


def test_without_a_window_an_ended_run_does_not_hold_its_key(dispatch: Callable[..., Any]) -> None:
    first = dispatch(send_report, 7)
    end(first.run_id)
    assert SupervisedRun.objects.filter(pk=first.run_id, unique_until__isnull=True).exists()
    assert dispatch(send_report, 7).run_id != first.run_id


# --------------------------------------------------------------------------- keys and errors


def test_keys_are_bounded_and_given_keys_never_equal_derived_ones(apply: Callable[..., Any]) -> None:
    long = apply(plain, (), unique_key="x" * 500)
    stored = SupervisedRun.objects.get(pk=long.run_id).unique_key
    assert stored is not None and len(stored) <= keys.MAX_KEY_LENGTH and stored.startswith(keys.HASHED)
    assert apply(plain, (), unique_key="x" * 500).run_id == long.run_id
    derived = send_report.unique_key_for([7])
    assert derived is not None
    mimic = apply(send_report, (7,), unique_key=derived)  # a given key that looks like a hash is hashed
    assert SupervisedRun.objects.get(pk=mimic.run_id).unique_key != derived


def test_a_key_that_cannot_be_computed_refuses_the_dispatch_and_records_nothing(
    apply: Callable[..., Any], sent: list[Any]
) -> None:
    with pytest.raises(keys.UniqueKeyError, match="does not fit"):
        apply(send_report, (), {"client": 7})
    with pytest.raises(keys.UniqueKeyError, match="JSON"):
        apply(send_report, ({1, 2},))
    with pytest.raises(keys.UniqueKeyError, match="non-empty string"):
        apply(plain, (), unique_key="")

    class Wrong(send_report.__class__):  # type: ignore[misc,name-defined]
        unique_by = ("client",)

    with pytest.raises(keys.UniqueKeyError, match=r"names \['client'\]"):
        Wrong().apply_async((7,))
    assert count(send_report) == 0 and count(plain) == 0 and sent == []


def test_the_database_refuses_a_second_run_holding_a_key() -> None:
    def row(**values: Any) -> SupervisedRun:
        fields = dict(
            task_name="t", unique_key="k", lease_timeout=timedelta(seconds=60), start_timeout=timedelta(seconds=60)
        )
        return SupervisedRun.objects.create(**{**fields, **values})

    row()
    with pytest.raises(IntegrityError), transaction.atomic():
        row(status=RunStatus.RETRYING)
    # Not holding the key: ended (no window), no key, another task.
    row(status=RunStatus.SUCCEEDED)
    row(unique_key=None)
    row(task_name="u")
    # An ended run with a window holds it.
    SupervisedRun.objects.filter(task_name="t", status=RunStatus.QUEUED).update(status=RunStatus.DEAD)
    row(status=RunStatus.CANCELLED, unique_until=timezone.now())
    with pytest.raises(IntegrityError), transaction.atomic():
        row()


def test_retry_now_is_refused_while_another_run_holds_the_key(dispatch: Callable[..., Any]) -> None:
    first = dispatch(send_report, 7)
    end(first.run_id, RunStatus.FAILED)
    second = dispatch(send_report, 7)
    assert runs.retry_now(first.run_id) is False
    assert SupervisedRun.objects.get(pk=first.run_id).status == RunStatus.FAILED
    end(second.run_id)
    assert runs.retry_now(first.run_id) is True  # the key is free again: reopened, holding it
    assert dispatch(send_report, 7).run_id == first.run_id


# --------------------------------------------------------------------------- races in one process


def test_the_holder_ending_between_the_conflict_and_the_read_records_a_new_run(
    dispatch: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = dispatch(send_report, 7)
    real = unique._insert
    calls: list[int | None] = []

    def insert_then_the_holder_ends(fields: dict[str, Any], using: str) -> int | None:
        pk = real(fields, using)
        calls.append(pk)
        if pk is None and len(calls) == 1:
            end(first.run_id)  # the holder finishes right after our insert conflicted with it
        return pk

    monkeypatch.setattr(unique, "_insert", insert_then_the_holder_ends)
    second = dispatch(send_report, 7)
    assert calls[0] is None and calls[1] == second.run_id  # the read found nobody: inserted again
    assert second.run_id != first.run_id and not second.deduplicated


def test_a_key_that_keeps_changing_hands_gives_up_after_a_bounded_number_of_rounds(
    dispatch: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def always_conflicts(fields: dict[str, Any], using: str) -> None:
        calls.append(1)
        return None  # and the read finds no holder: every round lost

    monkeypatch.setattr(unique, "_insert", always_conflicts)
    with pytest.raises(unique.UniqueKeyContended, match="changed hands"):
        dispatch(send_report, 7)
    assert len(calls) == unique.ROUNDS and count(send_report) == 0


# --------------------------------------------------------------------------- many processes

PROCESSES = 6
KEYS = 40


def _race(env: dict[str, str]) -> list[list[list[Any]]]:
    """PROCESSES dispatchers, each dispatching customers 0…KEYS-1, started together once all are ready."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.db.unique_dispatcher", str(KEYS)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=5)[1]
        for proc in procs:  # go: every process is connected and waiting on this line
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def _check_one_run_per_key(outputs: list[list[list[Any]]], rows: list[tuple[int, str]]) -> None:
    by_key: dict[int, set[int]] = {}
    recorded: dict[int, int] = {}
    for output in outputs:
        assert [c for c, _, _ in output] == list(range(KEYS))
        for customer, run_id, deduplicated in output:
            by_key.setdefault(customer, set()).add(run_id)
            recorded[customer] = recorded.get(customer, 0) + (not deduplicated)
    assert all(len(ids) == 1 for ids in by_key.values())  # every process got the same run per key
    assert set(recorded.values()) == {1}  # and exactly one of them recorded it
    assert len(rows) == KEYS and len({key for _, key in rows}) == KEYS  # one row per key in the database
    assert {pk for pk, _ in rows} == {ids.pop() for ids in by_key.values()}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    return {**env, "CELERY_BROKER_URL": "memory://", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_dispatchers_in_many_processes_get_one_run_per_key_postgresql() -> None:
    base, _, _ = os.environ["DATABASE_URL"].rpartition("/")
    outputs = _race(_child_env(DATABASE_URL=f"{base}/{connection.settings_dict['NAME']}"))
    rows = list(SupervisedRun.objects.filter(task_name=send_report.name).values_list("pk", "unique_key"))
    _check_one_run_per_key(outputs, rows)


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A migrated SQLite database of its own (the test database may be in memory): its environment."""
    env = _child_env(DEMO_VAR_DIR=str(tmp_path))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, capture_output=True)
    yield env


def test_dispatchers_in_many_processes_get_one_run_per_key_sqlite(sqlite_file: dict[str, str]) -> None:
    outputs = _race(sqlite_file)
    with sqlite3.connect(Path(sqlite_file["DEMO_VAR_DIR"]) / "demo.sqlite3") as db:
        rows = db.execute(
            "SELECT id, unique_key FROM supervisor_app_supervisedrun WHERE task_name = ?", [send_report.name]
        ).fetchall()
    _check_one_run_per_key(outputs, rows)


# --------------------------------------------------------------------------- admin


def test_the_admin_shows_a_runs_unique_key_and_finds_runs_by_it(
    admin_client: Any, apply: Callable[..., Any], dispatch: Callable[..., Any]
) -> None:
    from django.urls import reverse

    keyed = apply(plain, (1,), unique_key="nightly-import")
    windowed = dispatch(hourly, 3)
    page = admin_client.get(reverse("admin:supervisor_app_supervisedrun_change", args=[keyed.run_id]))
    assert "nightly-import" in page.content.decode() and "held while the run is active" in page.content.decode()
    page = admin_client.get(reverse("admin:supervisor_app_supervisedrun_change", args=[windowed.run_id]))
    key = SupervisedRun.objects.get(pk=windowed.run_id).unique_key
    assert key is not None and key in page.content.decode() and "and until" in page.content.decode()
    found = admin_client.get(reverse("admin:supervisor_app_supervisedrun_changelist"), {"q": "nightly-import"})
    assert [r.pk for r in found.context["cl"].result_list] == [keyed.run_id]
