"""Exactly-once effects for task authors (public as ``supervisor_app.idempotency``).

A supervised run is executed *at least once*: a worker can die after a side effect and before it
records success, and the next attempt runs the body again. Completion is fenced (only the attempt
holding the lease records the outcome), but the body's own writes are not, unless they go through
this module::

    @shared_task(base=SupervisedTask, bind=True)
    def send_invoice(self, invoice_id):
        with self.effect("invoice-row") as first:
            if first:
                Invoice.objects.filter(pk=invoice_id).update(sent=True)
                Ledger.objects.create(invoice_id=invoice_id)
        # external APIs: pass a key that is the same on every attempt of this run
        payments.charge(invoice_id, idempotency_key=self.idempotency_key)

``effect(run_id, key, attempt)`` opens a transaction, records ``Effect(run, key)`` (unique per run)
and yields ``True`` only to the first attempt that commits it. The effect's own database writes,
made inside the block, commit or roll back with that row: together, once. While the block runs, the
run's row is share-locked and checked to be still held by ``attempt`` (the fencing token), so a
zombie whose lease was taken over cannot commit an effect, and the supervisor cannot take the lease
over half-way through one (it waits for the block to commit). A block that raises rolls back both
the effect and its record, so the next attempt performs it.

Effects outside the database (an e-mail, an HTTP call) cannot share its transaction: use
``idempotency_key`` with services that deduplicate on a key, or record the effect first and accept
at-most-once for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connections, router, transaction
from django.utils import timezone

from ..core.errors import LeaseLost
from ..core.states import RunStatus
from ..models import Effect, SupervisedRun

#: Longest effect key accepted (the column's length).
MAX_KEY_LENGTH = 255


def idempotency_key(run_id: int, key: str | None = None) -> str:
    """A key that is the same on every attempt of a run (and differs between runs).

    Meant for external services that deduplicate requests (``Idempotency-Key`` headers, message
    deduplication ids). With ``key``, one per effect of the run.
    """
    base = f"supervisor-run-{int(run_id)}"
    return base if key is None else f"{base}:{key}"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError("an effect key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"an effect key must be at most {MAX_KEY_LENGTH} characters, got {len(key)}")


def _fence(run_id: int, attempt: int, using: str) -> None:
    """Share-lock the run while it is held by ``attempt``; LeaseLost when it is not."""
    # FOR SHARE: several effects of one attempt may run side by side, while an UPDATE of the row (the
    # supervisor taking the lease over, another agent's claim) waits until the effect commits. SQLite
    # has no row locks: its write transaction already serialises everything.
    held = SupervisedRun.objects.using(using).filter(pk=run_id, attempt=attempt, status=RunStatus.RUNNING)
    conn = connections[using]
    sql, params = held.values_list("pk").query.sql_with_params()
    if conn.vendor == "postgresql":
        sql += " FOR SHARE"
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        if cursor.fetchone() is None:
            raise LeaseLost(f"run {run_id} attempt {attempt} no longer holds its lease; effect not performed")


def once(run_id: int, key: str, attempt: int | None = None) -> bool:
    """Record effect ``key`` of run ``run_id``; True the first time, False if it is recorded already.

    Must be called inside ``transaction.atomic()`` together with the effect's own writes (else the
    record and the effect could commit separately). With ``attempt``, the run must still be held by
    that attempt (``LeaseLost`` otherwise). Prefer :func:`effect`, which does all of this.
    """
    _check_key(key)
    using = router.db_for_write(Effect)
    conn = connections[using]
    if not conn.in_atomic_block:
        raise RuntimeError("once() must run inside transaction.atomic(), with the effect's own writes")
    if attempt is not None:
        _fence(run_id, attempt, using)
    table = conn.ops.quote_name(Effect._meta.db_table)
    # ON CONFLICT DO NOTHING (PostgreSQL and SQLite): a concurrent insert of the same key by another
    # attempt waits for that transaction, then finds the row; no error, no aborted transaction.
    sql = (
        f"INSERT INTO {table} (run_id, key, attempt, created_at) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (run_id, key) DO NOTHING"
    )
    with conn.cursor() as cursor:
        cursor.execute(sql, [run_id, key, attempt or 0, timezone.now()])
        return bool(cursor.rowcount == 1)


@contextmanager
def effect(run_id: int | None, key: str, attempt: int | None = None) -> Iterator[bool]:
    """``with effect(run_id, "key", attempt) as first:`` perform the effect only ``if first``.

    Opens a transaction (a savepoint inside an outer one); the effect's writes inside the block commit
    with its record. Without a run (the task called directly or eagerly) it yields True: there is
    nothing to deduplicate against.
    """
    _check_key(key)
    with transaction.atomic(using=router.db_for_write(Effect)):
        if run_id is None:
            yield True
            return
        yield once(run_id, key, attempt)


def performed(run_id: int, key: str) -> bool:
    """Whether effect ``key`` of the run has been committed."""
    return Effect.objects.filter(run_id=run_id, key=key).exists()
