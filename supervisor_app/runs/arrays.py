"""Many rows in one ``INSERT`` on PostgreSQL: one array (or one JSON document) per column."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from django.db.models import JSONField, Model
from django.utils import timezone


def unnest_insert(
    model: type[Model],
    rows: Sequence[Mapping[str, Any]],
    fields: list[Any],
    conn: Any,
    shared: Mapping[str, Any] | None = None,
    next_check: timedelta | None = None,
) -> tuple[str, list[Any]]:
    """PostgreSQL: ``INSERT INTO <model's table> … SELECT … FROM ROWS FROM (unnest(<one array per
    column>), …)``; returns the statement (without ``RETURNING``) and its parameters.

    About twenty parameters whatever the number of rows, and no model instance per row: building a
    500-row VALUES list costs far more than inserting it. Every column of the model is written, each
    value prepared by its field as the ORM's insert does (defaults and ``auto_now_add`` included).
    A column in ``shared`` has that one value in every row: one parameter, not an array (a bulk
    dispatch varies only its arguments). ``next_check_at`` is ``now() + next_check`` (default: each
    row's ``start_timeout``) on the database's clock, as in create_run (runs only).
    """
    qn = conn.ops.quote_name
    now = timezone.now()
    shared = shared or {}
    columns: list[str] = []
    selected: list[str] = []
    scalars: list[Any] = []
    arrays: list[tuple[str, str, Any]] = []  # (column, set-returning call, its parameter)
    for field in fields:
        column = qn(field.column)
        columns.append(column)
        if field.name == "next_check_at":
            if next_check is not None:
                selected.append("STATEMENT_TIMESTAMP() + %s::interval")
                scalars.append(next_check)
            elif "start_timeout" in shared:
                selected.append("STATEMENT_TIMESTAMP() + %s::interval")
                scalars.append(shared["start_timeout"])
            else:
                selected.append(f"STATEMENT_TIMESTAMP() + u.{qn('start_timeout')}")
            continue
        if field.attname in shared or field.attname not in rows[0]:
            if field.attname in shared:
                value = shared[field.attname]
            else:
                value = now if getattr(field, "auto_now_add", False) else field.get_default()
            selected.append(f"%s::{field.db_type(conn)}")
            scalars.append(field.get_db_prep_save(value, conn))
            continue
        selected.append(f"u.{column}")
        if isinstance(field, JSONField) and not field.null:
            # One JSON document for the column, taken apart by the server: a jsonb[] parameter has
            # each element serialized, then quoted into the array's text, one by one in Python.
            encoded = json.dumps([field.get_prep_value(row[field.attname]) for row in rows], cls=field.encoder)
            arrays.append((column, "jsonb_array_elements(%s::jsonb)", encoded))
            continue
        values = [field.get_db_prep_save(row[field.attname], conn) for row in rows]
        arrays.append((column, f"unnest(%s::{field.db_type(conn)}[])", values))
    if not arrays:  # every column shared: unnest one array anyway, for the number of rows
        arrays.append(("n", "unnest(%s::int[])", list(range(len(rows)))))
    # ROWS FROM zips the columns, row i of each together (as a multi-array unnest does).
    sql = (
        f"INSERT INTO {qn(model._meta.db_table)} ({', '.join(columns)}) SELECT {', '.join(selected)}"
        f" FROM ROWS FROM ({', '.join(call for _, call, _ in arrays)}) AS u({', '.join(c for c, _, _ in arrays)})"
    )
    return sql, scalars + [values for _, _, values in arrays]


def insert_many(model: type[Model], rows: Sequence[Mapping[str, Any]], using: str) -> None:
    """Insert ``rows`` (field values by attribute name, the same names in each; every other field its
    default): one statement from arrays on PostgreSQL, the ORM's ``bulk_create`` elsewhere."""
    from django.db import connections

    if not rows:
        return
    conn = connections[using]
    if conn.vendor != "postgresql":
        model._default_manager.using(using).bulk_create([model(**row) for row in rows])
        return
    meta = model._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.pk]
    sql, params = unnest_insert(model, rows, fields, conn)
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
