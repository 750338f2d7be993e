"""The agent side: claim an attempt, keep its lease alive off the task's thread, finish it fenced.

One :class:`LeaseKeeper` thread per worker process renews every lease the process holds with a
single statement per interval, so heartbeats cost one query per process, not one per run, and need
no code in the task body. Task code that wants to report progress, save a checkpoint or stop early
calls ``SupervisedTask.heartbeat()``.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from django.db import close_old_connections, connection

from . import services
from .states import FailureDecision, LeaseLost, RetryPolicy, RunCancelled, decide_failure

if TYPE_CHECKING:
    from .tasks import SupervisedTask

logger = logging.getLogger("supervisor_app")


@dataclass
class _Lease:
    interval: float
    lost: bool = False
    cancel_requested: bool = False


@dataclass
class LeaseKeeper:
    """Renews the leases of the runs executing in this process (any pool: prefork, threads)."""

    _leases: dict[tuple[int, int], _Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pid: int = 0
    renewals: int = 0

    def register(self, run_id: int, attempt: int, interval: float) -> None:
        with self._lock:
            self._leases[(run_id, attempt)] = _Lease(interval)
            self._ensure_thread()
        self._wake.set()  # pick up a shorter interval at once

    def unregister(self, run_id: int, attempt: int) -> None:
        with self._lock:
            self._leases.pop((run_id, attempt), None)

    def state(self, run_id: int, attempt: int) -> _Lease | None:
        with self._lock:
            return self._leases.get((run_id, attempt))

    def mark(self, run_id: int, attempt: int, held: bool, cancel_requested: bool) -> None:
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is not None:
                lease.lost = lease.lost or not held
                lease.cancel_requested = lease.cancel_requested or cancel_requested

    def _ensure_thread(self) -> None:
        # After a fork (prefork pool) the parent's thread does not exist in the child: start anew.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="supervisor-lease-keeper", daemon=True)
            self._thread.start()

    def _interval(self) -> float | None:
        with self._lock:
            live = [lease.interval for lease in self._leases.values() if not lease.lost]
        return min(live) if live else None

    def _loop(self) -> None:
        while True:
            interval = self._interval()
            self._wake.clear()
            if interval is None:
                self._wake.wait(60.0)
                continue
            if self._wake.wait(interval):
                continue  # a lease was added: recompute the interval, the claim just renewed it
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            wanted = [key for key, lease in self._leases.items() if not lease.lost]
        if not wanted:
            return
        try:
            states = services.renew_leases(wanted)
        except Exception as exc:
            # A database hiccup: keep trying. If it lasts past the lease, the supervisor gives the run
            # to another agent and our next write is refused; that is the design, not a failure here.
            logger.warning("lease renewal failed (%s)", type(exc).__name__)
            close_old_connections()
            if connection.connection is not None and not connection.is_usable():
                connection.close()
            return
        self.renewals += 1
        for (run_id, attempt), st in states.items():
            # A run that finished while the statement ran is no longer registered: not a loss.
            if not st.held and self.state(run_id, attempt) is not None:
                logger.warning("run %s attempt %s lost its lease", run_id, attempt)
            self.mark(run_id, attempt, st.held, st.cancel_requested)


lease_keeper = LeaseKeeper()


def heartbeat(run_id: int, attempt: int, progress: Any = None, checkpoint: Any = None) -> None:
    """Explicit heartbeat from the task body: raises LeaseLost / RunCancelled when it must stop."""
    local = lease_keeper.state(run_id, attempt)
    if local is not None and local.lost:
        raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease")
    st = services.heartbeat(run_id, attempt, progress=progress, checkpoint=checkpoint)
    lease_keeper.mark(run_id, attempt, st.held, st.cancel_requested)
    if not st.held:
        raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease")
    if st.cancel_requested:
        raise RunCancelled(f"run {run_id} was cancelled")


def _drop_broken_connection() -> None:
    """Close this thread's database connection if an error broke it (terminated, server restarted).

    Celery keeps a worker's connection between tasks (``CELERY_DB_REUSE_MAX``) and never runs
    Django's per-request ``close_old_connections``, so without this a pool process whose connection
    was cut fails every later task with "the connection is closed". Free on the hot path: it checks
    only after an error occurred on the connection.
    """
    if connection.connection is not None and connection.errors_occurred and not connection.is_usable():
        connection.close()


def effective_retry_policy(task: SupervisedTask, run_id: int, max_attempts: int) -> RetryPolicy:
    """The task's retry policy, with the backoff of the run's schedule policy when it sets one.

    Read only on the failure path (one indexed query), so successful runs pay nothing for it.
    """
    policy: RetryPolicy = task.retry_policy(max_attempts=max_attempts)
    backoff, backoff_max = services.schedule_backoff(run_id)
    if backoff is not None:
        policy = replace(policy, backoff=backoff)
    if backoff_max is not None:
        policy = replace(policy, backoff_max=backoff_max)
    return policy


def execute(task: SupervisedTask, run_id: int, attempt: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one delivered attempt: claim, body with lease kept, fenced finish."""
    from celery.exceptions import Ignore

    request = task.request
    worker = str(getattr(request, "hostname", None) or f"pid-{os.getpid()}")
    task_id = str(getattr(request, "id", "") or "")
    _drop_broken_connection()
    won = services.claim(run_id, attempt, worker, task_id)
    if won is None:
        # A duplicate or late delivery (republished message, broker redelivery, superseded attempt).
        logger.info("run %s attempt %s is not claimable; delivery dropped", run_id, attempt)
        raise Ignore()
    # The request context is per task execution (and per thread with the threads pool).
    setattr(request, "supervisor_checkpoint", won.checkpoint)  # noqa: B010
    lease_keeper.register(run_id, attempt, task.resolved_heartbeat_interval())
    try:
        result = task.run(*args, **kwargs)
    except BaseException as exc:
        # Stop renewing before the final write, so the keeper never reports a finished run as lost.
        lease_keeper.unregister(run_id, attempt)
        if isinstance(exc, RunCancelled):
            services.finish_cancelled(run_id, attempt, worker)
            raise Ignore() from None
        if isinstance(exc, LeaseLost):
            services.record_fenced(run_id, attempt, worker)
            raise Ignore() from None
        if not isinstance(exc, Exception) or isinstance(exc, Ignore):
            # SystemExit, KeyboardInterrupt, a revoke's termination: the attempt is left running and
            # its lease expires; the supervisor decides, from the database, what happens next.
            raise
        _drop_broken_connection()  # the body's error may be the database's: record it on a fresh connection
        policy = effective_retry_policy(task, run_id, won.max_attempts)
        decision: FailureDecision = decide_failure(policy, attempt, exc)
        services.finish_failure(
            run_id, attempt, decision, f"{type(exc).__name__}: {exc}", traceback.format_exc(), worker
        )
        raise
    lease_keeper.unregister(run_id, attempt)
    services.finish_success(run_id, attempt, worker)
    return result
