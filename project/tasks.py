"""Demo and test tasks. A user's project writes tasks exactly like these."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import shared_task

from supervisor_app import NonRetryable, SupervisedTask

from .models import Execution


def _record(task: Any, label: str) -> None:
    Execution.objects.create(
        run_id=task.run_id,
        attempt=task.attempt,
        label=label,
        worker=str(task.request.hostname or ""),
        pid=os.getpid(),
    )


@shared_task(base=SupervisedTask, bind=True)
def noop(self: SupervisedTask) -> None:
    return None


@shared_task(base=SupervisedTask, bind=True)
def slow_job(self: SupervisedTask, steps: int = 5, step_seconds: float = 1.0, label: str = "") -> int:
    """A batch of ``steps`` chunks; resumes from the last checkpoint of a lost attempt."""
    start = int(self.checkpoint or 0)
    for step in range(start, steps):
        time.sleep(step_seconds)
        # Saves the checkpoint with the lease; raises LeaseLost in a zombie before it writes anything.
        self.heartbeat(progress={"step": step + 1, "of": steps, "pid": os.getpid()}, checkpoint=step + 1)
    self.heartbeat()
    _record(self, label)
    return steps


@shared_task(base=SupervisedTask, bind=True)
def quiet_job(self: SupervisedTask, seconds: float = 5.0, label: str = "") -> None:
    """Long body that never calls heartbeat(): the lease is kept by the worker's lease keeper."""
    time.sleep(seconds)
    _record(self, label)


@shared_task(base=SupervisedTask, bind=True, backoff=0.2, backoff_max=1.0, backoff_jitter=False)
def flaky(self: SupervisedTask, mode: str = "retryable", label: str = "") -> None:
    _record(self, label)
    if mode == "retryable":
        raise ValueError("temporary trouble")
    if mode == "fatal":
        raise NonRetryable("bad input, retrying will not help")
    if mode == "fail_once" and (self.attempt or 1) < 2:
        raise ConnectionError("first attempt fails")


@shared_task(base=SupervisedTask, bind=True)
def effect_job(self: SupervisedTask, steps: int = 3, step_seconds: float = 0.1, label: str = "") -> int:
    """slow_job whose side effect goes through the idempotency helper: written once per run."""
    start = int(self.checkpoint or 0)
    for step in range(start, steps):
        time.sleep(step_seconds)
        self.heartbeat(progress={"step": step + 1, "of": steps, "pid": os.getpid()}, checkpoint=step + 1)
    with self.effect("record") as first:
        if first:
            _record(self, label)
    return steps


def connection_facts() -> dict[str, Any]:
    """How this process talks to the database, as Django set it up: driver, binding, pool, prepared
    statements on the current server session (what tests/integration/test_drivers.py checks)."""
    from django.db import connection

    connection.ensure_connection()
    facts: dict[str, Any] = {
        "driver": getattr(connection, "Database").__name__,  # noqa: B009 (not in the stubs)
        "conn_max_age": connection.settings_dict["CONN_MAX_AGE"],
        "pool": getattr(connection, "pool", None) is not None,
        # psycopg 3: Django's Cursor binds parameters client-side, ServerBindingCursor server-side.
        "cursor": getattr(getattr(connection.connection, "cursor_factory", None), "__name__", None),
    }
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        facts["prepared"] = cursor.fetchone()[0]
    return facts


@shared_task(base=SupervisedTask, bind=True)
def driver_job(self: SupervisedTask, steps: int = 3, step_seconds: float = 0.05, label: str = "") -> int:
    """effect_job that also reports, at each heartbeat, how its worker talks to PostgreSQL."""
    start = int(self.checkpoint or 0)
    for step in range(start, steps):
        time.sleep(step_seconds)
        progress = {"step": step + 1, "of": steps, "pid": os.getpid(), **connection_facts()}
        self.heartbeat(progress=progress, checkpoint=step + 1)
    with self.effect("record") as first:
        if first:
            _record(self, label)
    return steps


@shared_task(base=SupervisedTask, bind=True, max_attempts=2, backoff=0.1, backoff_jitter=False)
def bad_heartbeat(self: SupervisedTask, label: str = "") -> None:
    """Raises inside its own heartbeat: the checkpoint is not JSON (a bug in the task)."""
    _record(self, label)
    self.heartbeat(checkpoint={"when": object()})


@shared_task
def plain_noop() -> None:
    """A plain Celery task, the benchmarks' baseline."""
    return None


def _record_plain(label: str) -> None:
    Execution.objects.create(label=label, pid=os.getpid())


@shared_task
def plain_sleep(seconds: float, label: str) -> None:
    """Plain Celery baseline for the crash benchmarks: Celery's defaults (ack before execution)."""
    time.sleep(seconds)
    _record_plain(label)


@shared_task(acks_late=True, reject_on_worker_lost=True)
def plain_sleep_late(seconds: float, label: str) -> None:
    """Plain Celery baseline with the usual hardening: ack after execution, requeue on a lost worker."""
    time.sleep(seconds)
    _record_plain(label)


@shared_task(base=SupervisedTask, bind=True, concurrency_limit=2)
def limited_job(self: SupervisedTask, seconds: float = 0.5, label: str = "") -> None:
    """At most two run at once across every worker (``concurrency_limit``); the others wait."""
    time.sleep(seconds)
    _record(self, label)


@shared_task(base=SupervisedTask, bind=True, concurrency_limit=1, concurrency_by=("customer",))
def per_customer_job(self: SupervisedTask, customer: int, seconds: float = 0.5, label: str = "") -> None:
    """One run at a time per customer (``concurrency_by``); different customers run side by side."""
    time.sleep(seconds)
    _record(self, label)


@shared_task(ignore_result=False)
def results_noop() -> None:
    """A plain Celery no-op whose state is kept (the bench's django-celery-results peer, ``BENCH_RESULTS=1``)."""
    return None


# ---------------------------------------------------------------- workflows (chains, chords, callbacks)


@shared_task(base=SupervisedTask, bind=True)
def add(self: SupervisedTask, x: int, y: int = 0, label: str = "", seconds: float = 0.0) -> int:
    """A workflow step: sleeps ``seconds`` (a worker can be killed meanwhile), records, returns x + y."""
    time.sleep(seconds)
    _record(self, label)
    return x + y


@shared_task(base=SupervisedTask, bind=True, backoff=0.1, backoff_max=0.5, backoff_jitter=False)
def add_fail_once(self: SupervisedTask, x: int, y: int = 0, label: str = "") -> int:
    """Fails its first attempt with a retryable error, then returns x + y."""
    _record(self, label)
    if (self.attempt or 1) < 2:
        raise ConnectionError("first attempt fails")
    return x + y


@shared_task(base=SupervisedTask, bind=True)
def total(self: SupervisedTask, values: list[int], label: str = "") -> int:
    """A chord's body: the sum of its header's results."""
    _record(self, label)
    return sum(values)


@shared_task(base=SupervisedTask, bind=True)
def failed_step(self: SupervisedTask, task_id: str, label: str = "") -> str:
    """An errback (``link_error``): receives the failed run's task id."""
    _record(self, label)
    return task_id


@shared_task
def plain_callback(value: Any, label: str = "") -> Any:
    """A plain Celery callback (``link``) of a supervised step."""
    Execution.objects.create(label=label, pid=os.getpid())
    return value
