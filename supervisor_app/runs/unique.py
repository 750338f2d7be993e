"""Unique runs: one run per (task, unique key) holds the key, however many processes dispatch at once.

The guarantee is the partial unique index ``supervisor_run_unique_key`` on ``(task_name, unique_key)``
over the runs that hold their key (``HOLDS_KEY``): the active ones (queued, running, retrying and any
other status in ``ACTIVE_STATUSES``), and those dispatched with a ``unique_for`` window. A unique
dispatch is one ``INSERT … ON CONFLICT (task_name, unique_key) WHERE … DO NOTHING RETURNING id``, as
cheap as a plain one when it inserts. When nothing comes back, another run holds the key: it is read
and its id returned; nothing is recorded or published. A concurrent dispatcher whose insert is not yet
committed makes ours wait for its transaction (PostgreSQL; SQLite has one writer at a time), then
conflict: one run, whichever process wins.

Two races are closed by looping (at most :data:`ROUNDS` times):

- the run holding the key ends between our conflicting insert and our read: the read finds none,
  and the insert is tried again (it now records the new run);
- with ``unique_for``, a run keeps its key after it ends, until its window is over. The first dispatch
  that conflicts with such a run after its window releases the key (a conditional update: only a run
  no longer active whose window is over) and inserts again. So the index holds at most one row per
  key, active runs and open windows, never the history.

The window counts from the holding run's dispatch (its ``unique_until`` is ``now() + unique_for`` on
the database clock): a dispatch within it returns that run, whatever its status (succeeded, failed,
cancelled...); the first dispatch after it records a new run, unless the old one is still active.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import cache
from typing import Any

from django.db import connections
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.db.models.functions import Now
from django.db.models.sql import Query

from ..core.states import ACTIVE_STATUSES
from ..db import after, insert_row
from ..models import SupervisedRun
from ..models.runs import HOLDS_KEY

#: Insert-then-read rounds before giving up; each lost round means the run that held the key ended
#: (or its window was released) between two of our statements.
ROUNDS = 5


class UniqueKeyContended(RuntimeError):
    """The key changed hands :data:`ROUNDS` times during one dispatch; nothing was recorded."""


def window_values(unique_for: float | None) -> dict[str, Any]:
    """``unique_until`` of a new run: ``now() + unique_for`` on the database clock (None: no window)."""
    return {"unique_until": after(timedelta(seconds=unique_for)) if unique_for else None}


def insert_or_find(fields: dict[str, Any], using: str) -> tuple[int, bool]:
    """Insert the run ``fields`` describe (``task_name`` and ``unique_key`` set) unless another run
    holds its key: ``(new id, True)``, or ``(the holder's id, False)`` with nothing written."""
    task_name, key = fields["task_name"], fields["unique_key"]
    for _ in range(ROUNDS):
        pk = _insert(fields, using)
        if pk is not None:
            return pk, True
        holder = (
            SupervisedRun.objects.using(using)
            .filter(HOLDS_KEY, task_name=task_name, unique_key=key)
            .annotate(window_open=ExpressionWrapper(Q(unique_until__gt=Now()), output_field=BooleanField()))
            .order_by()
            .values_list("pk", "status", "window_open")[:1]
        )
        found = list(holder)
        if not found:
            continue  # it ended between our insert and this read: the key is free
        pk, status, window_open = found[0]
        if status in ACTIVE_STATUSES or window_open:
            return int(pk), False
        # It ended and its unique_for window is over, but it still holds the key: release it (only
        # if that is still so) and insert again.
        SupervisedRun.objects.using(using).filter(pk=pk, unique_until__lte=Now()).exclude(
            status__in=sorted(ACTIVE_STATUSES)
        ).update(unique_until=None)
    raise UniqueKeyContended(
        f"{task_name}: unique key {key!r} changed hands {ROUNDS} times during one dispatch; nothing recorded"
    )


def holder(pk: int, task_name: str, key: str) -> SupervisedRun:
    """What a deduplicated dispatch returns: the run holding the key, with the handle its own
    dispatch returned (its task id) and ``deduplicated`` set."""
    run = SupervisedRun(pk=pk, task_name=task_name, unique_key=key)
    run.task_id = SupervisedRun.objects.filter(pk=pk).values_list("task_id", flat=True).first() or ""
    run.task_id = run.celery_task_id
    run._state.adding = False
    run.deduplicated = True
    return run


def _insert(fields: dict[str, Any], using: str) -> int | None:
    qn = connections[using].ops.quote_name
    return insert_unless_held(
        fields, using, f"({qn('task_name')}, {qn('unique_key')}) WHERE {_predicate_sql(HOLDS_KEY, using)}"
    )


def insert_unless_held(fields: dict[str, Any], using: str, target: str) -> int | None:
    """Insert the run ``fields`` describe, ``ON CONFLICT <target> DO NOTHING RETURNING id``: the new
    run's id, or None when a run holds what the conflict target names (nothing written). One statement,
    no savepoint: a conflict leaves the caller's transaction usable."""
    return insert_row(SupervisedRun, fields, using, f"ON CONFLICT {target} DO NOTHING")


def task_id_target(using: str) -> str:
    """The conflict target of ``supervisor_run_unique_task_id``: a run's Celery id names one run."""
    qn = connections[using].ops.quote_name
    return f"({qn('task_id')}) WHERE {_predicate_sql(~Q(task_id=''), using)}"


@cache
def _predicate_sql(condition: Q, using: str) -> str:
    """A partial unique index's condition as SQL with its values inline, as the index's own predicate
    is written.

    The conflict target names the partial index by its columns and predicate; PostgreSQL must prove
    that predicate from this text when planning, which a bound parameter (server-side binding, a
    generic plan) would defeat, so the values are written as literals (checked to be plain words).
    """
    conn = connections[using]
    query = Query(SupervisedRun, alias_cols=False)
    where = query.build_where(condition)
    sql, params = where.as_sql(query.get_compiler(connection=conn), conn)
    literals = []
    for value in params:
        if not (isinstance(value, str) and re.fullmatch(r"[a-z_]*", value)):
            raise ValueError(f"unexpected value {value!r} in a unique index's predicate")
        literals.append(f"'{value}'")
    return str(sql % tuple(literals))
