"""A schedule's stored arguments: django-celery-beat keeps ``args`` and ``kwargs`` as JSON text.

Celery sends a task only with a list of positional arguments and an object of keyword arguments
(anything else raises ``TypeError`` at send time), but django-celery-beat's form and model accept any
JSON: ``[1]`` as keyword arguments is saved, then fails at every fire. One rule, checked where the text
enters (the admin form), where it is reported (a system check) and where it is read (the beat and the
sweep), so a bad row is refused, reported, or left out on its own, never sent or recorded.
"""

from __future__ import annotations

import json
from typing import Any, Literal

#: The two argument fields of a periodic task.
Field = Literal["args", "kwargs"]

#: What each field must hold once parsed, the text an empty field stands for, and how to say it.
EXPECTED: dict[Field, tuple[type, str, str]] = {
    "args": (list, "[]", 'a JSON list, such as [1, "a"]'),
    "kwargs": (dict, "{}", 'a JSON object, such as {"key": "value"}'),
}


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in words (for error messages)."""
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return "a number"


def type_error(field: Field, value: Any) -> str | None:
    """Why a parsed value can't be the field's arguments, or None when it can."""
    kind, _empty, wanted = EXPECTED[field]
    if isinstance(value, kind):
        return None
    return f"{field} must be {wanted}, not {json_kind(value)}"


def parse(field: Field, text: str | None) -> Any:
    """The field's arguments from its stored text (empty means none), or ``ValueError`` saying why."""
    _kind, empty, _wanted = EXPECTED[field]
    try:
        value = json.loads(text or empty)
    except ValueError as exc:
        raise ValueError(f"{field} is not valid JSON ({exc})") from exc
    error = type_error(field, value)
    if error is not None:
        raise ValueError(error)
    return value


def parse_arguments(args: str | None, kwargs: str | None) -> tuple[list[Any], dict[str, Any]]:
    """A periodic task's ``(args, kwargs)``, or ``ValueError`` naming the first bad field."""
    return parse("args", args), parse("kwargs", kwargs)
