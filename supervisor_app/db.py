"""The database clock, connection hygiene, and statements the ORM cannot say in one round trip.

One clock: every lease, deadline and lateness is judged by the database's ``statement_timestamp()``
(Django's ``Now()`` on PostgreSQL), never by a worker's or a supervisor's own clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connection, connections
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, Value
from django.db.models.expressions import Combinable
from django.db.models.functions import Now
from django.db.models.sql import UpdateQuery
from django.utils import timezone


def db_now(using: str = "default") -> datetime:
    """The database's clock, now: the time of the current *statement* (``statement_timestamp()``, what
    ``Now()`` is on PostgreSQL), not of the transaction's start, so a long transaction reads the time
    as it goes. SQLite has no server: the local clock is the database's clock there."""
    conn = connections[using]
    if conn.vendor == "postgresql":
        with conn.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            value: datetime = cursor.fetchone()[0]
        return value if timezone.is_aware(value) else timezone.make_aware(value, dt_timezone.utc)
    return timezone.now()


def after(delta: Combinable | timedelta) -> ExpressionWrapper:
    """``now() + delta`` computed by the database (``delta`` a timedelta or a duration expression)."""
    rhs = Value(delta, output_field=DurationField()) if isinstance(delta, timedelta) else delta
    return ExpressionWrapper(Now() + rhs, output_field=DateTimeField())


def seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


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
    conn = connections[qs.db]
    sql = f"{sql} RETURNING {', '.join(conn.ops.quote_name(f.column) for f in cols)}"
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    out = []
    for row in rows:
        item = {}
        for field, raw in zip(cols, row, strict=True):
            item[field.name] = convert(field, raw, model, conn)
        out.append(item)
    return out


def convert(field: Any, raw: Any, model: Any, conn: Any) -> Any:
    """A raw column value as the ORM would return it: backend converters, then the field's own."""
    col = field.get_col(model._meta.db_table)
    value = raw
    for converter in [*conn.ops.get_db_converters(col), *col.get_db_converters(conn)]:
        value = converter(value, col, conn)
    return value


def single_statement_connection(using: str) -> Any:
    """The PostgreSQL connection when a write can run as one statement outside any transaction block
    (a CTE that updates the run and its attempt together), else None (SQLite, or inside atomic())."""
    conn = connections[using]
    return conn if conn.vendor == "postgresql" and not conn.in_atomic_block else None


def execute_async_commit(cursor: Any, sql: str, params: Mapping[str, Any] | Sequence[Any], enabled: bool) -> None:
    """Run a recoverable write without waiting for its WAL flush, when ``enabled``.

    ``SET LOCAL synchronous_commit TO off`` and the write go in one query string: the statements of
    one string run in one implicit transaction, so the ``SET LOCAL`` covers exactly that write.
    """
    if enabled:
        cursor.execute("SET LOCAL synchronous_commit TO off; " + sql, params)
        cursor.nextset()
    else:
        cursor.execute(sql, params)


def drop_broken_connection(always_check: bool = False) -> None:
    """Close this thread's connection if an error broke it (terminated, server restarted, failover).

    Celery keeps a worker's connection between tasks and never runs Django's per-request
    ``close_old_connections``, so without this a process whose connection was cut fails every later
    statement with "the connection is closed". Cheap on the hot path: unless ``always_check``, it
    looks only after an error occurred on the connection.
    """
    if connection.connection is None:
        return
    if (always_check or connection.errors_occurred) and not connection.is_usable():
        connection.close()


def recover_connection() -> None:
    """After a failed statement in a long-lived loop (lease keeper, sweep loop): Django's own cleanup,
    then a usable-check, so the next statement opens a fresh connection if this one is dead."""
    from django.db import close_old_connections

    close_old_connections()
    drop_broken_connection(always_check=True)
