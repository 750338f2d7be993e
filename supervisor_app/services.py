"""Every write to the run tables, in one place.

Each state change is a conditional ``UPDATE`` whose row count (or ``RETURNING`` rows) decides who
won: the claim is ``WHERE status='queued' AND attempt=N``, every agent write is ``WHERE attempt=N AND
status='running'``, every supervisor action re-checks the condition that selected the row. Nothing
relies on a lock held in memory. Times come from the database (``Now()``), never from the caller.
"""

from __future__ import annotations

import json
import logging
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import reduce
from typing import Any, cast

from django.core.exceptions import EmptyResultSet
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Case, DateTimeField, DurationField, ExpressionWrapper, F, Model, Q, Value, When
from django.db.models.expressions import Combinable
from django.db.models.functions import Now
from django.db.models.sql import InsertQuery, UpdateQuery
from django.utils import timezone

from . import signals
from .models import AdoptedMessage, RunAttempt, SupervisedRun
from .states import AttemptOutcome, FailureDecision, RunStatus, republish_delay

logger = logging.getLogger("supervisor_app")

#: Message headers that carry the run and the attempt (the fencing token) to the agent. Headers,
#: not keyword arguments: a task's signature would reject unknown kwargs.
HEADER_RUN = "supervisor_run"
HEADER_ATTEMPT = "supervisor_attempt"

#: Publishing options kept on the run and reused when the supervisor publishes again.
KEPT_OPTIONS = ("queue", "routing_key", "exchange", "priority", "expires")


def _after(delta: Combinable | timedelta) -> ExpressionWrapper:
    """``now() + delta`` computed by the database."""
    rhs = Value(delta, output_field=DurationField()) if isinstance(delta, timedelta) else delta
    return ExpressionWrapper(Now() + rhs, output_field=DateTimeField())


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def new_task_id(run_id: int, attempt: int) -> str:
    # Each attempt gets its own Celery id, so revoking a timed-out attempt never revokes the next.
    return f"{run_id}.{attempt}.{uuid.uuid4().hex[:12]}"


def update_returning(qs: Any, returning: Sequence[str], **values: Any) -> list[dict[str, Any]]:
    """``qs.update(**values)`` that also returns ``returning`` columns of the updated rows.

    One statement (``UPDATE … RETURNING``, PostgreSQL and SQLite ≥ 3.35), so a claim or heartbeat
    learns what it needs without a second round trip.
    """
    query = qs.query.chain(UpdateQuery)
    query.add_update_values(values)
    compiler = query.get_compiler(qs.db)
    try:
        sql, params = compiler.as_sql()
    except EmptyResultSet:  # e.g. pk__in=[]: nothing can match, nothing to send
        return []
    model = qs.model
    cols = [model._meta.get_field(name) for name in returning]
    sql = f"{sql} RETURNING {', '.join(connections[qs.db].ops.quote_name(f.column) for f in cols)}"
    with connections[qs.db].cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    conn = connections[qs.db]
    out = []
    for row in rows:
        item = {}
        for field, raw in zip(cols, row, strict=True):
            value = raw
            # Same order as the ORM's compiler: backend converters, then the field's own.
            col = field.get_col(model._meta.db_table)
            for converter in [*conn.ops.get_db_converters(col), *col.get_db_converters(conn)]:
                value = converter(value, col, conn)
            item[field.name] = value
        out.append(item)
    return out


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class RunPolicy:
    """The supervision values recorded on a run when it is created."""

    max_attempts: int
    lease_timeout: float
    start_timeout: float
    max_runtime: float | None


def check_json(task_name: str, args: Any, kwargs: Any) -> None:
    """Refuse arguments that would not survive the JSON round trip, before anything is recorded."""
    try:
        encoded = json.dumps([args, kwargs], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{task_name}: arguments of a supervised task must be JSON-serialisable ({exc})") from exc
    from .conf import supervisor_settings

    limit = supervisor_settings.MAX_ARGS_BYTES
    if limit is not None:
        size = len(encoded.encode())
        if size > limit:
            raise ValueError(
                f"{task_name}: arguments are {size} bytes of JSON, over SUPERVISOR_MAX_ARGS_BYTES ({limit}); "
                "pass a reference (a primary key, a file name) instead of the data"
            )


def create_run(
    task_name: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    policy: RunPolicy,
    *,
    options: Mapping[str, Any] | None = None,
    countdown: float | None = None,
    periodic_task_id: int | None = None,
    scheduled_for: Any = None,
    status: str = RunStatus.QUEUED,
    publish: bool = True,
    adopted_message_id: str | None = None,
) -> SupervisedRun | None:
    """Record a run and, after commit, publish its first attempt.

    For a schedule slot, returns None when the slot is already recorded (another beat won), in which
    case nothing is published. With ``countdown`` the run waits, recorded, and the supervisor
    publishes it when due (no ETA held in a worker's memory). ``publish=False``: the first attempt's
    message exists already (a worker adopting a message that carried no run); the supervisor
    publishes it again only if it is not started within the start timeout. ``adopted_message_id``
    (the adopted message's Celery id, with ``publish=False``) is unique: if a run was recorded for
    that message already (the broker redelivered it), ``IntegrityError`` is raised, nothing written.
    """
    args = list(args or [])
    kwargs = dict(kwargs or {})
    check_json(task_name, args, kwargs)
    kept = {k: v for k, v in (options or {}).items() if k in KEPT_OPTIONS and v is not None}
    delay = countdown or 0.0
    fields: dict[str, Any] = dict(
        task_name=task_name,
        args=args,
        kwargs=kwargs,
        options=kept,
        status=status,
        max_attempts=policy.max_attempts,
        lease_timeout=timedelta(seconds=policy.lease_timeout),
        start_timeout=timedelta(seconds=policy.start_timeout),
        max_runtime=_seconds(policy.max_runtime),
        periodic_task_id=periodic_task_id,
        scheduled_for=scheduled_for,
        # publish_count is optimistic: a failed publish resets it (see publish()).
        publish_count=0 if delay or status != RunStatus.QUEUED else 1,
        next_check_at=_after(timedelta(seconds=delay or policy.start_timeout)) if status == RunStatus.QUEUED else None,
    )
    if status != RunStatus.QUEUED:
        fields["finished_at"] = Now()
    if periodic_task_id is not None:
        try:
            with transaction.atomic(using=router.db_for_write(SupervisedRun)):
                run = SupervisedRun.objects.create(**fields)
        except IntegrityError:
            return None  # the slot is recorded already: whoever inserted it publishes it
    elif adopted_message_id is not None:
        # Its own transaction, so a conflict (IntegrityError, raised) leaves the caller's intact and
        # records no run.
        with transaction.atomic(using=router.db_for_write(SupervisedRun)):
            run = SupervisedRun.objects.create(**fields)
            AdoptedMessage.objects.create(message_id=adopted_message_id, run=run)
    else:
        run = SupervisedRun.objects.create(**fields)
    # The id is known only after the insert; a second short write is avoided by deriving the first
    # attempt's task id from it lazily: attempt 1 uses "<id>.1".
    run.task_id = f"{run.pk}.1"
    if status == RunStatus.QUEUED and not delay and publish:
        # Published from what we just wrote: no read-back, so a dispatch stays one statement.
        message = (run.pk, 1, task_name, args, kwargs, kept, run.task_id)

        def publish_first() -> None:
            with Publisher() as publisher:
                publisher.publish(*message)

        transaction.on_commit(publish_first, using=router.db_for_write(SupervisedRun))
    return run


@dataclass(frozen=True)
class SlotRun:
    """One schedule slot to record as a queued run by :func:`create_slot_runs`."""

    periodic_task_id: int
    scheduled_for: datetime
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    policy: RunPolicy
    options: Mapping[str, Any]


def create_slot_runs(wanted: Sequence[SlotRun], batch_size: int = 500) -> list[tuple[int, SlotRun]]:
    """Record many schedule slots as queued runs and, after commit, publish the new ones.

    One ``INSERT … ON CONFLICT (periodic_task, scheduled_for) DO NOTHING RETURNING`` per batch: a slot
    recorded already (by another beat, the supervisor, an earlier fire) is skipped by its unique
    constraint, and only the rows this call inserted come back, as ``(run id, slot)``, and are
    published, through one producer per batch. Rows go in ``(periodic task, slot)`` order, so two
    beats inserting overlapping batches wait for each other but never deadlock. The values are
    :func:`create_run`'s for a queued slot; the caller has checked the arguments (``check_json``).
    A backend without ``ON CONFLICT … RETURNING`` gets :func:`create_run` per slot.
    """
    using = router.db_for_write(SupervisedRun)
    conn = connections[using]
    if not (conn.features.supports_update_conflicts_with_target and conn.features.can_return_rows_from_bulk_insert):
        created = []
        for slot in wanted:
            run = create_run(
                slot.task_name,
                slot.args,
                slot.kwargs,
                slot.policy,
                options=slot.options,
                periodic_task_id=slot.periodic_task_id,
                scheduled_for=slot.scheduled_for,
            )
            if run is not None:
                created.append((run.pk, slot))
        return created
    meta = SupervisedRun._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.pk]
    ordered = sorted(wanted, key=lambda s: (s.periodic_task_id, s.scheduled_for))
    size = max(1, min(batch_size, conn.ops.bulk_batch_size(fields, ordered)))
    created = []
    for start in range(0, len(ordered), size):
        with transaction.atomic(using=using):
            inserted = _insert_slots(ordered[start : start + size], fields, using)
            messages = [
                (pk, 1, s.task_name, s.args, s.kwargs, _kept(s.options), first_task_id(pk)) for pk, s in inserted
            ]
            if messages:
                transaction.on_commit(lambda m=messages: _publish_batch(m), using=using)  # type: ignore[misc]
        created += inserted
    return created


def _kept(options: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (options or {}).items() if k in KEPT_OPTIONS and v is not None}


def _slot_values(s: SlotRun) -> dict[str, Any]:
    """The fields of a queued slot run that differ from the model's defaults (as in create_run)."""
    return dict(
        task_name=s.task_name,
        args=list(s.args),
        kwargs=dict(s.kwargs),
        options=_kept(s.options),
        status=RunStatus.QUEUED,
        max_attempts=s.policy.max_attempts,
        lease_timeout=timedelta(seconds=s.policy.lease_timeout),
        start_timeout=timedelta(seconds=s.policy.start_timeout),
        max_runtime=_seconds(s.policy.max_runtime),
        periodic_task_id=s.periodic_task_id,
        scheduled_for=s.scheduled_for,
        publish_count=1,  # optimistic, as in create_run: a failed publish resets it
    )


def _insert_slots(chunk: Sequence[SlotRun], fields: list[Any], using: str) -> list[tuple[int, SlotRun]]:
    conn = connections[using]
    qn = conn.ops.quote_name
    rows = [_slot_values(s) for s in chunk]
    if conn.vendor == "postgresql":
        sql, params = _unnest_insert(rows, fields, conn)
    else:
        # now() + start_timeout, on the database's clock, as create_run does.
        objs: list[Model] = [SupervisedRun(**row, next_check_at=_after(row["start_timeout"])) for row in rows]
        query = InsertQuery(SupervisedRun)
        query.insert_values(fields, objs)
        [(sql, params)] = query.get_compiler(using=using).as_sql()
    task, slot = qn("periodic_task_id"), qn("scheduled_for")
    # The target and condition of the supervisor_run_unique_slot constraint: no other conflict is hidden.
    sql += f" ON CONFLICT ({task}, {slot}) WHERE {task} IS NOT NULL DO NOTHING RETURNING {qn('id')}, {task}, {slot}"
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        returned = cursor.fetchall()
    col = cast(DateTimeField, SupervisedRun._meta.get_field("scheduled_for")).get_col(SupervisedRun._meta.db_table)
    converters = [*conn.ops.get_db_converters(col), *col.get_db_converters(conn)]
    by_key = {(s.periodic_task_id, s.scheduled_for): s for s in chunk}
    inserted = []
    for pk, task_id, raw in returned:
        for converter in converters:
            raw = converter(raw, col, conn)
        inserted.append((pk, by_key[(task_id, raw)]))
    return inserted


def _unnest_insert(rows: Sequence[Mapping[str, Any]], fields: list[Any], conn: Any) -> tuple[str, list[Any]]:
    """PostgreSQL: ``INSERT … SELECT … FROM unnest(<one array per column>)``.

    About twenty parameters whatever the number of rows, and no model instance per row: building a
    500-row VALUES list costs far more than inserting it. Every column of the model is written, each
    value prepared by its field as the ORM's insert does (defaults and ``auto_now_add`` included);
    ``next_check_at`` is ``now() + start_timeout`` on the database's clock, as in create_run.
    """
    qn = conn.ops.quote_name
    now = timezone.now()
    columns, selected, arrays = [], [], []
    for field in fields:
        column = qn(field.column)
        columns.append(column)
        if field.name == "next_check_at":
            selected.append(f"STATEMENT_TIMESTAMP() + u.{qn('start_timeout')}")
            continue
        if field.attname in rows[0]:
            values = [field.get_db_prep_save(row[field.attname], conn) for row in rows]
        else:
            default = now if getattr(field, "auto_now_add", False) else field.get_default()
            values = [field.get_db_prep_save(default, conn)] * len(rows)
        arrays.append((column, f"%s::{field.db_type(conn)}[]", values))
        selected.append(f"u.{column}")
    sql = (
        f"INSERT INTO {qn(SupervisedRun._meta.db_table)} ({', '.join(columns)}) SELECT {', '.join(selected)}"
        f" FROM unnest({', '.join(cast_ for _, cast_, _ in arrays)}) AS u({', '.join(c for c, _, _ in arrays)})"
    )
    return sql, [values for _, _, values in arrays]


def _publish_batch(messages: Sequence[Message]) -> None:
    with Publisher() as publisher:
        publisher.publish_many(messages)


def first_task_id(run_id: int) -> str:
    return f"{run_id}.1"


# --------------------------------------------------------------------------- publishing


#: What :meth:`Publisher.publish` takes: run id, attempt, task name, args, kwargs, options, task id.
Message = tuple[int, int, str, Any, Any, Any, str]


class Publisher:
    """Sends attempts to the broker.

    One producer (one broker channel) serves every message of a publisher's lifetime, a sweep:
    a mass recovery publishes hundreds of messages without a pool round trip each. After one failure
    it stops trying for its lifetime, so a broker outage costs one connection error per sweep, not
    one per run; the runs stay queued and the next sweep tries again.
    """

    def __init__(self) -> None:
        self.broken = False
        self.sent = 0
        self.failed = 0
        self._producer: Any = None

    def _acquire(self) -> Any:
        if self._producer is None:
            from celery import current_app

            self._producer = current_app.producer_pool.acquire(block=True)
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.release()
            except Exception:  # a dead connection: the pool revives it on its next use
                logger.debug("producer release failed", exc_info=True)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(
        self, run_id: int, attempt: int, task_name: str, args: Any, kwargs: Any, options: Any, task_id: str
    ) -> bool:
        if not self.broken:
            try:
                _send(run_id, attempt, task_name, args, kwargs, options, task_id, producer=self._acquire())
                self.sent += 1
                return True
            except Exception as exc:  # broker down, DNS, auth...: the run stays queued
                self.broken = True
                self.close()
                logger.warning(
                    "could not publish run %s attempt %s (%s); it stays queued and "
                    "the supervisor will publish it again",
                    run_id,
                    attempt,
                    type(exc).__name__,
                )
        self.failed += 1
        # Ask the next sweep to try again rather than waiting for the start timeout.
        SupervisedRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.QUEUED).update(
            next_check_at=Now(), publish_count=0
        )
        return False

    def publish_many(self, messages: Iterable[Message]) -> int:
        """Publish each message; once the broker failed, the rest stay queued, marked in one UPDATE per
        attempt number (not one per run). Returns how many were sent."""
        sent = 0
        unsent: dict[int, list[int]] = {}
        for message in messages:
            if self.broken:
                unsent.setdefault(message[1], []).append(message[0])
            elif self.publish(*message):
                sent += 1
        for attempt, ids in unsent.items():
            self.failed += len(ids)
            for start in range(0, len(ids), 500):
                SupervisedRun.objects.filter(
                    pk__in=ids[start : start + 500], attempt=attempt, status=RunStatus.QUEUED
                ).update(next_check_at=Now(), publish_count=0)
        return sent


#: One quick reconnect (a connection that died since its last use, a broker restart), no waiting:
#: the run is durable and the supervisor publishes it again, so blocking the caller buys nothing.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def _send(
    run_id: int,
    attempt: int,
    task_name: str,
    args: Any,
    kwargs: Any,
    options: Any,
    task_id: str,
    producer: Any = None,
) -> None:
    from celery import current_app

    current_app.send_task(
        task_name,
        args=args,
        kwargs=kwargs,
        task_id=task_id,
        headers={HEADER_RUN: run_id, HEADER_ATTEMPT: attempt},
        retry=True,
        retry_policy=RETRY_POLICY,
        producer=producer,
        # Whatever the app's task_serializer: a run's arguments are stored as JSON and travel as
        # JSON, never pickle (a worker accepting pickle would run code from anyone who can publish).
        serializer="json",
        **(options or {}),
    )


def publish_by_id(run_id: int, publisher: Publisher | None = None) -> bool:
    """Publish the current attempt of a queued run (reads it back first)."""
    row = (
        SupervisedRun.objects.filter(pk=run_id, status=RunStatus.QUEUED)
        .values("attempt", "task_name", "args", "kwargs", "options", "task_id")
        .first()
    )
    if row is None:
        return False
    task_id = row["task_id"] or first_task_id(run_id)
    return (publisher or Publisher()).publish(
        run_id, row["attempt"], row["task_name"], row["args"], row["kwargs"], row["options"], task_id
    )


def _publish_on_commit(run: SupervisedRun, attempt: int, task_id: str, publisher: Publisher) -> None:
    args = (run.pk, attempt, run.task_name, run.args, run.kwargs, run.options, task_id)
    transaction.on_commit(lambda: publisher.publish(*args), using=router.db_for_write(SupervisedRun))


def _send_many_on_commit(signal: Any, extras: Mapping[int, dict[str, Any]]) -> None:
    """Send ``signal`` for many runs after commit, reading them back in one query."""
    if not extras or not signal.has_listeners(SupervisedRun):
        return

    def send() -> None:
        for run in SupervisedRun.objects.filter(pk__in=list(extras)):
            signal.send_robust(sender=SupervisedRun, run=run, **extras[run.pk])

    transaction.on_commit(send, using=router.db_for_write(SupervisedRun))


def _send_on_commit(signal: Any, run_id: int, **extra: Any) -> None:
    if not signal.has_listeners(SupervisedRun):
        return  # nobody listens: spare the hot path the read-back of the run

    def send() -> None:
        run = SupervisedRun.objects.filter(pk=run_id).first()
        if run is not None:
            signal.send_robust(sender=SupervisedRun, run=run, **extra)

    transaction.on_commit(send, using=router.db_for_write(SupervisedRun))


# --------------------------------------------------------------------------- agent side


@dataclass(frozen=True)
class Claim:
    """What an agent learns when it wins the claim of an attempt."""

    run_id: int
    attempt: int
    max_attempts: int
    lease_timeout: float
    checkpoint: Any


_CLAIM_PG = """
WITH claimed AS (
    UPDATE {run} SET status = 'running', worker = %(worker)s, started_at = now(), heartbeat_at = now(),
        lease_expires_at = now() + lease_timeout,
        deadline_at = CASE WHEN max_runtime IS NULL THEN NULL ELSE now() + max_runtime END,
        next_check_at = NULL, finished_at = NULL,
        task_id = COALESCE(NULLIF(%(task_id)s, ''), task_id)
    WHERE id = %(run_id)s AND attempt = %(attempt)s AND status = 'queued'
    RETURNING id, attempt, max_attempts, lease_timeout, checkpoint
), started AS (
    INSERT INTO {attempt} (run_id, number, task_id, worker, outcome, created_at, started_at, error, traceback)
    SELECT id, attempt, %(task_id)s, %(worker)s, 'running', now(), now(), '', '' FROM claimed
    ON CONFLICT (run_id, number) DO UPDATE
        SET task_id = EXCLUDED.task_id, worker = EXCLUDED.worker, outcome = 'running', started_at = now()
)
SELECT max_attempts, lease_timeout, checkpoint::text FROM claimed
"""

_SUCCEED_PG = """
WITH finished AS (
    UPDATE {run} SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL, deadline_at = NULL,
        last_error = ''
    WHERE id = %(run_id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING id, attempt
), ended AS (
    UPDATE {attempt} AS a SET outcome = 'succeeded', ended_at = now()
    FROM finished WHERE a.run_id = finished.id AND a.number = finished.attempt
)
SELECT count(*) FROM finished
"""


def _pg_sql(template: str) -> str:
    conn = connections[router.db_for_write(SupervisedRun)]
    return template.format(
        run=conn.ops.quote_name(SupervisedRun._meta.db_table),
        attempt=conn.ops.quote_name(RunAttempt._meta.db_table),
    )


#: Prefix of the agent's single-statement writes when SUPERVISOR_ASYNC_AGENT_COMMIT is on. The
#: statements of one query string run in one implicit transaction, so SET LOCAL covers exactly them.
_ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off; "


def _agent_execute(cursor: Any, sql: str, params: Mapping[str, Any] | Sequence[Any]) -> None:
    """Run an agent write (claim, renewal, finish), without waiting for its WAL flush if allowed.

    Safe because every agent write is recoverable: if PostgreSQL crashes and forgets the last
    fraction of a second of them, a forgotten claim looks queued (republished), a forgotten renewal
    or finish looks like an expired lease (recovered). Dispatch never does this: a recorded run
    must survive a crash.
    """
    from .conf import supervisor_settings

    if supervisor_settings.raw("ASYNC_AGENT_COMMIT"):
        cursor.execute(_ASYNC_COMMIT + sql, params)
        cursor.nextset()
    else:
        cursor.execute(sql, params)


def _fast_path() -> Any:
    """The PostgreSQL connection when the hot path can run as single statements (CTEs), else None."""
    conn = connections[router.db_for_write(SupervisedRun)]
    return conn if conn.vendor == "postgresql" and not conn.in_atomic_block else None


def claim(run_id: int, attempt: int, worker: str, task_id: str = "") -> Claim | None:
    """queued → running for attempt ``attempt``; None when another delivery or attempt has it.

    On PostgreSQL one statement claims the run and starts the attempt's row (a no-op run costs
    three statements in all: dispatch, claim, finish). Elsewhere, two in a transaction.
    """
    conn = _fast_path()
    if conn is not None:
        params = {"run_id": run_id, "attempt": attempt, "worker": worker[:255], "task_id": task_id[:255]}
        with conn.cursor() as cursor:
            _agent_execute(cursor, _pg_sql(_CLAIM_PG), params)
            row = cursor.fetchone()
        if row is None:
            return None
        checkpoint = None if row[2] is None else json.loads(row[2])
        return Claim(run_id, attempt, int(row[0]), row[1].total_seconds(), checkpoint)
    values: dict[str, Any] = dict(
        status=RunStatus.RUNNING,
        worker=worker[:255],
        started_at=Now(),
        heartbeat_at=Now(),
        lease_expires_at=_after(F("lease_timeout")),
        deadline_at=Case(
            When(max_runtime__isnull=False, then=_after(F("max_runtime"))),
            default=None,
            output_field=DateTimeField(),
        ),
        next_check_at=None,
        finished_at=None,
    )
    if task_id:
        values["task_id"] = task_id[:255]
    with transaction.atomic():
        rows = update_returning(
            SupervisedRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.QUEUED),
            ["max_attempts", "lease_timeout", "checkpoint"],
            **values,
        )
        if not rows:
            return None
        started = dict(worker=worker[:255], task_id=task_id[:255], outcome=AttemptOutcome.RUNNING, started_at=Now())
        # Attempt 1 has no row yet (dispatch stays one statement); later attempts got a pending row
        # when the supervisor or an operator queued them.
        if attempt == 1 or not RunAttempt.objects.filter(run_id=run_id, number=attempt).update(**started):
            RunAttempt.objects.create(run_id=run_id, number=attempt, **started)
    row = rows[0]
    return Claim(run_id, attempt, row["max_attempts"], row["lease_timeout"].total_seconds(), row["checkpoint"])


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool = False


def renew_leases(leases: Iterable[tuple[int, int]]) -> dict[tuple[int, int], LeaseState]:
    """Renew every lease a worker process holds in one statement.

    Returns the state of each lease asked for: ``held=False`` when the attempt was superseded or
    finished (the agent must stop), ``cancel_requested`` when an operator asked to cancel.
    """
    wanted = list(leases)
    if not wanted:
        return {}
    conn = connections[router.db_for_write(SupervisedRun)]
    held: dict[tuple[int, int], bool]
    if conn.vendor == "postgresql":
        held = {(run_id, attempt): cancel for run_id, attempt, cancel in _renew_leases_pg(conn, wanted)}
        return {key: LeaseState(key in held, bool(held.get(key, False))) for key in wanted}
    # Fenced by (id, attempt): a zombie's renewal matches no row and touches nothing.
    match = reduce(operator.or_, (Q(pk=run_id, attempt=attempt) for run_id, attempt in wanted))
    rows = update_returning(
        SupervisedRun.objects.filter(match, status=RunStatus.RUNNING),
        ["id", "attempt", "cancel_requested"],
        heartbeat_at=Now(),
        lease_expires_at=_after(F("lease_timeout")),
    )
    held = {(r["id"], r["attempt"]): bool(r["cancel_requested"]) for r in rows}
    return {key: LeaseState(key in held, bool(held.get(key, False))) for key in wanted}


def _renew_leases_pg(conn: Any, wanted: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    # One statement whatever the number of leases: the (id, attempt) pairs travel as two arrays, so
    # the SQL text and its plan do not grow with N (an OR of N conditions would).
    table = conn.ops.quote_name(SupervisedRun._meta.db_table)
    sql = (
        f"UPDATE {table} AS r SET heartbeat_at = now(), lease_expires_at = now() + r.lease_timeout "
        "FROM unnest(%s::bigint[], %s::integer[]) AS l(id, attempt) "
        "WHERE r.id = l.id AND r.attempt = l.attempt AND r.status = %s "
        "RETURNING r.id, r.attempt, r.cancel_requested"
    )
    with conn.cursor() as cursor:
        _agent_execute(cursor, sql, [[w[0] for w in wanted], [w[1] for w in wanted], RunStatus.RUNNING.value])
        return [(int(a), int(b), bool(c)) for a, b, c in cursor.fetchall()]


def heartbeat(run_id: int, attempt: int, progress: Any = None, checkpoint: Any = None) -> LeaseState:
    """An explicit heartbeat from task code, optionally saving progress and a checkpoint."""
    values: dict[str, Any] = dict(heartbeat_at=Now(), lease_expires_at=_after(F("lease_timeout")))
    if progress is not None:
        values["progress"] = progress
    if checkpoint is not None:
        json.dumps(checkpoint)  # a checkpoint that can't be stored is the caller's bug: fail loudly
        values["checkpoint"] = checkpoint
    rows = update_returning(
        SupervisedRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING),
        ["cancel_requested"],
        **values,
    )
    if not rows:
        return LeaseState(False)
    return LeaseState(True, bool(rows[0]["cancel_requested"]))


def schedule_backoff(run_id: int) -> tuple[float | None, float | None]:
    """Backoff and cap (seconds) set by the supervision policy of the run's schedule, if any."""
    from .models import SupervisionPolicy

    row = (
        SupervisionPolicy.objects.filter(periodic_task__supervised_runs__pk=run_id)
        .values_list("backoff", "backoff_max")
        .first()
    )
    if row is None:
        return None, None
    return tuple(None if d is None else d.total_seconds() for d in row)  # type: ignore[return-value]


def _ended(status: str) -> dict[str, Any]:
    """A run's values as it reaches a final status: finished now, no lease or deadline to watch."""
    return dict(status=status, finished_at=Now(), lease_expires_at=None, deadline_at=None)


def _finish_attempt(run_id: int, attempt: int, outcome: str, error: str = "", tb: str = "") -> None:
    RunAttempt.objects.filter(run_id=run_id, number=attempt).update(
        outcome=outcome, ended_at=Now(), error=error[:10000], traceback=tb[:50000]
    )


def _fenced(run_id: int, attempt: int, worker: str, what: str) -> None:
    """Record that a zombie's write was refused (over a lost outcome; a timed-out one stays so)."""
    RunAttempt.objects.filter(
        run_id=run_id,
        number=attempt,
        outcome__in=[AttemptOutcome.LOST, AttemptOutcome.RUNNING],
    ).update(outcome=AttemptOutcome.FENCED, error=f"{what} refused: the lease was lost ({worker})")
    logger.warning("run %s attempt %s lost its lease; %s refused", run_id, attempt, what)
    _send_on_commit(signals.run_fenced, run_id, attempt=attempt, worker=worker)


def finish_success(run_id: int, attempt: int, worker: str = "") -> bool:
    """running → succeeded, fenced by the attempt. False: the lease was lost, nothing written."""
    conn = _fast_path()
    if conn is not None:
        with conn.cursor() as cursor:
            _agent_execute(cursor, _pg_sql(_SUCCEED_PG), {"run_id": run_id, "attempt": attempt})
            won = cursor.fetchone()[0] == 1
        if won:
            _send_on_commit(signals.run_succeeded, run_id, attempt=attempt)
            return True
        with transaction.atomic():
            _fenced(run_id, attempt, worker, "completion")
        return False
    with transaction.atomic():
        n = SupervisedRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING).update(
            **_ended(RunStatus.SUCCEEDED), last_error=""
        )
        if not n:
            _fenced(run_id, attempt, worker, "completion")
            return False
        _finish_attempt(run_id, attempt, AttemptOutcome.SUCCEEDED)
        _send_on_commit(signals.run_succeeded, run_id, attempt=attempt)
    return True


def finish_failure(run_id: int, attempt: int, decision: FailureDecision, error: str, tb: str, worker: str = "") -> bool:
    """running → failed / retrying / dead as ``decision`` says, fenced by the attempt."""
    values: dict[str, Any] = dict(
        status=decision.status, lease_expires_at=None, deadline_at=None, last_error=error[:10000]
    )
    if decision.status == RunStatus.RETRYING:
        values["next_check_at"] = _after(timedelta(seconds=decision.retry_in or 0.0))
    else:
        values["finished_at"] = Now()
    with transaction.atomic():
        n = SupervisedRun.objects.filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING).update(**values)
        if not n:
            _fenced(run_id, attempt, worker, "failure report")
            return False
        _finish_attempt(run_id, attempt, AttemptOutcome.FAILED, error, tb)
        if decision.status == RunStatus.FAILED:
            _send_on_commit(signals.run_failed, run_id, attempt=attempt, error=error)
        elif decision.status == RunStatus.DEAD:
            _send_on_commit(signals.run_dead, run_id, attempt=attempt, reason="error")
        else:
            _send_on_commit(signals.run_retrying, run_id, attempt=attempt, error=error, retry_in=decision.retry_in)
    return True


def finish_cancelled(run_id: int, attempt: int, worker: str = "") -> bool:
    """The agent stopped on an operator's cancel request."""
    with transaction.atomic():
        n = SupervisedRun.objects.filter(
            pk=run_id, attempt=attempt, status=RunStatus.RUNNING, cancel_requested=True
        ).update(**_ended(RunStatus.CANCELLED))
        if not n:
            return False
        _finish_attempt(run_id, attempt, AttemptOutcome.CANCELLED, "cancelled by an operator")
        _send_on_commit(signals.run_cancelled, run_id, attempt=attempt)
    return True


def record_fenced(run_id: int, attempt: int, worker: str = "") -> None:
    """The agent noticed at a heartbeat that it lost the lease and stopped without writing."""
    with transaction.atomic():
        _fenced(run_id, attempt, worker, "further work")


# --------------------------------------------------------------------------- supervisor side


#: A run queued for a new attempt: the previous agent's traces cleared, the publish counted.
_REQUEUED = dict(
    status=RunStatus.QUEUED,
    worker="",
    started_at=None,
    heartbeat_at=None,
    lease_expires_at=None,
    deadline_at=None,
    publish_count=1,
)


def _requeue_values(run: SupervisedRun, next_attempt: int) -> dict[str, Any]:
    return dict(
        _REQUEUED,
        attempt=next_attempt,
        task_id=new_task_id(run.pk, next_attempt),
        next_check_at=_after(run.start_timeout),
    )


def _requeue_or_bury(
    run: SupervisedRun,
    condition: Mapping[str, Any],
    outcome: str,
    reason: str,
    publisher: Publisher,
    on_requeue: Callable[[], None],
) -> str | None:
    """Shared end of a lost or timed-out attempt: a new attempt, or ``dead``. Returns the new status."""
    qs = SupervisedRun.objects.filter(pk=run.pk, attempt=run.attempt, **condition)
    error = f"attempt {run.attempt} {reason}" + (f" (worker {run.worker})" if run.worker else "")
    if run.attempt < run.max_attempts:
        values = _requeue_values(run, run.attempt + 1)
        if not qs.update(last_error=error, **values):
            return None
        # The unique (run, number) constraint backs the conditional update: should two supervisors
        # ever both pass it, the second insert fails and its transaction rolls back.
        RunAttempt.objects.create(run_id=run.pk, number=run.attempt + 1, task_id=values["task_id"])
        _finish_attempt(run.pk, run.attempt, outcome, error)
        _publish_on_commit(run, run.attempt + 1, values["task_id"], publisher)
        on_requeue()
        return RunStatus.QUEUED
    if not qs.update(**_ended(RunStatus.DEAD), last_error=error):
        return None
    _finish_attempt(run.pk, run.attempt, outcome, error)
    _send_on_commit(signals.run_dead, run.pk, attempt=run.attempt, reason=outcome)
    return RunStatus.DEAD


def recover_lost_batch(runs: Sequence[SupervisedRun], publisher: Publisher) -> tuple[list[int], list[int], list[int]]:
    """:func:`recover_lost` for a locked batch, in a constant number of statements.

    A mass failure (a host with hundreds of runs dies) then costs a handful of statements per batch
    instead of three per run: one conditional UPDATE per outcome, one INSERT of the new attempts'
    rows, one UPDATE of the lost attempts' rows. Returns the ids of the runs re-queued, dead, and
    cancelled (an operator had cancelled them: no new attempt).
    """
    from django.db.models import CharField
    from django.db.models.functions import Cast, Concat

    by_id = {run.pk: run for run in runs}
    error = Concat(
        Value("attempt "),
        Cast("attempt", CharField()),
        Value(" lost: lease expired (worker "),
        F("worker"),
        Value(")"),
        output_field=CharField(),
    )
    stale = SupervisedRun.objects.filter(status=RunStatus.RUNNING, lease_expires_at__lt=Now())
    # An operator cancelled it and its agent died: it ends cancelled; no new attempt for it.
    cancelled = update_returning(
        stale.filter(pk__in=[r.pk for r in runs], cancel_requested=True),
        ["id", "attempt"],
        **_ended(RunStatus.CANCELLED),
    )
    stale = stale.filter(cancel_requested=False)
    token = uuid.uuid4().hex[:12]
    queued = update_returning(
        stale.filter(pk__in=[r.pk for r in runs if r.attempt < r.max_attempts]),
        ["id", "attempt", "task_id"],
        **_REQUEUED,
        attempt=F("attempt") + 1,
        task_id=Concat(
            Cast("id", CharField()),
            Value("."),
            Cast(F("attempt") + 1, CharField()),
            Value("." + token),
            output_field=CharField(),
        ),
        last_error=error,
        next_check_at=_after(F("start_timeout")),
    )
    dead = update_returning(
        stale.filter(pk__in=[r.pk for r in runs if r.attempt >= r.max_attempts]),
        ["id"],
        **_ended(RunStatus.DEAD),
        last_error=error,
    )
    queued_ids = [row["id"] for row in queued]
    dead_ids = [row["id"] for row in dead]
    cancelled_ids = [row["id"] for row in cancelled]
    if queued_ids or dead_ids or cancelled_ids:
        # The attempt that was running is the only attempt row of its run still marked running.
        RunAttempt.objects.filter(
            run_id__in=queued_ids + dead_ids + cancelled_ids, outcome=AttemptOutcome.RUNNING
        ).update(outcome=AttemptOutcome.LOST, ended_at=Now(), error="lease expired")
    # The unique (run, number) constraint backs the conditional update: a second supervisor that
    # somehow passed it would fail here and roll its whole batch back.
    RunAttempt.objects.bulk_create(
        [RunAttempt(run_id=row["id"], number=row["attempt"], task_id=row["task_id"]) for row in queued]
    )
    for row in queued:
        _publish_on_commit(by_id[row["id"]], row["attempt"], row["task_id"], publisher)
    _send_many_on_commit(signals.run_recovered, {row["id"]: {"lost_attempt": row["attempt"] - 1} for row in queued})
    _send_many_on_commit(
        signals.run_dead,
        {run_id: {"attempt": by_id[run_id].attempt, "reason": AttemptOutcome.LOST} for run_id in dead_ids},
    )
    _send_many_on_commit(signals.run_cancelled, {row["id"]: {"attempt": row["attempt"]} for row in cancelled})
    return queued_ids, dead_ids, cancelled_ids


def time_out(run: SupervisedRun, publisher: Publisher) -> str | None:
    """Past max runtime: revoke the attempt (after commit) and start a new one or bury the run.

    A run an operator cancelled is past its cancel grace instead: it ends ``cancelled``.
    """
    if run.cancel_requested:
        return _force_cancel(run)
    old_task_id = run.task_id
    timed_out = run.attempt
    status = _requeue_or_bury(
        run,
        {"status": RunStatus.RUNNING, "deadline_at__lt": Now()},
        AttemptOutcome.TIMED_OUT,
        "timed out: max runtime exceeded",
        publisher,
        lambda: _send_on_commit(signals.run_timed_out, run.pk, timed_out_attempt=timed_out),
    )
    if status is not None and old_task_id:
        transaction.on_commit(lambda: _revoke(old_task_id))
    return status


def _force_cancel(run: SupervisedRun) -> str | None:
    """A cancelled run whose body did not stop within the grace period: end it, revoke the attempt.

    The attempt is fenced like any other: if its body still finishes, its write is refused.
    """
    if not SupervisedRun.objects.filter(
        pk=run.pk, attempt=run.attempt, status=RunStatus.RUNNING, cancel_requested=True
    ).update(**_ended(RunStatus.CANCELLED)):
        return None
    _finish_attempt(
        run.pk, run.attempt, AttemptOutcome.CANCELLED, "cancelled by an operator; not stopped within the grace period"
    )
    _send_on_commit(signals.run_cancelled, run.pk, attempt=run.attempt)
    if run.task_id:
        task_id = run.task_id
        transaction.on_commit(lambda: _revoke(task_id))
    return RunStatus.CANCELLED


def _revoke(task_id: str) -> None:
    from celery import current_app

    try:
        current_app.control.revoke(task_id, terminate=True, signal="SIGKILL")
    except Exception as exc:  # the attempt is fenced anyway; a failed revoke only wastes a worker
        logger.warning("could not revoke %s (%s)", task_id, type(exc).__name__)


def dispatch_retry(run: SupervisedRun, publisher: Publisher) -> bool:
    """A retry's backoff is over: queue the next attempt (or end the run, if an operator cancelled it)."""
    if run.cancel_requested:
        if SupervisedRun.objects.filter(pk=run.pk, attempt=run.attempt, status=RunStatus.RETRYING).update(
            status=RunStatus.CANCELLED, finished_at=Now(), next_check_at=None
        ):
            _send_on_commit(signals.run_cancelled, run.pk, attempt=None)
        return False
    values = _requeue_values(run, run.attempt + 1)
    if not SupervisedRun.objects.filter(
        pk=run.pk, attempt=run.attempt, status=RunStatus.RETRYING, next_check_at__lte=Now()
    ).update(**values):
        return False
    RunAttempt.objects.create(run_id=run.pk, number=run.attempt + 1, task_id=values["task_id"])
    _publish_on_commit(run, run.attempt + 1, values["task_id"], publisher)
    return True


def republish(run: SupervisedRun, publisher: Publisher) -> bool:
    """A queued attempt nobody started in time: publish it again (the claim drops duplicates)."""
    count = run.publish_count + 1
    delay = republish_delay(run.start_timeout.total_seconds(), count)
    task_id = run.task_id or first_task_id(run.pk)
    if not SupervisedRun.objects.filter(
        pk=run.pk, attempt=run.attempt, status=RunStatus.QUEUED, next_check_at__lte=Now()
    ).update(publish_count=count, next_check_at=_after(timedelta(seconds=delay)), task_id=task_id):
        return False
    _publish_on_commit(run, run.attempt, task_id, publisher)
    return True


# --------------------------------------------------------------------------- operator actions


def request_cancel(run_id: int) -> str | None:
    """Cancel a run: at once when no agent holds it, cooperatively (next heartbeat) when running."""
    with transaction.atomic():
        if SupervisedRun.objects.filter(pk=run_id, status__in=[RunStatus.QUEUED, RunStatus.RETRYING]).update(
            status=RunStatus.CANCELLED, finished_at=Now(), next_check_at=None, cancel_requested=True
        ):
            RunAttempt.objects.filter(run_id=run_id, outcome=AttemptOutcome.PENDING).update(
                outcome=AttemptOutcome.CANCELLED, ended_at=Now()
            )
            _send_on_commit(signals.run_cancelled, run_id, attempt=None)
            return RunStatus.CANCELLED
        # Running: the body stops at its next heartbeat; if it doesn't within the grace period, the
        # deadline below makes the supervisor cancel the run and revoke the attempt (time_out).
        from django.db.models.functions import Coalesce, Least

        from .conf import supervisor_settings

        grace = supervisor_settings.cancel_grace
        by = _after(timedelta(seconds=grace)) if grace is not None else _after(F("lease_timeout"))
        if SupervisedRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
            cancel_requested=True, deadline_at=Least(Coalesce(F("deadline_at"), by), by)
        ):
            return RunStatus.RUNNING
    return None


def retry_now(run_id: int) -> bool:
    """Operator action: a new attempt for a run, whatever its state except running.

    A terminal run is reopened: the only way a terminal status ever changes.
    """
    with transaction.atomic():
        run = SupervisedRun.objects.select_for_update().filter(pk=run_id).exclude(status=RunStatus.RUNNING).first()
        if run is None:
            return False
        next_attempt = run.attempt + 1
        values = _requeue_values(run, next_attempt)
        values.update(max_attempts=max(run.max_attempts, next_attempt), cancel_requested=False, finished_at=None)
        if not SupervisedRun.objects.filter(pk=run.pk, attempt=run.attempt, status=run.status).update(**values):
            return False
        RunAttempt.objects.create(run_id=run.pk, number=next_attempt, task_id=values["task_id"])
        publisher = Publisher()
        _publish_on_commit(run, next_attempt, values["task_id"], publisher)
        transaction.on_commit(publisher.close)
    return True


def mark_resolved(run_id: int, by: str = "") -> bool:
    """Operator action: acknowledge a failed, dead or missed run ("someone looked at it").

    The status is kept (it says what happened); ``resolved_at``/``resolved_by`` record who closed
    the incident. Only an open incident can be resolved: a run resolved and then retried, which ends
    badly again, finishes after its ``resolved_at`` and so is open again. False when nothing changed.
    """
    from .states import INCIDENT_STATUSES

    return bool(
        SupervisedRun.objects.filter(pk=run_id, status__in=INCIDENT_STATUSES)
        .filter(Q(resolved_at__isnull=True) | Q(resolved_at__lt=F("finished_at")))
        .update(resolved_at=Now(), resolved_by=by[:150])
    )


# --------------------------------------------------------------------------- retention


def prune_runs(older_than: timedelta, keep_last: int = 10, batch_size: int = 1000, dry_run: bool = False) -> int:
    """Delete terminal runs finished more than ``older_than`` ago, in batches (attempts cascade).

    The last ``keep_last`` runs of every schedule are kept whatever their age, so the admin always
    shows a schedule's recent history. Active runs are never touched. Returns the number of runs.
    """
    from django.db.models import Window
    from django.db.models.functions import RowNumber

    from .states import TERMINAL_STATUSES

    keep: set[int] = set()
    if keep_last:
        ranked = (
            SupervisedRun.objects.filter(periodic_task__isnull=False)
            .annotate(rank=Window(RowNumber(), partition_by=[F("periodic_task_id")], order_by=F("id").desc()))
            .filter(rank__lte=keep_last)
            .values_list("pk", flat=True)
        )
        keep = set(ranked)
    old = SupervisedRun.objects.filter(status__in=TERMINAL_STATUSES, finished_at__lt=_after(-older_than))
    if dry_run:
        return old.exclude(pk__in=keep).count()
    deleted = 0
    while True:
        ids = list(old.exclude(pk__in=keep).order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        with transaction.atomic():
            RunAttempt.objects.filter(run_id__in=ids).delete()
            SupervisedRun.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
