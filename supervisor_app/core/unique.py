"""Unique runs: the key that makes two dispatches "the same run", computed without a database.

A task's ``unique_by`` names arguments of its function (``("customer",)``), resolved against its
signature: ``f(7)``, ``f(customer=7)`` and ``f()`` with ``customer=7`` as the default give one key.
``"args"`` takes every argument the same way. The chosen values are JSON-normalised (object keys
sorted, tuples as lists, no whitespace) and hashed (SHA-256), so the key has a bounded length and
equal calls give equal keys whatever the order of keyword arguments. Values compare as JSON: ``1`` and
``1.0`` are different keys, ``(1, 2)`` and ``[1, 2]`` the same.

A caller's own ``apply_async(unique_key="…")`` is kept as given when it is short (readable in the
admin), and hashed otherwise. Hashed keys start with :data:`HASHED`, which a given key never keeps,
so a given key never equals a derived one.

The database side (one run per task and key, the ``unique_for`` window) is in
``supervisor_app.runs.unique``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from functools import lru_cache
from typing import Any

#: Longest key stored (the ``unique_key`` column's length).
MAX_KEY_LENGTH = 80
#: What every hashed key starts with: ``sha256:`` and 64 hex digits (71 characters).
HASHED = "sha256:"
#: ``unique_by`` value that takes every argument.
ALL_ARGUMENTS = "args"

#: ``"args"``, or the names of the arguments that make the key.
UniqueBy = str | Sequence[str]


class UniqueKeyError(TypeError):
    """The key can't be computed: ``unique_by`` names an argument the task does not have, the call
    does not fit the task's signature, or a value is not JSON."""


def normalise_unique_by(value: UniqueBy | None) -> tuple[str, ...] | str | None:
    """``unique_by`` as given on a task: None, ``"args"``, one name, or a sequence of names."""
    if value is None or value == ALL_ARGUMENTS:
        return value
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UniqueKeyError(f"unique_by must be {ALL_ARGUMENTS!r} or argument names, not {value!r}")
    return names


def window_seconds(value: float | timedelta | None) -> float | None:
    """``unique_for`` in seconds (a number or a timedelta); None or 0: no window."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"unique_for must not be negative, got {value!r}")
    return seconds or None


def canonical_json(value: Any) -> str:
    """One text per JSON value: object keys sorted, no whitespace, no NaN."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UniqueKeyError(f"unique key values must be JSON-serialisable ({exc})") from exc


def _hashed(kind: str, text: str) -> str:
    return HASHED + hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()


def given_key(key: Any) -> str:
    """A caller's ``unique_key``: kept when short, hashed when longer or when it looks hashed."""
    if not isinstance(key, str) or not key:
        raise UniqueKeyError(f"unique_key must be a non-empty string, not {key!r}")
    if len(key) <= MAX_KEY_LENGTH and not key.startswith(HASHED):
        return key
    return _hashed("key", key)


def chosen_arguments(
    func: Callable[..., Any], unique_by: UniqueBy, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The arguments ``unique_by`` names, by name, as this call gives them (defaults applied).

    A name the signature does not have is looked up among the call's ``**kwargs`` (when the function
    takes them); one the call does not give is left out.
    """
    try:
        signature = _signature(func)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UniqueKeyError(f"the call does not fit the task's signature: {exc}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    spread = None  # the name of the function's **kwargs, if it takes them
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            values[name] = list(values[name])
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            spread = name
    if unique_by == ALL_ARGUMENTS:
        return values
    names = normalise_unique_by(unique_by)
    assert isinstance(names, tuple)
    if spread is None:
        unknown = [n for n in names if n not in signature.parameters]
        if unknown:
            raise UniqueKeyError(f"unique_by names {unknown}, not arguments of the task {signature}")
    extra = values.get(spread, {}) if spread else {}
    chosen = {}
    for name in names:
        if name in values:
            chosen[name] = values[name]
        elif name in extra:
            chosen[name] = extra[name]
    return chosen


@lru_cache(maxsize=1024)
def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """A task function's signature, read once (a task's bound ``run`` hashes as its function and task)."""
    return inspect.signature(func)


def arguments_key(
    func: Callable[..., Any], unique_by: UniqueBy, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> str:
    """The key of a call of a task with ``unique_by``: a hash of the chosen arguments' JSON."""
    chosen = chosen_arguments(func, unique_by, list(args or ()), dict(kwargs or {}))
    return _hashed("args", canonical_json(chosen))
