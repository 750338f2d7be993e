"""Workflows (Celery canvas) as a run keeps them: which options are canvas, what a run's final status
means to Celery (its state, and which continuation it fires). Pure values only.

A supervised step of a chain, group or chord, or a task dispatched with ``link``/``link_error``,
keeps the canvas its message carries in its options (JSON, with the rest of what is published
again on every attempt). The continuation (callbacks and the next chain step on success, errbacks on
a final failure, the chord part in either case) is dispatched by ``supervisor_app.runs.workflow``
once the run's final status is recorded, never by Celery's tracer for one attempt.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

#: The canvas a message carries, as ``as_task_v2`` names it: kept with the run, sent on every attempt.
CANVAS_OPTIONS = ("callbacks", "errbacks", "chain", "chord", "group_id", "group_index", "root_id", "parent_id")
#: The ones that make a continuation to dispatch when the run ends.
CONTINUATION_OPTIONS = ("callbacks", "errbacks", "chain", "chord")
#: The name a worker's request (``task.request``) gives a canvas option, where it differs.
REQUEST_NAMES: Mapping[str, str] = {"group_id": "group"}
#: ``apply_async`` options Celery's canvas passes and a supervised dispatch has no use for (the
#: chord's size goes to the result backend, ``add_to_parent`` to the calling task's trail).
IGNORED_OPTIONS = ("add_to_parent", "chord_size", "publisher", "connection", "router", "result_cls")

#: Celery's state of a run, by status: what its handle's ``.state`` says.
CELERY_STATES: Mapping[str, str] = {
    "queued": "PENDING",
    "waiting": "PENDING",
    "running": "STARTED",
    "retrying": "RETRY",
    "succeeded": "SUCCESS",
    "failed": "FAILURE",
    "dead": "FAILURE",
    "missed": "FAILURE",
    "cancelled": "REVOKED",
    "skipped": "REVOKED",
}

#: Final statuses whose continuation is the errbacks (the run did not do its work). A cancelled or
#: skipped run fires none, as a revoked Celery task fires none; its chord part is reported revoked.
FAILED_STATUSES = frozenset({"failed", "dead", "missed"})


class CanvasError(TypeError):
    """A canvas option a supervised run can't keep (not JSON)."""


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def canvas_of(options: Mapping[str, Any], link: Any = None, link_error: Any = None) -> dict[str, Any]:
    """The canvas of a dispatch, from ``apply_async``'s options and its ``link``/``link_error``, as
    JSON values (signatures are dicts): unset ones left out. Raises :class:`CanvasError` when a
    signature can't travel as JSON."""
    canvas: dict[str, Any] = {}
    callbacks = _as_list(options.get("callbacks")) + _as_list(link)
    errbacks = _as_list(options.get("errbacks")) + _as_list(link_error)
    values = dict(options)
    values["callbacks"], values["errbacks"] = callbacks or None, errbacks or None
    for name in CANVAS_OPTIONS:
        value = values.get(name)
        if value is None or value == []:
            continue
        try:
            canvas[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise CanvasError(f"{name} of a supervised dispatch must be JSON ({exc})") from exc
    return canvas


def has_continuation(options: Mapping[str, Any] | None) -> bool:
    """Whether a run with these kept options has a continuation to dispatch when it ends."""
    return any((options or {}).get(name) for name in CONTINUATION_OPTIONS)


def from_request(request: Any) -> dict[str, Any]:
    """The canvas options a delivered message carried, read from its worker request."""
    return {name: getattr(request, REQUEST_NAMES.get(name, name), None) for name in CANVAS_OPTIONS}


def as_request(options: Mapping[str, Any]) -> dict[str, Any]:
    """A run's kept canvas under the names of a worker request (for a request made outside one)."""
    return {REQUEST_NAMES.get(name, name): options.get(name) for name in CANVAS_OPTIONS}


def celery_state(status: str) -> str:
    """Celery's name for a run's status (``PENDING`` for one it does not know)."""
    return CELERY_STATES.get(status, "PENDING")


def child_task_id(task_id: str, kind: str, index: int) -> str:
    """The id of a continuation step that has none of its own (a callback or errback signature not
    frozen by the caller): derived from the run's id, so a continuation dispatched twice (a crash
    before it was marked done) is the same run, or the same message id, twice."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"supervisor-app:{task_id}:{kind}:{index}"))
