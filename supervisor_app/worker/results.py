"""The handle a dispatch returns: a result that follows its run.

:class:`RunResult` is the ``AsyncResult`` of a supervised task (``SupervisedTask.AsyncResult``, so
also the frozen results of a chain or group): it follows the *run*, read from the database, whatever
attempt is executing and with or without a result backend. ``.state`` maps the run's status,
``.get()`` waits for its final outcome (the stored value, or the final error raised).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from celery.result import AsyncResult

from ..conf import supervisor_settings
from ..core.states import TERMINAL_STATUSES, RunStatus
from ..core.workflow import FAILED_STATUSES, celery_state
from ..models import RunAttempt, SupervisedRun
from ..runs.results import decode_result, final_error

logger = logging.getLogger("supervisor_app")

#: The ids runs were published under before migration 0014.
_LEGACY = re.compile(r"^\d+\.\d+(\.[0-9a-f]+)?$")


class RunResult(AsyncResult):  # type: ignore[misc]
    """The handle of a supervised run, by its Celery id (``task_id``).

    Reads the run (one indexed query per look); a handle whose id names no run (not dispatched yet: a
    later chain step) is ``PENDING``, unless a configured result backend holds a final state for it (a
    chord's body that never ran: a header part failed), which is then what it reports. A final failure is raised as
    :class:`~supervisor_app.core.errors.RunFailed`, whose message is the run's last error (the task's
    exception type and message): the same with or without a result backend. (A result backend's
    own ``AsyncResult`` has the task's exception object, stored by the worker.)
    """

    #: Set by ``apply_async`` (``AsyncResult`` has no slot for them).
    run_id: int | None = None
    deduplicated: bool = False

    def _row(self) -> dict[str, Any] | None:
        fields = ("id", "status", "result", "last_error", "finished_at", "task_name")
        row = SupervisedRun.objects.filter(task_id=self.id).values(*fields).first()
        if row is None and _LEGACY.match(str(self.id)):
            # A handle taken before migration 0014: "<run>.<attempt>[.<token>]" named the attempt.
            pk = int(str(self.id).split(".", 1)[0])
            row = SupervisedRun.objects.filter(pk=pk).values(*fields).first()
        return None if row is None else dict(row)

    @property
    def run(self) -> SupervisedRun | None:
        """The run this handle follows (None: none recorded under this id)."""
        row = self._row()
        return None if row is None else SupervisedRun.objects.filter(pk=row["id"]).first()

    def _told(self) -> str | None:
        """For an id no run is recorded under: the final state a configured result backend holds for
        it (a chord's body that never ran because a header part failed), else None."""
        from celery.backends.base import DisabledBackend
        from celery.states import READY_STATES

        if isinstance(self.backend, DisabledBackend):
            return None
        try:
            status = self.backend.get_task_meta(self.id).get("status")
        except Exception:  # the backend is down: no run, nothing known
            logger.debug("result backend not readable for %s", self.id, exc_info=True)
            return None
        return str(status) if status in READY_STATES else None

    @property
    def state(self) -> str:  # type: ignore[override]
        row = self._row()
        if row is None:
            return self._told() or "PENDING"
        return celery_state(row["status"])

    status = state  # type: ignore[assignment]

    def ready(self) -> bool:
        row = self._row()
        if row is None:
            return self._told() is not None
        return row["status"] in TERMINAL_STATUSES

    def successful(self) -> bool:
        row = self._row()
        return row is not None and row["status"] == RunStatus.SUCCEEDED

    def failed(self) -> bool:
        row = self._row()
        return row is not None and celery_state(row["status"]) == "FAILURE"

    @property
    def result(self) -> Any:
        """The return value once succeeded, the final error (an exception) once failed, else None."""
        row = self._row()
        if row is None:
            return super().result if self._told() else None
        if row["status"] not in TERMINAL_STATUSES:
            return None
        if row["status"] == RunStatus.SUCCEEDED:
            return decode_result(row["result"])
        return self._error(row)

    info = result

    @property
    def traceback(self) -> str | None:  # type: ignore[override]
        row = self._row()
        if row is None:
            return None
        tb = RunAttempt.objects.filter(run_id=row["id"]).order_by("-number").values_list("traceback", flat=True).first()
        return tb or None

    @property
    def date_done(self) -> Any:
        row = self._row()
        return None if row is None else row["finished_at"]

    def get(  # type: ignore[override]
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float | None = None,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Wait for the run's final outcome: its value, or its final error raised (``propagate``).

        Polls the database every ``interval`` seconds (``SUPERVISOR_RESULT_POLL_INTERVAL``); raises
        ``celery.exceptions.TimeoutError`` after ``timeout`` seconds. As Celery's, it refuses to
        block inside a task (``disable_sync_subtasks``)."""
        from celery.exceptions import TaskRevokedError, TimeoutError

        if disable_sync_subtasks:
            from celery.result import assert_will_not_block  # type: ignore[attr-defined]

            assert_will_not_block()
        step = float(interval if interval is not None else supervisor_settings.RESULT_POLL_INTERVAL)
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        if follow_parents and propagate and self.parent is not None:
            self.maybe_throw_parents()
        while True:
            row = self._row()
            if row is not None and row["status"] in TERMINAL_STATUSES:
                break
            if row is None and self._told() is not None:
                # No run, but the result backend has the outcome: as Celery's own handle reads it.
                return super().get(
                    timeout=timeout,
                    propagate=propagate,
                    interval=step,
                    no_ack=no_ack,
                    callback=callback,
                    on_message=on_message,
                    on_interval=on_interval,
                    disable_sync_subtasks=disable_sync_subtasks,
                )
            if on_interval is not None:
                on_interval()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("The operation timed out.")
            time.sleep(step if deadline is None else max(0.0, min(step, deadline - time.monotonic())))
        status = row["status"]
        value: Any
        if status == RunStatus.SUCCEEDED:
            value = decode_result(row["result"])
        elif status in FAILED_STATUSES:
            value = self._error(row)
        else:
            value = TaskRevokedError(f"run {row['id']} was {status}")
        if callback is not None:
            callback(self.id, value)
        if propagate and isinstance(value, BaseException):
            raise value
        return value

    wait = get  # type: ignore[assignment]

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: Any = None,
        wait: bool = False,
        timeout: Any = None,
    ) -> None:
        """Cancel the run, as the admin's cancel does: at once while no agent holds it, else at its
        body's next lease renewal (``terminate`` and ``signal`` are not needed: the worker's lease
        keeper stops the body in-process). Not Celery's revoke, which would make workers drop every
        later attempt of the run, all published under this one id. An id with no run: Celery's."""
        from .. import runs

        row = self._row()
        if row is None:
            super().revoke(connection=connection, terminate=terminate, signal=signal, wait=wait, timeout=timeout)
            return
        runs.request_cancel(int(row["id"]))

    def maybe_throw_parents(self) -> None:
        """Raise the final error of a failed earlier step of the chain, as Celery's ``get`` does."""
        node = self.parent
        while node is not None:
            if isinstance(node, RunResult):
                row = node._row()
                if row is not None and row["status"] in FAILED_STATUSES:
                    raise node._error(row)
            node = getattr(node, "parent", None)

    def _error(self, row: dict[str, Any]) -> BaseException:
        """The final error of a run that did not succeed, from the database (whether or not a result
        backend is configured, and before it has been told): :class:`RunFailed` with the last error."""
        return final_error(row["task_name"], row["id"], row["status"], row["last_error"])

    def __repr__(self) -> str:
        return f"<RunResult: {self.id}>"
