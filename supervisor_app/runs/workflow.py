"""Workflow continuations: what a finished run tells the rest of its workflow, dispatched once.

A run whose options keep a continuation (``core.workflow.CONTINUATION_OPTIONS``: callbacks, errbacks,
the rest of its chain, the chord it is part of) is recorded with ``follow_up`` set; so is a run the
supervisor ended ``dead`` (a configured result backend must hear of it: no worker will tell it).
Once the run's final status is written, :func:`follow_up` (the agent, right after its finish, and
the supervisor's sweep for whatever that missed) dispatches the continuation in one transaction
that clears the flag:

- succeeded: each callback, then the next chain step, with the run's stored result as first argument;
- failed / dead / missed: each errback, with the run's task id as argument (Celery's convention);
- a chord part (any final status): reported to the result backend, which joins the chord (as Celery
  does it: a result backend is required for chords);
- with a result backend configured: the final outcome stored under the run's task id.

Supervised steps are recorded by their ``apply_async`` in that same transaction, under their frozen
task ids (or ids derived from the run's, ``core.workflow.child_task_id``): should the flag's clearing
be lost with a crash, dispatching again finds them recorded (the unique ``task_id``). Those are
dispatched exactly once. Plain Celery steps are published before the commit: at least once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.db import router, transaction

from ..core.ids import legacy_task_id
from ..core.states import TERMINAL_STATUSES, RunStatus
from ..core.workflow import FAILED_STATUSES, as_request, child_task_id
from ..db import update_returning
from ..models import SupervisedRun
from .results import decode_result, final_error

logger = logging.getLogger("supervisor_app")

#: Runs followed up per call.
BATCH = 100

_FIELDS = ["id", "task_id", "task_name", "status", "result", "options", "last_error"]


def pending() -> Any:
    """Finished runs whose continuation is still to be dispatched (the partial index's rows)."""
    return SupervisedRun.objects.filter(follow_up=True, status__in=sorted(TERMINAL_STATUSES))


def follow_up(run_ids: Sequence[int] | None = None, limit: int = BATCH, error: BaseException | None = None) -> int:
    """Dispatch the continuation of finished runs (these ids, or the oldest pending ones); returns
    how many were dispatched. A run whose dispatch fails (the broker refused a plain step) stays
    pending for the next call, and the others go on. ``error``: the exception the task's code raised
    (the agent's call, for its one run), stored in a result backend as the final failure."""
    qs = pending()
    if run_ids is not None:
        qs = qs.filter(pk__in=list(run_ids))
    done = 0
    for pk in list(qs.order_by("finished_at").values_list("pk", flat=True)[:limit]):
        try:
            done += _follow_up_one(pk, error)
        except Exception:
            if run_ids is not None and len(run_ids) == 1:
                raise  # the agent's call: it logs it
            logger.warning("run %s: workflow continuation not dispatched; will try again", pk, exc_info=True)
    return done


def _transient(exc: BaseException) -> bool:
    """An outage worth trying again at the next sweep (database or broker unreachable), not a
    continuation that can never be dispatched (a malformed signature kept with the run)."""
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError

    return isinstance(exc, OperationalError | InterfaceError | BrokerError | OSError)


def _follow_up_one(pk: int, error: BaseException | None = None) -> int:
    using = router.db_for_write(SupervisedRun)
    with transaction.atomic(using=using):
        claimed = update_returning(pending().filter(pk=pk), _FIELDS, follow_up=False)
        if not claimed:
            return 0  # another process followed it up
        try:
            with transaction.atomic(using=using):
                continuation(claimed[0], error)
        except Exception as exc:
            if _transient(exc):
                raise  # the whole transaction rolls back: still pending, dispatched later
            # Never dispatchable: trying at every sweep would only repeat the error. The flag stays
            # cleared, the run says why (its page in the admin), and the log has the traceback.
            logger.error("run %s: workflow continuation can't be dispatched; given up", pk, exc_info=True)
            note = f"workflow continuation not dispatched: {type(exc).__name__}: {exc}"
            SupervisedRun.objects.filter(pk=pk).update(last_error=note[:10000])
    return 1


def continuation(row: dict[str, Any], error: BaseException | None = None) -> None:
    """Dispatch what a finished run (``row``: its fields) tells its workflow (see the module's doc)."""
    from celery import current_app

    app: Any = current_app._get_current_object()  # type: ignore[attr-defined]
    options = row["options"] or {}
    task_id = row["task_id"] or legacy_task_id(row["id"])
    root_id = options.get("root_id") or task_id
    status = row["status"]
    result = decode_result(row["result"]) if status == RunStatus.SUCCEEDED else None
    placed = {"parent_id": task_id, "root_id": root_id}
    if status == RunStatus.SUCCEEDED:
        for index, callback in enumerate(options.get("callbacks") or ()):
            _apply(app, callback, (result,), child_task_id(task_id, "link", index), placed)
        chain = options.get("chain")
        if chain:
            rest = list(chain[:-1])
            _apply(app, chain[-1], (result,), child_task_id(task_id, "chain", 0), dict(placed, chain=rest or None))
    elif status in FAILED_STATUSES:
        for index, errback in enumerate(options.get("errbacks") or ()):
            _apply(app, errback, (task_id,), child_task_id(task_id, "link_error", index), placed)
    _report(app, row, task_id, result, error)


def _apply(app: Any, sig: Any, args: tuple[Any, ...], default_id: str, options: dict[str, Any]) -> None:
    """Dispatch one step: ``args`` prepended to its own unless it is immutable, under its frozen id
    (or ``default_id``). A supervised step records its run in the caller's transaction."""
    from celery import signature

    step = signature(sig, app=app)
    if step.immutable:
        args = ()
    task_id = step.options.get("task_id") or default_id
    step.apply_async(args, task_id=task_id, **{k: v for k, v in options.items() if v is not None})


def _report(app: Any, row: dict[str, Any], task_id: str, result: Any, error: BaseException | None) -> None:
    """Tell a configured result backend the run's final outcome (and, through it, the chord the run
    is part of)."""
    from celery.app.task import Context
    from celery.backends.base import DisabledBackend

    backend = app.backend
    options = row["options"] or {}
    if isinstance(backend, DisabledBackend):
        if options.get("chord"):
            logger.warning("run %s is part of a chord but no result backend is configured", row["id"])
        return
    # Only the chord is reported through the backend (it joins it); callbacks and errbacks went above.
    canvas = {**as_request(options), "callbacks": None, "errbacks": None, "chain": None}
    request = Context(id=task_id, task=row["task_name"], ignore_result=False, delivery_info={}, **canvas)
    status = row["status"]
    if status == RunStatus.SUCCEEDED:
        backend.mark_as_done(task_id, result, request=request)
    elif status in FAILED_STATUSES:
        exc = error or final_error(row["task_name"], row["id"], status, row["last_error"])
        backend.mark_as_failure(task_id, exc, request=request, call_errbacks=False)
    else:
        backend.mark_as_revoked(task_id, f"run {row['id']} {status}", request=request)
