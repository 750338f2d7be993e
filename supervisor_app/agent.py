"""The agent side: claim an attempt, keep its lease alive off the task's thread, finish it fenced.

One :class:`LeaseKeeper` thread per worker process renews every lease the process holds with a
single statement per interval, so heartbeats cost one query per process, not one per run, and need
no code in the task body. Task code that wants to report progress, save a checkpoint or stop early
calls ``SupervisedTask.heartbeat()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections, connection

from . import services
from .conf import supervisor_settings
from .states import FailureDecision, LeaseLost, RetryPolicy, RunCancelled, decide_failure

if TYPE_CHECKING:
    from .tasks import SupervisedTask

logger = logging.getLogger("supervisor_app")
T = TypeVar("T")

#: The database could not be reached or the connection broke (restart, failover, connection limit,
#: network): worth waiting out. Other database errors are bugs and are not retried.
UNAVAILABLE = (OperationalError, InterfaceError)


@dataclass
class _Lease:
    interval: float
    #: Monotonic time until which the lease is surely held: the start of the last statement that
    #: renewed it, plus the lease timeout. Lets the agent ride out a database outage shorter than
    #: the lease without ever working past a lease the supervisor could have handed on.
    held_until: float
    lease_timeout: float
    lost: bool = False
    cancel_requested: bool = False
    #: The body runs on the process's main thread (prefork, solo): it can be interrupted.
    interruptible: bool = False


@dataclass
class LeaseKeeper:
    """Renews the leases of the runs executing in this process (any pool: prefork, threads)."""

    _leases: dict[tuple[int, int], _Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pid: int = 0
    renewals: int = 0

    def register(
        self,
        run_id: int,
        attempt: int,
        interval: float,
        lease_timeout: float,
        since: float,
        interruptible: bool = False,
    ) -> None:
        with self._lock:
            self._leases[(run_id, attempt)] = _Lease(
                interval, since + lease_timeout, lease_timeout, interruptible=interruptible
            )
            self._ensure_thread()
        self._wake.set()  # pick up a shorter interval at once

    def unregister(self, run_id: int, attempt: int) -> _Lease | None:
        with self._lock:
            return self._leases.pop((run_id, attempt), None)

    def state(self, run_id: int, attempt: int) -> _Lease | None:
        with self._lock:
            return self._leases.get((run_id, attempt))

    def mark(self, run_id: int, attempt: int, held: bool, cancel_requested: bool, since: float) -> None:
        """Record a renewal's answer; ``since`` is when its statement was sent (monotonic)."""
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is not None:
                lease.lost = lease.lost or not held
                lease.cancel_requested = lease.cancel_requested or cancel_requested
                if held:
                    lease.held_until = max(lease.held_until, since + lease.lease_timeout)

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
        since = time.monotonic()
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
            lease = self.state(run_id, attempt)
            # A run that finished while the statement ran is no longer registered: not a loss.
            if lease is None:
                continue
            news = (not st.held and not lease.lost) or (st.cancel_requested and not lease.cancel_requested)
            if not st.held:
                logger.warning("run %s attempt %s lost its lease", run_id, attempt)
            self.mark(run_id, attempt, st.held, st.cancel_requested, since)
            if news and lease.interruptible:
                _interrupt_body((run_id, attempt), cancel=st.held and st.cancel_requested)


lease_keeper = LeaseKeeper()


# ---------------------------------------------------------------- interrupting a body
#
# A body that never calls heartbeat() would only learn of a lost lease or a cancel when it returns.
# The lease keeper learns of it at its next renewal; it then signals its own process, and the
# handler, which Python runs on the main thread between two bytecodes (also breaking a sleep or a
# blocking read), raises LeaseLost / RunCancelled in the body if that body is still the one running.
# The check runs on the main thread itself, so a body that has just returned is never hit.

INTERRUPT_SIGNAL = signal.SIGUSR2


@dataclass
class _Body:
    current: tuple[int, int] | None = None
    pending: tuple[tuple[int, int], bool] | None = None
    #: The body interrupted last: it may have been stopped in the middle of a database call.
    fired: tuple[int, int] | None = None
    warned: bool = False


_body = _Body()


def _on_interrupt(signum: int, frame: Any) -> None:
    pending, _body.pending = _body.pending, None
    if pending is None or pending[0] != _body.current:
        return  # the body it was meant for has finished already
    (run_id, attempt), cancel = pending
    _body.fired = pending[0]
    if cancel:
        raise RunCancelled(f"run {run_id} was cancelled (body interrupted)")
    raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease (body interrupted)")


def _can_interrupt() -> bool:
    """Install the handler once per process, on the main thread, unless the signal is taken."""
    if not supervisor_settings.raw("INTERRUPT_BODIES") or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(INTERRUPT_SIGNAL)
    if current is _on_interrupt:
        return True
    if current == signal.SIG_DFL:  # someone else's handler is never replaced
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
        return True
    if not _body.warned:
        _body.warned = True
        logger.info("SIGUSR2 has a handler already: bodies are not interrupted, they stop at heartbeat()")
    return False


def _interrupt_body(key: tuple[int, int], cancel: bool) -> None:
    _body.pending = (key, cancel)
    logger.warning(
        "run %s attempt %s: interrupting the body (%s)", key[0], key[1], "cancelled" if cancel else "lease lost"
    )
    signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)


def heartbeat(run_id: int, attempt: int, progress: Any = None, checkpoint: Any = None) -> None:
    """Explicit heartbeat from the task body: raises LeaseLost / RunCancelled when it must stop.

    If the database can't be reached, the body goes on while the lease is surely still held (see
    ``_Lease.held_until``): that heartbeat's progress and checkpoint are not saved, and the next
    heartbeat saves newer ones. Past that point it raises LeaseLost, as the supervisor may already
    have handed the run to another agent.
    """
    local = lease_keeper.state(run_id, attempt)
    if local is not None and local.lost:
        raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease")
    since = time.monotonic()
    try:
        st = services.heartbeat(run_id, attempt, progress=progress, checkpoint=checkpoint)
    except UNAVAILABLE as exc:
        _drop_broken_connection()
        if local is None:
            raise
        left = local.held_until - time.monotonic()
        if left <= 0:
            raise LeaseLost(f"run {run_id} attempt {attempt}: database unreachable past the lease") from exc
        logger.warning(
            "run %s attempt %s: heartbeat not saved, database unavailable (%s); lease surely held %.1fs more",
            run_id,
            attempt,
            type(exc).__name__,
            left,
        )
        return
    lease_keeper.mark(run_id, attempt, st.held, st.cancel_requested, since)
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


def _ride_out(write: Callable[[], T], until: float, what: str) -> T:
    """``write()``, retried with backoff while the database is unavailable, until ``until`` (monotonic).

    Used for the claim and the final write of an attempt: a database restart or failover of a few
    seconds then costs a pause, not an attempt. Past ``until`` the error is raised; what is not
    written is recovered by the supervisor from the database (a queued attempt is published again,
    a running one whose lease expires is retried).
    """
    delay = 0.05
    while True:
        try:
            return write()
        except UNAVAILABLE as exc:
            _drop_broken_connection()
            if time.monotonic() + delay >= until:
                raise
            logger.warning("%s: database unavailable (%s); retrying in %.2fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


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
    # Bounds the claim's retries; the run's own lease timeout is known only once it is claimed.
    lease_timeout = float(task.lease_timeout or supervisor_settings.lease_timeout)
    _drop_broken_connection()
    since = time.monotonic()
    try:
        # Retrying a claim is safe (it is conditional) and costs nothing once the supervisor has
        # published the attempt again: the second delivery finds it claimed and is dropped.
        won = _ride_out(
            lambda: services.claim(run_id, attempt, worker, task_id),
            since + lease_timeout,
            f"run {run_id} attempt {attempt} claim",
        )
    except UNAVAILABLE as exc:
        # Nothing was claimed, so the attempt is still `queued` in the database: the supervisor
        # publishes it again once its start timeout passes. Requeueing the message instead would
        # spin every worker on the outage.
        logger.warning(
            "run %s attempt %s not claimed, database unavailable (%s); the supervisor will publish it again",
            run_id,
            attempt,
            type(exc).__name__,
        )
        raise Ignore() from None
    if won is None:
        # A duplicate or late delivery (republished message, broker redelivery, superseded attempt).
        logger.info("run %s attempt %s is not claimable; delivery dropped", run_id, attempt)
        raise Ignore()
    # The request context is per task execution (and per thread with the threads pool).
    setattr(request, "supervisor_checkpoint", won.checkpoint)  # noqa: B010
    interruptible = _can_interrupt()
    lease_keeper.register(
        run_id, attempt, task.resolved_heartbeat_interval(), won.lease_timeout, since, interruptible=interruptible
    )
    try:
        if interruptible:
            _body.current = (run_id, attempt)
        try:
            result = task.run(*args, **kwargs)
        finally:
            # An interrupt that lands before this line is raised here and handled below as the
            # body's; after it, the handler sees no body and ignores it.
            _body.current = None
    except BaseException as exc:
        # Stop renewing before the final write, so the keeper never reports a finished run as lost.
        lease = lease_keeper.unregister(run_id, attempt)
        if _body.fired == (run_id, attempt):
            # Stopped wherever it was, perhaps halfway through a query: start the final write on a
            # fresh connection.
            _body.fired = None
            connection.close()
        if not isinstance(exc, Exception) or isinstance(exc, Ignore):
            # SystemExit, KeyboardInterrupt, a revoke's termination: the attempt is left running and
            # its lease expires; the supervisor decides, from the database, what happens next.
            raise
        _drop_broken_connection()  # the body's error may be the database's: record it on a fresh connection
        if isinstance(exc, RunCancelled):
            _finish(lease, lambda: services.finish_cancelled(run_id, attempt, worker), run_id, attempt)
            raise Ignore() from None
        if isinstance(exc, LeaseLost):
            _finish(lease, lambda: services.record_fenced(run_id, attempt, worker), run_id, attempt)
            raise Ignore() from None
        failure, error, tb = exc, f"{type(exc).__name__}: {exc}", traceback.format_exc()

        def fail() -> None:
            policy = effective_retry_policy(task, run_id, won.max_attempts)
            decision: FailureDecision = decide_failure(policy, attempt, failure)
            services.finish_failure(run_id, attempt, decision, error, tb, worker)

        _finish(lease, fail, run_id, attempt)
        raise
    lease = lease_keeper.unregister(run_id, attempt)
    _finish(lease, lambda: services.finish_success(run_id, attempt, worker), run_id, attempt)
    return result


def _finish(lease: _Lease | None, write: Callable[[], object], run_id: int, attempt: int) -> None:
    """The attempt's final write, retried through a database outage while the lease surely holds.

    If the outage outlasts the lease, the outcome is dropped with a warning: the attempt is still
    `running` in the database, so the supervisor recovers it like any lost attempt (at-least-once).
    """
    from celery.exceptions import Ignore

    until = lease.held_until if lease is not None else time.monotonic()
    try:
        _ride_out(write, until, f"run {run_id} attempt {attempt} finish")
    except UNAVAILABLE as exc:
        logger.warning(
            "run %s attempt %s: outcome not recorded, database unavailable past the lease (%s); "
            "the supervisor will recover the attempt",
            run_id,
            attempt,
            type(exc).__name__,
        )
        raise Ignore() from None
