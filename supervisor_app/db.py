"""The database clock, connection hygiene, and statements the ORM cannot say in one round trip.

One clock: every lease, deadline and lateness is judged by the database's ``statement_timestamp()``
(Django's ``Now()`` on PostgreSQL), never by a worker's or a supervisor's own clock.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connection, connections, transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, Value
from django.db.models.expressions import Combinable
from django.db.models.functions import Now
from django.db.models.sql import InsertQuery, UpdateQuery
from django.utils import timezone

logger = logging.getLogger("supervisor_app")


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


def insert_row(model: Any, values: Mapping[str, Any], using: str, conflict: str = "") -> int | None:
    """Insert one row of ``model`` in one ``INSERT … VALUES (…) [conflict] RETURNING <pk>`` and return
    its primary key; None when ``conflict`` (an ``ON CONFLICT … DO NOTHING`` clause) kept it out.

    ``values`` by attribute name, expressions included (``after(…)``, ``Now()``); every other field
    takes its default, ``auto_now_add`` the current time, as the ORM's insert writes them. No model
    instance and no compiler pass per field: a dispatch's one statement, built in a fraction of what
    ``create()`` spends (no ``pre_save``/``post_save`` signals either: the runs' tables are ours).
    """
    conn = connections[using]
    meta = model._meta
    columns: list[str] = []
    placeholders: list[str] = []
    params: list[Any] = []
    compiler = None
    now = None
    for field in meta.local_concrete_fields:
        if field is meta.pk:
            continue
        if field.attname in values:
            value = values[field.attname]
        elif getattr(field, "auto_now_add", False) or getattr(field, "auto_now", False):
            value = now = now or timezone.now()
        else:
            value = field.get_default()
        columns.append(conn.ops.quote_name(field.column))
        if hasattr(value, "resolve_expression"):
            if compiler is None:
                compiler = InsertQuery(model).get_compiler(using=using)
            sql, expression_params = compiler.compile(
                value.resolve_expression(compiler.query, allow_joins=False, for_save=True)
            )
            placeholders.append(sql)
            params.extend(expression_params)
        else:
            placeholders.append("%s")
            params.append(field.get_db_prep_save(value, conn))
    sql = (
        f"INSERT INTO {conn.ops.quote_name(meta.db_table)} ({', '.join(columns)}) VALUES ({', '.join(placeholders)})"
        f"{' ' + conflict if conflict else ''} RETURNING {conn.ops.quote_name(meta.pk.column)}"
    )
    with transaction.mark_for_rollback_on_error(using), conn.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else int(row[0])


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


@contextmanager
def driver_cursor(conn: Any) -> Iterator[Any]:
    """A cursor for one of the agent's per-task statements (claim, success): the driver's own
    (psycopg 3 or psycopg2, ``%s`` placeholders), its errors raised as Django's, as Django's would.

    Django's cursor wrapper costs about as much client CPU as the statement itself (a tenth of a
    millisecond a task on the bench machine). It is skipped only when nothing would observe it:
    when queries are logged (``DEBUG``, ``CaptureQueriesContext``) or execute wrappers are installed
    (tracing, instrumentation), the statement goes through Django's cursor as any other. For
    statements that return no timestamps (Django's cursor would set their time zone).
    """
    if conn.queries_logged or conn.execute_wrappers:
        with conn.cursor() as cursor:
            yield cursor
        return
    conn.close_if_health_check_failed()
    conn.ensure_connection()
    with conn.wrap_database_errors, conn.connection.cursor() as cursor:
        yield cursor


#: Appended to the ``WHERE`` of a recoverable single-statement write run outside a transaction block:
#: ``SET LOCAL synchronous_commit TO off`` said inside the statement itself. A row is written only
#: if every condition held, this one included, so the statement's implicit transaction commits
#: without waiting for its WAL flush exactly when it wrote. One statement, not ``SET LOCAL …; UPDATE``
#: in one string: psycopg2 (``nextset``), psycopg 3's server-side binding (prepared statements
#: take one command) and PgBouncer all refuse or mishandle multi-statement strings.
ASYNC_COMMIT_CONDITION = " AND set_config('synchronous_commit', 'off', true) IS NOT NULL"


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


def undefined_function(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's "function does not exist" (SQLSTATE 42883), with either driver."""
    cause = exc.__cause__ or exc
    return getattr(cause, "sqlstate", None) == "42883" or getattr(cause, "pgcode", None) == "42883"


def recover_connection() -> None:
    """After a failed statement in a long-lived loop (lease keeper, sweep loop): Django's own cleanup,
    then a usable-check, so the next statement opens a fresh connection if this one is dead."""
    from django.db import close_old_connections

    close_old_connections()
    drop_broken_connection(always_check=True)


# ---------------------------------------------------------------- sockets that can't hang an agent


def socket_fd() -> int | None:
    """The socket of this thread's open PostgreSQL connection (None: not open, or not PostgreSQL)."""
    raw = connection.connection
    if raw is None or connection.vendor != "postgresql":
        return None
    try:
        return int(raw.fileno())
    except Exception:  # closed under our feet
        return None


def _tcp(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of ``fd`` when it is a TCP socket (not a Unix socket)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def bound_socket(fd: int, seconds: float) -> bool:
    """Make a silent peer fail the socket within about ``seconds`` instead of never.

    A partition that drops packets leaves a blocked read waiting for ever (no keepalives by default)
    and unacknowledged writes for about 15 minutes of retransmissions. Keepalives probe an idle
    socket; ``TCP_USER_TIMEOUT`` bounds how long sent data (probes included) may stay unacknowledged.
    A server busy with a long query still acknowledges at the TCP level, so it is not affected.
    """
    sock = _tcp(fd)
    if sock is None:
        return False
    try:
        idle = max(1, int(seconds / 3))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their own keepalive timing
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 6)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
        return True
    except OSError as exc:
        logger.debug("could not bound the database socket (%s)", exc)
        return False
    finally:
        sock.close()  # the duplicate only; the options belong to the shared socket


def cut_socket(fd: int) -> None:
    """Shut a connection's TCP socket down from another thread: a read blocked on it returns at once
    and its driver raises, so the thread is free again (the connection is then dropped)."""
    sock = _tcp(fd)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_bounded: list[Callable[[], float]] = []


def bound_agent_sockets(seconds: Callable[[], float]) -> None:
    """From now on, every PostgreSQL connection this process opens gets :func:`bound_socket`
    (``seconds()`` read at each connection); the current thread's open connection too.

    Called by the agent in worker processes only: the web process and the supervisor keep their
    sockets as configured.
    """
    from django.db.backends.signals import connection_created

    if _bounded:
        return  # every connection opened since the first call was bound when it was created
    _bounded.append(seconds)
    connection_created.connect(_on_connection_created, dispatch_uid="supervisor_app.bound_sockets")
    fd = socket_fd()
    if fd is not None:
        value = seconds()
        if value > 0:
            bound_socket(fd, value)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor != "postgresql" or not _bounded:
        return
    value = _bounded[0]()
    if value <= 0:
        return
    try:
        fd = int(connection.connection.fileno())
    except Exception:
        return
    bound_socket(fd, value)
