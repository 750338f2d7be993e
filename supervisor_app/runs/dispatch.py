"""Recording runs: one row per logical run, published after commit.

A run is recorded before anything is published (``transaction.on_commit``): if the transaction rolls
back nothing is sent, and if the broker is down the run stays ``queued`` for the supervisor to
publish later. A schedule slot is recorded at most once, by the ``(periodic_task, scheduled_for)``
unique constraint: whoever inserts it publishes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from django.db import IntegrityError, connections, router, transaction
from django.db.models import DateTimeField, Model
from django.db.models.functions import Now
from django.db.models.sql import InsertQuery
from django.utils import timezone

from ..broker import Message, run_options
from ..conf import supervisor_settings
from ..core.ids import new_task_id
from ..core.policies import RunPolicy
from ..core.states import RunStatus
from ..core.workflow import has_continuation
from ..db import after, convert, insert_row, seconds
from ..models import AdoptedMessage, SupervisedRun
from . import unique
from .arrays import unnest_insert
from .publishing import publish_batch_on_commit


def check_json(task_name: str, args: Any, kwargs: Any, where: str = "", limit: Any = False) -> None:
    """Refuse arguments that would not survive the JSON round trip, before anything is recorded.
    ``where`` names the call in the message (``"call 3 of dispatch_many"``); ``limit``: the
    ``SUPERVISOR_MAX_ARGS_BYTES`` value when the caller read it already."""
    label = f"{task_name} ({where})" if where else task_name
    try:
        encoded = json.dumps([args, kwargs], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{label}: arguments of a supervised task must be JSON-serialisable ({exc})") from exc
    if limit is False:
        limit = supervisor_settings.MAX_ARGS_BYTES
    if limit is not None:
        size = len(encoded.encode())
        if size > limit:
            raise ValueError(
                f"{label}: arguments are {size} bytes of JSON, over SUPERVISOR_MAX_ARGS_BYTES ({limit}); "
                "pass a reference (a primary key, a file name) instead of the data"
            )


def _queued_values(policy: RunPolicy) -> dict[str, Any]:
    """The supervision values every new run records from its policy."""
    return dict(
        max_attempts=policy.max_attempts,
        lease_timeout=timedelta(seconds=policy.lease_timeout),
        start_timeout=timedelta(seconds=policy.start_timeout),
        max_runtime=seconds(policy.max_runtime),
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
    hold: bool = False,
    last_error: str = "",
    unique_key: str | None = None,
    unique_for: float | None = None,
    task_id: str | None = None,
) -> SupervisedRun | None:
    """Record a run and, after commit, publish its first attempt.

    For a schedule slot, returns None when the slot is already recorded (another beat won), in which
    case nothing is published. With ``countdown`` the run waits, recorded, and the supervisor
    publishes it when due (no ETA held in a worker's memory). ``publish=False``: the first attempt's
    message exists already (a worker adopting a message that carried no run); the supervisor
    publishes it again only if it is not started within the start timeout. ``adopted_message_id``
    (the adopted message's Celery id, with ``publish=False``) is unique: if a run was recorded for
    that message already (the broker redelivered it), ``IntegrityError`` is raised, nothing written.
    ``status``: a slot recorded as already decided (``missed``, ``skipped``) is finished at once,
    with ``last_error`` saying why. ``hold``: a ``queue_one`` slot waiting behind its schedule's active
    run, queued with no next check and unpublished until the schedule phase releases it.
    ``unique_key`` (an ad-hoc run): when another run of the task holds that key, nothing is recorded or
    published and that run is returned, ``deduplicated`` set; ``unique_for`` seconds: the new run holds
    its key that long, whatever its status (see :mod:`.unique`). ``task_id``: the run's Celery id (a
    new UUID by default); when a run with that id is recorded already (a chain step dispatched again,
    a caller retrying its dispatch), nothing is recorded or published and that run is returned,
    ``deduplicated`` set.
    """
    args = list(args or [])
    kwargs = dict(kwargs or {})
    check_json(task_name, args, kwargs)
    kept = run_options(options)
    delay = countdown or 0.0
    if status == RunStatus.QUEUED and not hold:
        next_check_at: Any = after(timedelta(seconds=delay or policy.start_timeout))
    else:
        next_check_at = None
    fields: dict[str, Any] = dict(
        task_name=task_name,
        args=args,
        kwargs=kwargs,
        options=kept,
        status=status,
        periodic_task_id=periodic_task_id,
        scheduled_for=scheduled_for,
        # publish_count is optimistic: a failed publish resets it (RunPublisher.unsent).
        publish_count=0 if delay or hold or status != RunStatus.QUEUED else 1,
        next_check_at=next_check_at,
        last_error=last_error,
        task_id=str(task_id or new_task_id())[:255],
        follow_up=has_continuation(kept),
        created_at=timezone.now(),  # what auto_now_add would set, on the instance returned too
        **_queued_values(policy),
    )
    if status != RunStatus.QUEUED:
        fields["finished_at"] = Now()
    using = router.db_for_write(SupervisedRun)
    if periodic_task_id is not None:
        try:
            with transaction.atomic(using=using):
                run = SupervisedRun.objects.create(**fields)
        except IntegrityError:
            return None  # the slot is recorded already: whoever inserted it publishes it
    elif adopted_message_id is not None:
        # Its own transaction, so a conflict (IntegrityError, raised) leaves the caller's intact and
        # records no run.
        with transaction.atomic(using=using):
            run = SupervisedRun.objects.create(**fields)
            AdoptedMessage.objects.create(message_id=adopted_message_id, run=run)
    elif task_id is not None:
        run = _insert_named(fields, unique_key, unique_for, using)
    else:
        run = _insert_ad_hoc(fields, unique_key, unique_for, using)
    if run.deduplicated:
        return run
    if status == RunStatus.QUEUED and not delay and not hold and publish:
        # Published from what we just wrote: no read-back, so a dispatch stays one statement.
        publish_batch_on_commit([Message(run.pk, 1, task_name, args, kwargs, kept, run.task_id)])
    return run


def _insert_ad_hoc(
    fields: dict[str, Any], unique_key: str | None, unique_for: float | None, using: str
) -> SupervisedRun:
    """Insert an ad-hoc run; a unique one (``unique_key``) only if no run holds its key (then the
    holder is returned, ``deduplicated``)."""
    if unique_key is None:
        pk = insert_row(SupervisedRun, fields, using)
        assert pk is not None  # no conflict clause: an insert either returns its id or raises
        return _inserted(pk, fields, using)
    fields.update(unique_key=unique_key, **unique.window_values(unique_for))
    pk, created = unique.insert_or_find(fields, using)
    if not created:
        return unique.holder(pk, str(fields["task_name"]), unique_key)
    return _inserted(pk, fields, using)


def _insert_named(
    fields: dict[str, Any], unique_key: str | None, unique_for: float | None, using: str
) -> SupervisedRun:
    """Insert an ad-hoc run whose Celery id the caller named (a canvas's frozen id, a dispatch
    retried). When a run has that id already, that run is returned, ``deduplicated``: nothing is
    recorded and the caller's transaction stays usable."""
    if unique_key is None:
        # One statement, no savepoint: a group's members come this way, one by one.
        pk = unique.insert_unless_held(fields, using, unique.task_id_target(using))
        if pk is not None:
            return _inserted(pk, fields, using)
    else:
        try:
            with transaction.atomic(using=using):  # a savepoint: either the id or the key may be held
                return _insert_ad_hoc(fields, unique_key, unique_for, using)
        except IntegrityError:
            existing = _holding_task_id(fields["task_id"], using)
            if existing is None:
                raise
            return existing
    existing = _holding_task_id(fields["task_id"], using)
    if existing is None:  # the run that held it was deleted between the two statements
        raise IntegrityError(f"task id {fields['task_id']!r} was held by a run no longer there; nothing recorded")
    return existing


def _holding_task_id(task_id: str, using: str) -> SupervisedRun | None:
    existing = SupervisedRun.objects.using(using).filter(task_id=task_id).first()
    if existing is not None:
        existing.deduplicated = True
    return existing


def _inserted(pk: int, fields: dict[str, Any], using: str) -> SupervisedRun:
    """The run just inserted with ``fields`` under ``pk``, not read back."""
    run = SupervisedRun(pk=pk, **fields)
    run._state.adding, run._state.db = False, using
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
    #: The run's Celery id (drawn by :func:`create_slot_runs`).
    task_id: str = ""


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
    # The kept options once per slot (an expiry in seconds becomes one absolute time for row and message).
    ordered = sorted(
        (replace(s, options=run_options(s.options), task_id=s.task_id or new_task_id()) for s in wanted),
        key=lambda s: (s.periodic_task_id, s.scheduled_for),
    )
    size = max(1, min(batch_size, conn.ops.bulk_batch_size(fields, ordered)))
    created = []
    for start in range(0, len(ordered), size):
        with transaction.atomic(using=using):
            inserted = _insert_slots(ordered[start : start + size], fields, using)
            messages = [Message(pk, 1, s.task_name, s.args, s.kwargs, s.options, s.task_id) for pk, s in inserted]
            if messages:
                publish_batch_on_commit(messages)
        created += inserted
    return created


def _slot_values(s: SlotRun) -> dict[str, Any]:
    """The fields of a queued slot run that differ from the model's defaults (as in create_run)."""
    return dict(
        task_name=s.task_name,
        args=list(s.args),
        kwargs=dict(s.kwargs),
        options=dict(s.options),
        status=RunStatus.QUEUED,
        periodic_task_id=s.periodic_task_id,
        scheduled_for=s.scheduled_for,
        publish_count=1,  # optimistic, as in create_run: a failed publish resets it
        task_id=s.task_id,
        **_queued_values(s.policy),
    )


def _insert_slots(chunk: Sequence[SlotRun], fields: list[Any], using: str) -> list[tuple[int, SlotRun]]:
    conn = connections[using]
    qn = conn.ops.quote_name
    rows = [_slot_values(s) for s in chunk]
    if conn.vendor == "postgresql":
        sql, params = unnest_insert(SupervisedRun, rows, fields, conn)
    else:
        # now() + start_timeout, on the database's clock, as create_run does.
        objs: list[Model] = [SupervisedRun(**row, next_check_at=after(row["start_timeout"])) for row in rows]
        query = InsertQuery(SupervisedRun)
        query.insert_values(fields, objs)
        [(sql, params)] = query.get_compiler(using=using).as_sql()
    task, slot = qn("periodic_task_id"), qn("scheduled_for")
    # The target and condition of the supervisor_run_unique_slot constraint: no other conflict is hidden.
    sql += f" ON CONFLICT ({task}, {slot}) WHERE {task} IS NOT NULL DO NOTHING RETURNING {qn('id')}, {task}, {slot}"
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        returned = cursor.fetchall()
    field = cast(DateTimeField, SupervisedRun._meta.get_field("scheduled_for"))
    by_key = {(s.periodic_task_id, s.scheduled_for): s for s in chunk}
    return [(pk, by_key[(task_id, convert(field, raw, SupervisedRun, conn))]) for pk, task_id, raw in returned]


# --------------------------------------------------------------------------- bulk dispatch

#: Rows per statement of a bulk dispatch on PostgreSQL (each statement's arrays are built in memory).
BULK_BATCH_SIZE = 5000


class Dispatched(NamedTuple):
    """What a bulk dispatch returns per call: the run that holds it and its handle (attempt 1's task
    id); ``deduplicated``: a unique run that held the call's key already (nothing recorded)."""

    run_id: int
    task_id: str
    deduplicated: bool = False


def create_runs(
    task_name: str,
    calls: Sequence[tuple[Sequence[Any] | None, Mapping[str, Any] | None]],
    policy: RunPolicy,
    *,
    options: Mapping[str, Any] | None = None,
    countdown: float | None = None,
    unique_keys: Sequence[str | None] | None = None,
    unique_for: float | None = None,
    batch_size: int = BULK_BATCH_SIZE,
) -> list[Dispatched]:
    """Record many ad-hoc runs of one task, each as :func:`create_run` would, and after commit publish
    them through one producer.

    Every call is checked (``check_json``) before anything is written: one bad call refuses the
    whole dispatch, naming the call. The options (kept once: one absolute expiry for every run), the
    policy and ``countdown`` are shared. On PostgreSQL the runs go in one ``INSERT … SELECT … FROM
    unnest(…) RETURNING id`` per ``batch_size`` rows, in the caller's transaction (or one of their
    own: all or nothing); a backend that can return rows from a bulk insert gets a multi-row
    ``INSERT … RETURNING``; any other, :func:`create_run` per call. A call with a unique key (in
    ``unique_keys``, in call order) is recorded by :func:`create_run` on its own (one insert, or the
    holder's id, ``deduplicated``), as ``apply_async`` would. Returns one :class:`Dispatched` per
    call, in call order.
    """
    limit = supervisor_settings.MAX_ARGS_BYTES
    prepared: list[tuple[list[Any], dict[str, Any]]] = []
    for index, call in enumerate(calls):
        args, kwargs = _call(task_name, index, call)
        check_json(task_name, args, kwargs, where=f"call {index} of dispatch_many", limit=limit)
        prepared.append((args, kwargs))
    if unique_keys is not None and len(unique_keys) != len(prepared):
        raise ValueError(f"{task_name}: {len(unique_keys)} unique keys for {len(prepared)} calls")
    kept = run_options(options)
    delay = countdown or 0.0
    publish = not delay
    using = router.db_for_write(SupervisedRun)
    conn = connections[using]
    out: list[Dispatched | None] = [None] * len(prepared)
    plain = [i for i in range(len(prepared)) if unique_keys is None or unique_keys[i] is None]
    with transaction.atomic(using=using, savepoint=False):
        for index in range(len(prepared)) if unique_keys is not None else ():
            key = unique_keys[index]  # type: ignore[index]
            if key is None:
                continue
            args, kwargs = prepared[index]
            run = create_run(
                task_name,
                args,
                kwargs,
                policy,
                options=kept,
                countdown=countdown,
                publish=False,
                unique_key=key,
                unique_for=unique_for,
            )
            assert run is not None  # only schedule slots can be refused
            out[index] = Dispatched(run.pk, run.task_id, run.deduplicated)
        shared = dict(
            task_name=task_name,
            options=kept,
            status=RunStatus.QUEUED,
            publish_count=0 if delay else 1,  # optimistic, as in create_run
            **_queued_values(policy),
        )
        next_check = timedelta(seconds=delay or policy.start_timeout)
        if conn.vendor == "postgresql":
            insert = _insert_unnest
        elif conn.features.can_return_rows_from_bulk_insert:
            insert = _insert_values
        else:
            insert = _insert_each
        size = batch_size if conn.vendor == "postgresql" else _values_batch_size(conn)
        for start in range(0, len(plain), size):
            chunk = plain[start : start + size]
            task_ids = [new_task_id() for _ in chunk]
            ids = insert(
                [(*prepared[i], tid) for i, tid in zip(chunk, task_ids, strict=True)], shared, next_check, using
            )
            for index, pk, tid in zip(chunk, ids, task_ids, strict=True):
                out[index] = Dispatched(pk, tid)
        if publish:
            messages = [
                Message(d.run_id, 1, task_name, prepared[i][0], prepared[i][1], kept, d.task_id)
                for i, d in enumerate(out)
                if d is not None and not d.deduplicated
            ]
            if messages:
                publish_batch_on_commit(messages)
    return [d for d in out if d is not None]


def _call(task_name: str, index: int, call: Any) -> tuple[list[Any], dict[str, Any]]:
    """One ``(args, kwargs)`` pair of a bulk dispatch, as lists and dicts."""
    try:
        args, kwargs = call
    except (TypeError, ValueError):
        raise TypeError(
            f"{task_name}: call {index} of dispatch_many must be an (args, kwargs) pair, not {call!r}"
        ) from None
    if args is not None and (isinstance(args, str | bytes | Mapping) or not isinstance(args, Sequence)):
        raise TypeError(f"{task_name}: call {index} of dispatch_many: args must be a list or tuple, not {args!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"{task_name}: call {index} of dispatch_many: kwargs must be a mapping, not {kwargs!r}")
    return list(args or []), dict(kwargs or {})


def _bulk_fields() -> list[Any]:
    meta = SupervisedRun._meta
    return [f for f in meta.local_concrete_fields if f is not meta.pk]


def _insert_unnest(
    calls: Sequence[tuple[list[Any], dict[str, Any], str]], shared: Mapping[str, Any], next_check: timedelta, using: str
) -> list[int]:
    conn = connections[using]
    rows = [{"args": args, "kwargs": kwargs, "task_id": task_id} for args, kwargs, task_id in calls]
    sql, params = unnest_insert(SupervisedRun, rows, _bulk_fields(), conn, shared=shared, next_check=next_check)
    with conn.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {conn.ops.quote_name('id')}", params)
        return [int(pk) for (pk,) in cursor.fetchall()]


def _values_batch_size(conn: Any) -> int:
    """Rows per multi-row ``VALUES`` statement: as many as the backend's parameter limit allows."""
    return max(1, min(1000, conn.ops.bulk_batch_size(_bulk_fields(), [None] * 1000)))


def _insert_values(
    calls: Sequence[tuple[list[Any], dict[str, Any], str]], shared: Mapping[str, Any], next_check: timedelta, using: str
) -> list[int]:
    """A multi-row ``INSERT … VALUES … RETURNING id`` (SQLite ≥ 3.35 and others)."""
    conn = connections[using]
    objs: list[Model] = [
        SupervisedRun(args=args, kwargs=kwargs, task_id=task_id, next_check_at=after(next_check), **shared)
        for args, kwargs, task_id in calls
    ]
    query = InsertQuery(SupervisedRun)
    query.insert_values(_bulk_fields(), objs)
    [(sql, params)] = query.get_compiler(using=using).as_sql()
    with conn.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {conn.ops.quote_name('id')}", params)
        return [int(pk) for (pk,) in cursor.fetchall()]


def _insert_each(
    calls: Sequence[tuple[list[Any], dict[str, Any], str]], shared: Mapping[str, Any], next_check: timedelta, using: str
) -> list[int]:
    """One ``INSERT`` per run: a backend that can't return the ids of a multi-row insert."""
    ids = []
    for args, kwargs, task_id in calls:
        run = SupervisedRun.objects.using(using).create(
            args=args, kwargs=kwargs, task_id=task_id, next_check_at=after(next_check), **shared
        )
        ids.append(run.pk)
    return ids
