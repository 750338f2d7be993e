"""Keys made of a call's arguments: which runs count together for a concurrency limit.

A key names arguments of the task's function (``("customer",)``), found whether they were passed by
position or by keyword, or ``"args"`` for all of them. Values are JSON-normalised (sorted keys,
no whitespace) and hashed, so the key has a bounded length and equal calls give equal keys.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: ``"args"`` (every argument) or the names of the arguments that make the key.
KeySpec = str | Sequence[str]


class ArgumentKeyError(ValueError):
    """A key names an argument the task does not have, or the call did not pass it."""


def key_arguments(func: Callable[..., Any], spec: KeySpec, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The values of the arguments ``spec`` names, as passed in this call (defaults applied)."""
    if spec == "args":
        return [list(args), dict(kwargs)]
    names = [spec] if isinstance(spec, str) else list(spec)
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentKeyError(f"the call does not fit the task's signature: {exc}") from None
    bound.apply_defaults()
    missing = [name for name in names if name not in bound.arguments]
    if missing:
        raise ArgumentKeyError(f"the key names argument(s) {missing} that the call does not give")
    return [bound.arguments[name] for name in names]


def digest(task_name: str, values: Any) -> str:
    """A bounded, stable key for ``task_name`` and argument values (JSON-normalised, SHA-256)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return f"{task_name[:150]}:{hashlib.sha256(text.encode()).hexdigest()[:40]}"
