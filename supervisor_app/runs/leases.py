"""The agent's writes: claim an attempt, renew its lease, finish it, all fenced by the attempt number.

Every write here is ``UPDATE … WHERE id = ? AND attempt = ? AND lease_token = ? AND status = <the
move's source>``: a delivery that lost the race, a superseded attempt or a zombie whose lease expired
matches no row and writes nothing. The token is drawn by the agent for each claim, so the fence is
unique per claim even when two agents claim the same attempt number (a claim forgotten by a database
crash under asynchronous commit, then published again).

On PostgreSQL the claim and the success are one statement each (a CTE updating the run and its
attempt row), so a no-op run costs three statements: dispatch, claim, finish. The claim and the
single success call functions of migration 0013 (``supervisor_claim_v1``, ``supervisor_succeed_v1``),
whose plans PostgreSQL keeps per session: sent as text, the statement was planned at every call, and
planning cost more than executing. Until that migration is applied, the same statements go as text
(``_CLAIM_PG``, ``_SUCCEED_PG``, which the functions mirror). Never a
multi-statement string: psycopg2, psycopg 3 with server-side binding (prepared statements) and
PgBouncer in transaction mode all accept one statement. Statuses come from the moves of
``core.states``: parameters of the text statements, literals of the two per-task calls (sent through
the driver's own cursor, :func:`~supervisor_app.db.driver_cursor`, when nothing observes Django's).
"""

from __future__ import annotations

import json
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import reduce
from typing import Any

from django.db import IntegrityError, ProgrammingError, connections, router, transaction
from django.db.models import Case, DateTimeField, F, Q, When
from django.db.models.functions import Now

from .. import signals
from ..conf import supervisor_settings
from ..core.retry import FailureDecision
from ..core.states import CLAIM, FAILURE_MOVES, STOP_CANCELLED, SUCCEED, AttemptOutcome, RunStatus
from ..db import (
    ASYNC_COMMIT_CONDITION,
    after,
    driver_cursor,
    single_statement_connection,
    undefined_function,
    update_returning,
)
from ..models import RunAttempt, SupervisedRun, SupervisionPolicy
from . import rows
from .notify import send_on_commit


@dataclass(frozen=True)
class Claim:
    """What an agent learns when it wins the claim of an attempt."""

    run_id: int
    attempt: int
    max_attempts: int
    lease_timeout: float
    checkpoint: Any
    #: The fence of this claim: every later write of the agent carries it.
    token: str = ""


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool = False


_CLAIM_PG = """
WITH {free}claimed AS (
    UPDATE {run} SET status = %(target)s, worker = %(worker)s, started_at = now(), heartbeat_at = now(),
        lease_expires_at = now() + lease_timeout,
        deadline_at = CASE WHEN max_runtime IS NULL THEN NULL ELSE now() + max_runtime END,
        next_check_at = NULL, finished_at = NULL,
        task_id = COALESCE(NULLIF(%(task_id)s::text, ''), task_id), lease_token = %(token)s::uuid{slot_set}
    WHERE id = %(run_id)s AND attempt = %(attempt)s
        AND (status = %(source)s{slot_free} OR (status = %(target)s AND lease_token = %(token)s::uuid)){async_commit}
    RETURNING id, attempt, max_attempts, lease_timeout, checkpoint
), started AS (
    INSERT INTO {attempt} (run_id, number, task_id, worker, outcome, created_at, started_at, error, traceback)
    SELECT id, attempt, %(task_id)s, %(worker)s, %(outcome)s, now(), now(), '', '' FROM claimed
    ON CONFLICT (run_id, number) DO UPDATE
        SET task_id = EXCLUDED.task_id, worker = EXCLUDED.worker, outcome = EXCLUDED.outcome, started_at = now()
)
SELECT max_attempts, lease_timeout, checkpoint::text FROM claimed
"""

#: A task's concurrency limit: the claim also takes the lowest free slot of the key, and is refused
#: when none is free. Two claims that pick the same slot at once collide on the unique constraint
#: ``supervisor_run_one_per_slot``: the second fails and retries (see :func:`claim`). A claim
#: retried by the same delivery keeps its slot.
_LIMITED = {
    "free": """free AS (
    SELECT s.n FROM generate_series(0, %(limit)s::integer - 1) AS s(n)
    WHERE NOT EXISTS (
        SELECT 1 FROM {run} AS o
        WHERE o.concurrency_key = %(ckey)s AND o.status = %(target)s AND o.concurrency_slot = s.n
    )
    LIMIT 1
), """,
    "slot_set": """, concurrency_key = %(ckey)s, concurrency_limit = %(limit)s,
        concurrency_slot = CASE WHEN status = %(target)s THEN concurrency_slot ELSE (SELECT n FROM free) END""",
    "slot_free": " AND EXISTS (SELECT 1 FROM free)",
}
_UNLIMITED = {"free": "", "slot_set": "", "slot_free": ""}

_SUCCEED_PG = """
WITH finished AS (
    UPDATE {run} SET status = %(target)s, finished_at = now(), lease_expires_at = NULL, deadline_at = NULL,
        last_error = ''{result_set}
    WHERE id = %(run_id)s AND attempt = %(attempt)s AND status = %(source)s
        AND lease_token IS NOT DISTINCT FROM COALESCE(%(token)s::uuid, lease_token){async_commit}
    RETURNING id, attempt
), ended AS (
    UPDATE {attempt} AS a SET outcome = %(outcome)s, ended_at = now()
    FROM finished WHERE a.run_id = finished.id AND a.number = finished.attempt
)
SELECT count(*) FROM finished
"""

#: Many successes in one statement (the worker's deferred completions): the pairs and tokens travel
#: as arrays, so the text and its plan do not grow with the batch.
_SUCCEED_MANY_PG = """
WITH finished AS (
    UPDATE {run} AS r SET status = %(target)s, finished_at = now(), lease_expires_at = NULL, deadline_at = NULL,
        last_error = '', result = l.result::jsonb
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(tokens)s::uuid[], %(results)s::text[])
        AS l(id, attempt, token, result)
    WHERE r.id = l.id AND r.attempt = l.attempt AND r.status = %(source)s
        AND r.lease_token IS NOT DISTINCT FROM COALESCE(l.token, r.lease_token){async_commit}
    RETURNING r.id, r.attempt
), ended AS (
    UPDATE {attempt} AS a SET outcome = %(outcome)s, ended_at = now()
    FROM finished WHERE a.run_id = finished.id AND a.number = finished.attempt
)
SELECT id, attempt FROM finished
"""


def _literal(value: str) -> str:
    """A status of ``core.states`` as an SQL literal, for the per-task calls below: constants cost
    the client nothing to send, parameters cost a conversion each. Only plain words qualify."""
    if not value.replace("_", "").isalpha():
        raise ValueError(f"not a status: {value!r}")
    return f"'{value}'"


def _call(select: str, arguments: str, *constants: str) -> dict[bool, str]:
    """``select(arguments, constants…, async)``, one text for each ``async`` setting."""
    fixed = ", ".join(_literal(c) for c in constants)
    return {flag: f"{select}({arguments}, {fixed}, {str(flag).lower()})" for flag in (False, True)}


#: The same claim and success, as calls of migration 0013's functions (the process falls back to the
#: text statements above while the functions are missing); positional, through the driver's cursor.
_CLAIM_CALL = _call(
    "SELECT * FROM supervisor_claim_v1",
    "%s::bigint, %s::integer, %s::text, %s::text, %s::uuid",
    CLAIM.source,
    CLAIM.target,
    AttemptOutcome.RUNNING.value,
)
_SUCCEED_CALL = _call(
    "SELECT supervisor_succeed_v1",
    "%s::bigint, %s::integer, %s::uuid",
    SUCCEED.source,
    SUCCEED.target,
    AttemptOutcome.SUCCEEDED.value,
)


class _Functions:
    """Whether this process found migration 0013's functions (None: not tried yet)."""

    present: bool | None = None


def _execute(
    conn: Any, call: dict[bool, str], arguments: Sequence[Any], fallback: Callable[[], tuple[str, dict[str, Any]]]
) -> Any:
    """Run the function ``call`` with ``arguments``, or the statement and parameters ``fallback()``
    gives while the function is missing; returns the cursor's first row."""
    if _Functions.present is not False:
        try:
            with driver_cursor(conn) as cursor:
                cursor.execute(call[bool(supervisor_settings.raw("ASYNC_AGENT_COMMIT"))], arguments)
                row = cursor.fetchone()
            _Functions.present = True
            return row
        except ProgrammingError as exc:
            if not undefined_function(exc) or conn.in_atomic_block:
                raise
            _Functions.present = False  # autocommit: the failed call left nothing behind
    with conn.cursor() as cursor:
        cursor.execute(*fallback())
        return cursor.fetchone()


_RENEW_PG = """
UPDATE {run} AS r SET heartbeat_at = now(), lease_expires_at = now() + r.lease_timeout
FROM unnest(%s::bigint[], %s::integer[], %s::uuid[]) AS l(id, attempt, token)
WHERE r.id = l.id AND r.attempt = l.attempt AND r.status = %s
    AND r.lease_token IS NOT DISTINCT FROM COALESCE(l.token, r.lease_token){async_commit}
RETURNING r.id, r.attempt, r.cancel_requested
"""


def _using() -> str:
    return router.db_for_write(SupervisedRun)


def _sql(template: str, conn: Any, **parts: str) -> str:
    """An agent statement, without waiting for its WAL flush when ``SUPERVISOR_ASYNC_AGENT_COMMIT`` allows.

    Safe because every agent write is recoverable: if PostgreSQL crashes and forgets the last
    fraction of a second of them, a forgotten claim looks queued (republished, and the unique lease
    token fences the forgotten claimant), a forgotten renewal or finish looks like an expired lease
    (recovered). Dispatch never does this: a recorded run must survive a crash.
    """
    enabled = bool(supervisor_settings.raw("ASYNC_AGENT_COMMIT"))
    names = {
        "run": conn.ops.quote_name(SupervisedRun._meta.db_table),
        "attempt": conn.ops.quote_name(RunAttempt._meta.db_table),
    }
    parts = {key: value.format(**names) for key, value in parts.items()}
    return template.format(**names, **parts, async_commit=ASYNC_COMMIT_CONDITION if enabled else "")


def _token(token: str | uuid.UUID | None) -> str | None:
    return None if token is None else str(token)


def claim(
    run_id: int,
    attempt: int,
    worker: str,
    task_id: str = "",
    token: str | None = None,
    limit: tuple[str, int] | None = None,
) -> Claim | None:
    """queued → running for attempt ``attempt``; None when another delivery or attempt has it, or
    when ``limit`` (a concurrency key and its limit) has no free slot (:func:`~.concurrency.wait_for_slot`
    then tells which).

    ``token`` (drawn here when not given) fences every later write of this claim. Retrying with the
    same token is idempotent: a claim whose reply was lost (the connection dropped after the commit)
    is granted again to the same call instead of being refused, which would burn the attempt.

    On PostgreSQL one statement claims the run and starts the attempt's row. Elsewhere, two in a
    transaction.
    """
    token = token or str(uuid.uuid4())
    if limit is None:
        return _claim(run_id, attempt, worker, task_id, token, None)
    for _ in range(limit[1] + 2):
        # Two claims that took the same free slot at once: the later one fails on the slot's unique
        # constraint, wrote nothing, and looks again (another slot, or none left).
        try:
            return _claim(run_id, attempt, worker, task_id, token, limit)
        except IntegrityError:
            continue
    return None


def _claim(
    run_id: int, attempt: int, worker: str, task_id: str, token: str, limit: tuple[str, int] | None
) -> Claim | None:
    conn = single_statement_connection(_using())
    if conn is not None:
        worker, task_id = worker[:255], task_id[:255]

        def statement(parts: dict[str, str]) -> tuple[str, dict[str, Any]]:
            params = {
                "ckey": limit[0] if limit else "",
                "limit": limit[1] if limit else 0,
                "token": token,
                "run_id": run_id,
                "attempt": attempt,
                "worker": worker,
                "task_id": task_id,
                "source": CLAIM.source,
                "target": CLAIM.target,
                "outcome": AttemptOutcome.RUNNING.value,
            }
            return _sql(_CLAIM_PG, conn, **parts), params

        if limit is None:
            arguments = (run_id, attempt, worker, task_id, token)
            row = _execute(conn, _CLAIM_CALL, arguments, lambda: statement(_UNLIMITED))
        else:
            with conn.cursor() as cursor:
                cursor.execute(*statement(_LIMITED))
                row = cursor.fetchone()
        if row is None:
            return None
        checkpoint = None if row[2] is None else json.loads(row[2])
        return Claim(run_id, attempt, int(row[0]), row[1].total_seconds(), checkpoint, token)
    values: dict[str, Any] = dict(
        status=CLAIM.target,
        worker=worker[:255],
        started_at=Now(),
        heartbeat_at=Now(),
        lease_expires_at=after(F("lease_timeout")),
        deadline_at=Case(
            When(max_runtime__isnull=False, then=after(F("max_runtime"))),
            default=None,
            output_field=DateTimeField(),
        ),
        next_check_at=None,
        finished_at=None,
        lease_token=token,
    )
    if task_id:
        values["task_id"] = task_id[:255]
    claimable = SupervisedRun.objects.filter(
        Q(status=CLAIM.source) | Q(status=CLAIM.target, lease_token=token), pk=run_id, attempt=attempt
    )
    with transaction.atomic():
        held = claimable.filter(status=CLAIM.target).exists()  # the same delivery, retrying its claim
        if limit is not None:
            slot = None if held else _free_slot(*limit)
            if not held and slot is None:
                return None
            values.update(concurrency_key=limit[0], concurrency_limit=limit[1])
            if slot is not None:
                values["concurrency_slot"] = slot
        claimed = update_returning(claimable, ["max_attempts", "lease_timeout", "checkpoint"], **values)
        if not claimed:
            return None
        started = dict(worker=worker[:255], task_id=task_id[:255], outcome=AttemptOutcome.RUNNING, started_at=Now())
        # Attempt 1 has no row yet, unless this claim is retried or a forgotten claim made it; later
        # attempts got a pending row when the supervisor or an operator queued them.
        if not RunAttempt.objects.filter(run_id=run_id, number=attempt).update(**started):
            RunAttempt.objects.create(run_id=run_id, number=attempt, **started)
    row = claimed[0]
    return Claim(run_id, attempt, row["max_attempts"], row["lease_timeout"].total_seconds(), row["checkpoint"], token)


def _free_slot(key: str, limit: int) -> int | None:
    """The lowest slot of ``key`` no running run holds (the unique constraint settles any race)."""
    taken = set(
        SupervisedRun.objects.filter(
            concurrency_key=key, status=RunStatus.RUNNING, concurrency_slot__isnull=False
        ).values_list("concurrency_slot", flat=True)
    )
    return next((n for n in range(limit) if n not in taken), None)


def renew_leases(
    leases: Iterable[tuple[int, int]], tokens: Mapping[tuple[int, int], str] | None = None
) -> dict[tuple[int, int], LeaseState]:
    """Renew every lease a worker process holds in one statement.

    ``tokens`` gives each lease's claim token (the fence); a lease without one is matched by
    attempt alone. Returns the state of each lease asked for: ``held=False`` when the attempt was
    superseded, finished or claimed by another agent (the agent must stop), ``cancel_requested``
    when an operator asked to cancel.
    """
    wanted = list(leases)
    if not wanted:
        return {}
    tokens = tokens or {}
    conn = connections[_using()]
    held: dict[tuple[int, int], bool]
    if conn.vendor == "postgresql":
        # One statement whatever the number of leases: the (id, attempt) pairs travel as two arrays,
        # so the SQL text and its plan do not grow with N (an OR of N conditions would).
        with conn.cursor() as cursor:
            params: list[Any] = [
                [w[0] for w in wanted],
                [w[1] for w in wanted],
                [_token(tokens.get(w)) for w in wanted],
                RunStatus.RUNNING.value,
            ]
            cursor.execute(_sql(_RENEW_PG, conn), params)
            held = {(int(a), int(b)): bool(c) for a, b, c in cursor.fetchall()}
    else:
        # Fenced by (id, attempt): a zombie's renewal matches no row and touches nothing.
        match = reduce(operator.or_, (_fence(key, tokens.get(key)) for key in wanted))
        renewed = update_returning(
            SupervisedRun.objects.filter(match, status=RunStatus.RUNNING),
            ["id", "attempt", "cancel_requested"],
            heartbeat_at=Now(),
            lease_expires_at=after(F("lease_timeout")),
        )
        held = {(r["id"], r["attempt"]): bool(r["cancel_requested"]) for r in renewed}
    return {key: LeaseState(key in held, bool(held.get(key, False))) for key in wanted}


def _fence(key: tuple[int, int], token: str | None) -> Q:
    """The row of attempt ``key`` as this claim holds it (any claim of that attempt without a token)."""
    q = Q(pk=key[0], attempt=key[1])
    return q if token is None else q & Q(lease_token=token)


def heartbeat(
    run_id: int, attempt: int, progress: Any = None, checkpoint: Any = None, token: str | None = None
) -> LeaseState:
    """An explicit heartbeat from task code, optionally saving progress and a checkpoint."""
    values: dict[str, Any] = dict(heartbeat_at=Now(), lease_expires_at=after(F("lease_timeout")))
    if progress is not None:
        values["progress"] = progress
    if checkpoint is not None:
        json.dumps(checkpoint)  # a checkpoint that can't be stored is the caller's bug: fail loudly
        values["checkpoint"] = checkpoint
    renewed = update_returning(
        SupervisedRun.objects.filter(_fence((run_id, attempt), token), status=RunStatus.RUNNING),
        ["cancel_requested"],
        **values,
    )
    if not renewed:
        return LeaseState(False)
    return LeaseState(True, bool(renewed[0]["cancel_requested"]))


def schedule_backoff(run_id: int) -> tuple[float | None, float | None]:
    """Backoff and cap (seconds) set by the supervision policy of the run's schedule, if any."""
    row = (
        SupervisionPolicy.objects.filter(periodic_task__supervised_runs__pk=run_id)
        .values_list("backoff", "backoff_max")
        .first()
    )
    if row is None:
        return None, None
    return tuple(None if d is None else d.total_seconds() for d in row)  # type: ignore[return-value]


#: ``_SUCCEED_PG``'s result: the text without one is the function's (a run that returned None).
_RESULT_SET = ", result = %(result)s::jsonb"


def finish_success(
    run_id: int, attempt: int, worker: str = "", token: str | None = None, result: str | None = None
) -> bool:
    """running → succeeded, fenced by the attempt and claim, storing ``result`` (JSON text; None: the
    body returned None, or a value that can't be stored). False: the lease was lost, nothing written."""
    conn = single_statement_connection(_using())
    if conn is not None:
        params = {
            "result": result,
            "token": _token(token),
            "run_id": run_id,
            "attempt": attempt,
            "source": SUCCEED.source,
            "target": SUCCEED.target,
            "outcome": AttemptOutcome.SUCCEEDED.value,
        }
        if result is None:
            arguments = (run_id, attempt, params["token"])
            text = lambda: (_sql(_SUCCEED_PG, conn, result_set=""), params)  # noqa: E731
            won = _execute(conn, _SUCCEED_CALL, arguments, text)[0] == 1
        else:
            with conn.cursor() as cursor:
                cursor.execute(_sql(_SUCCEED_PG, conn, result_set=_RESULT_SET), params)
                won = cursor.fetchone()[0] == 1
        if won:
            send_on_commit(signals.run_succeeded, run_id, attempt=attempt)
            return True
        with transaction.atomic():
            rows.fenced(run_id, attempt, worker, "completion")
        return False
    with transaction.atomic():
        stored = None if result is None else json.loads(result)
        if not rows.of(SUCCEED, run_id, attempt, token).update(**rows.ended(SUCCEED), last_error="", result=stored):
            rows.fenced(run_id, attempt, worker, "completion")
            return False
        rows.finish_attempt(run_id, attempt, AttemptOutcome.SUCCEEDED)
        send_on_commit(signals.run_succeeded, run_id, attempt=attempt)
    return True


def finish_successes(done: Sequence[tuple[int, int, str | None, str, str | None]]) -> set[tuple[int, int]]:
    """running → succeeded for many attempts, ``(run_id, attempt, token, worker, result)`` each, fenced
    like :func:`finish_success`; one statement on PostgreSQL. Returns the attempts written; each of the
    others lost its lease (recorded as a fenced completion)."""
    if not done:
        return set()
    conn = single_statement_connection(_using())
    if conn is None:
        return {(r, a) for r, a, token, worker, result in done if finish_success(r, a, worker, token, result)}
    params = {
        "ids": [d[0] for d in done],
        "attempts": [d[1] for d in done],
        "tokens": [_token(d[2]) for d in done],
        "results": [d[4] for d in done],
        "source": SUCCEED.source,
        "target": SUCCEED.target,
        "outcome": AttemptOutcome.SUCCEEDED.value,
    }
    with conn.cursor() as cursor:
        cursor.execute(_sql(_SUCCEED_MANY_PG, conn), params)
        won = {(int(r), int(a)) for r, a in cursor.fetchall()}
    for run_id, attempt, _, worker, _result in done:
        if (run_id, attempt) in won:
            send_on_commit(signals.run_succeeded, run_id, attempt=attempt)
        else:
            with transaction.atomic():
                rows.fenced(run_id, attempt, worker, "completion")
    return won


def finish_failure(
    run_id: int,
    attempt: int,
    decision: FailureDecision,
    error: str,
    tb: str,
    worker: str = "",
    token: str | None = None,
) -> bool:
    """running → failed / retrying / dead as ``decision`` says, fenced by the attempt and claim."""
    move = FAILURE_MOVES[decision.status]
    values: dict[str, Any] = dict(status=move.target, lease_expires_at=None, deadline_at=None, last_error=error[:10000])
    if move.target == RunStatus.RETRYING:
        values["next_check_at"] = after(timedelta(seconds=decision.retry_in or 0.0))
    else:
        values["finished_at"] = Now()
    with transaction.atomic():
        if not rows.of(move, run_id, attempt, token).update(**values):
            rows.fenced(run_id, attempt, worker, "failure report")
            return False
        rows.finish_attempt(run_id, attempt, AttemptOutcome.FAILED, error, tb)
        if move.target == RunStatus.FAILED:
            send_on_commit(signals.run_failed, run_id, attempt=attempt, error=error)
        elif move.target == RunStatus.DEAD:
            send_on_commit(signals.run_dead, run_id, attempt=attempt, reason="error")
        else:
            send_on_commit(signals.run_retrying, run_id, attempt=attempt, error=error, retry_in=decision.retry_in)
    return True


def finish_cancelled(run_id: int, attempt: int, worker: str = "", token: str | None = None) -> bool:
    """The agent stopped on an operator's cancel request."""
    with transaction.atomic():
        if (
            not rows.of(STOP_CANCELLED, run_id, attempt, token)
            .filter(cancel_requested=True)
            .update(**rows.ended(STOP_CANCELLED))
        ):
            return False
        rows.finish_attempt(run_id, attempt, AttemptOutcome.CANCELLED, "cancelled by an operator")
        send_on_commit(signals.run_cancelled, run_id, attempt=attempt)
    return True


def record_fenced(run_id: int, attempt: int, worker: str = "") -> None:
    """The agent noticed at a heartbeat that it lost the lease and stopped without writing."""
    with transaction.atomic():
        rows.fenced(run_id, attempt, worker, "further work")
