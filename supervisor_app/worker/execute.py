"""Executing one delivered attempt: claim, body with the lease kept, fenced finish.

Every database call of the agent rides out a short outage (a restart, a failover) while the lease is
surely still held, and gives up before the supervisor may hand the run on: an agent never writes past
its lease (self-fencing). Task code that wants to report progress, save a checkpoint or stop early
calls ``SupervisedTask.heartbeat()`` (:func:`heartbeat` here).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connection, connections

from .. import runs
from ..conf import supervisor_settings
from ..core.errors import LeaseLost, RunCancelled
from ..core.retry import FailureDecision, RetryPolicy, decide_failure
from ..core.states import RunStatus
from ..core.unique import UniqueKeyError, arguments_key
from ..db import bound_agent_sockets, cut_socket, drop_broken_connection
from ..runs.results import encode_result
from . import interrupt, started
from .lease_keeper import Lease, lease_keeper

if TYPE_CHECKING:
    from .task import SupervisedTask

logger = logging.getLogger("supervisor_app")
T = TypeVar("T")

#: The database could not be reached or the connection broke (restart, failover, connection limit,
#: network): worth waiting out. Other database errors are bugs and are not retried.
UNAVAILABLE = (OperationalError, InterfaceError)


def heartbeat(run_id: int, attempt: int, progress: Any = None, checkpoint: Any = None) -> None:
    """Explicit heartbeat from the task body: raises LeaseLost / RunCancelled when it must stop.

    If the database can't be reached, the body goes on while the lease is surely still held (see
    ``Lease.held_until``): that heartbeat's progress and checkpoint are not saved, and the next
    heartbeat saves newer ones. Past that point it raises LeaseLost, as the supervisor may already
    have handed the run to another agent.
    """
    local = lease_keeper.checked(run_id, attempt)
    if local is not None and local.lost:
        raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease")
    since = time.monotonic()
    try:
        token = local.token if local is not None else None
        st = runs.heartbeat(run_id, attempt, progress=progress, checkpoint=checkpoint, token=token)
    except UNAVAILABLE as exc:
        drop_broken_connection()
        if local is None:
            raise
        local = lease_keeper.checked(run_id, attempt)  # the failed statement may have taken a while
        if local is None or local.lost:
            raise LeaseLost(f"run {run_id} attempt {attempt}: database unreachable past the lease") from exc
        left = local.held_until - time.monotonic()
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


def ride_out(write: Callable[[], T], until: float, what: str) -> T:
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
            drop_broken_connection()
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
    backoff, backoff_max = runs.schedule_backoff(run_id)
    if backoff is not None:
        policy = replace(policy, backoff=backoff)
    if backoff_max is not None:
        policy = replace(policy, backoff_max=backoff_max)
    return policy


def socket_timeout() -> float:
    """``SUPERVISOR_AGENT_SOCKET_TIMEOUT``, or a third of the lease timeout (at least 2 s)."""
    value = supervisor_settings.AGENT_SOCKET_TIMEOUT
    if value is not None:
        return float(value)
    return max(2.0, supervisor_settings.lease_timeout / 3)


def execute(
    task: SupervisedTask,
    run_id: int,
    attempt: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    workflow: bool = False,
) -> Any:
    """Run one delivered attempt: claim, body with lease kept, fenced finish. ``workflow``: the run
    has a continuation (callbacks, errbacks, next chain step, chord part), dispatched once its final
    status is written (so that write is never deferred)."""
    from celery.exceptions import Ignore

    request = task.request
    worker = str(getattr(request, "hostname", None) or f"pid-{os.getpid()}")
    task_id = str(getattr(request, "id", "") or "")
    # Bounds the claim's retries; the run's own lease timeout is known only once it is claimed.
    lease_timeout = float(task.lease_timeout or supervisor_settings.lease_timeout)
    drop_broken_connection()
    bound_agent_sockets(socket_timeout)
    since = time.monotonic()
    # One token for this delivery's claim, kept across its retries: a claim whose reply was lost is
    # granted again to this very delivery, and refused to any other.
    token = str(uuid.uuid4())
    limit = concurrency_limit(task, args, kwargs)
    sent = [since]
    try:
        # Retrying a claim is safe (it is conditional) and costs nothing once the supervisor has
        # published the attempt again: the second delivery finds it claimed and is dropped.
        def claim() -> runs.Claim | None:
            # The lease the claim grants runs from the database's now(), after this: measured from
            # the last statement sent (not from before its retries), the local bound stays true.
            sent[0] = time.monotonic()
            return runs.claim(run_id, attempt, worker, task_id, token=token, limit=limit)

        won = ride_out(claim, since + lease_timeout, f"run {run_id} attempt {attempt} claim")
        for _ in range(3):
            if won is not None or limit is None:
                break
            state = ride_out(
                lambda: runs.wait_for_slot(run_id, attempt, *limit), since + lease_timeout, f"run {run_id} wait"
            )
            if state == "waiting":
                logger.info("run %s: every slot of its concurrency limit is taken; it waits for one", run_id)
                raise Ignore()
            if state == "gone":
                break
            won = ride_out(claim, since + lease_timeout, f"run {run_id} attempt {attempt} claim")
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
    # Only the delivery that won the claim tells the result backend it started (never a duplicate).
    started.store_started(task, worker)
    try:
        deferred = defers_finish(task, limit is not None) and not workflow
        return _run(task, won, worker, sent[0], args, kwargs, deferred=deferred, workflow=workflow)
    finally:
        if limit is not None:
            hand_on_slot(limit[0])


def concurrency_limit(task: SupervisedTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, int] | None:
    """The run's concurrency key and limit, or None when the task has no limit."""
    limit = task.concurrency_limit
    if not limit:
        return None
    spec = task.concurrency_by
    if spec is None:
        return task.name[:200], int(limit)
    try:
        # The same key as unique runs use: the named arguments' canonical JSON, hashed.
        key = arguments_key(task.run, spec, args, kwargs)
    except UniqueKeyError as exc:
        # The body will fail on the same arguments; don't let the limit hide the real error.
        logger.error("run of %s: concurrency_by %r can't be read from the call (%s); not limited", task.name, spec, exc)
        return None
    return f"{task.name[:120]}:{key}", int(limit)


def hand_on_slot(key: str) -> None:
    """The run held a slot: give it to the oldest run waiting for one (the sweep does it otherwise)."""
    try:
        with runs.RunPublisher() as publisher:
            runs.release_waiters(key, publisher)
    except Exception as exc:
        drop_broken_connection()
        logger.warning("slot of %s not handed on (%s); the supervisor's sweep will", key, type(exc).__name__)


def _run(
    task: SupervisedTask,
    won: runs.Claim,
    worker: str,
    since: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    deferred: bool = False,
    workflow: bool = False,
) -> Any:
    """The body of a claimed attempt, its lease kept, then its fenced finish (and the run's workflow
    continuation, once its final status is written).

    A failure that will be retried reaches Celery as ``Retry`` (a result backend stores ``RETRY``;
    no errback, no chord part): only a run's final failure is a Celery failure."""
    from celery.exceptions import Ignore

    run_id, attempt, token, request = won.run_id, won.attempt, won.token, task.request
    # The request context is per task execution (and per thread with the threads pool).
    setattr(request, "supervisor_checkpoint", won.checkpoint)  # noqa: B010
    stop, hard_stop = interrupt.stopper((run_id, attempt))
    interruptible = interrupt.can_interrupt()
    lease_keeper.register(
        run_id,
        attempt,
        task.resolved_heartbeat_interval(),
        won.lease_timeout,
        since,
        token=won.token,
        stop=stop,
        hard_stop=hard_stop,
        cut_body=_body_socket_cutter(),
    )
    try:
        if interruptible:
            interrupt.body.current = (run_id, attempt)
        try:
            result = task.run(*args, **kwargs)
        finally:
            # An interrupt that lands before this line is raised here and handled below as the
            # body's; after it, the handler sees no body and ignores it.
            interrupt.body.current = None
    except BaseException as exc:
        # Stop renewing before the final write, so the keeper never reports a finished run as lost.
        lease = lease_keeper.unregister(run_id, attempt)
        if interrupt.body.fired == (run_id, attempt):
            # Stopped wherever it was, perhaps halfway through a query: start the final write on a
            # fresh connection.
            interrupt.body.fired = None
            connection.close()
        if not isinstance(exc, Exception) or isinstance(exc, Ignore):
            # SystemExit, KeyboardInterrupt, a revoke's termination: the attempt is left running and
            # its lease expires; the supervisor decides, from the database, what happens next.
            raise
        drop_broken_connection()  # the body's error may be the database's: record it on a fresh connection
        if isinstance(exc, RunCancelled):
            finish(lease, lambda: runs.finish_cancelled(run_id, attempt, worker, token), run_id, attempt)
            raise Ignore() from None
        if isinstance(exc, LeaseLost):
            finish(lease, lambda: runs.record_fenced(run_id, attempt, worker), run_id, attempt)
            raise Ignore() from None
        failure, error, tb = exc, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        decided: list[FailureDecision] = []

        def fail() -> None:
            policy = effective_retry_policy(task, run_id, won.max_attempts)
            decision: FailureDecision = decide_failure(policy, attempt, failure)
            if runs.finish_failure(run_id, attempt, decision, error, tb, worker, token):
                decided.append(decision)

        finish(lease, fail, run_id, attempt)
        if not decided:
            # Refused: a zombie's failure, while the run goes on elsewhere. Celery (a result backend,
            # errbacks) must not hear of it.
            raise Ignore() from None
        if decided[0].status == RunStatus.RETRYING:
            from celery.exceptions import Retry

            raise Retry(exc=failure, when=decided[0].retry_in) from failure  # type: ignore[arg-type]
        if workflow:
            follow_up(run_id, failure)
        raise
    encoded = encode_result(task.name, result)
    if deferred and lease_keeper.complete(run_id, attempt, worker, encoded):
        return result  # written by this process's lease keeper, with others, within the finish delay
    lease = lease_keeper.unregister(run_id, attempt)
    written = finish(
        lease,
        lambda: runs.finish_success(run_id, attempt, worker, token, encoded),
        run_id,
        attempt,
        completed=True,
    )
    if not written:
        raise Ignore()  # refused: a zombie's success, while the run goes on elsewhere (as above)
    if workflow:
        follow_up(run_id)
    return result


def follow_up(run_id: int, error: BaseException | None = None) -> None:
    """Dispatch the run's workflow continuation now that its final status is written. Best effort:
    whatever is not dispatched here (broker down, a crash) the supervisor's sweep dispatches."""
    try:
        runs.follow_up([run_id], error=error)
    except Exception as exc:
        drop_broken_connection()
        logger.warning(
            "run %s: workflow continuation not dispatched (%s); the supervisor will", run_id, type(exc).__name__
        )


def defers_finish(task: SupervisedTask, limited: bool) -> bool:
    """Whether a success of ``task`` is queued for the lease keeper rather than written before the
    task returns: not in strict mode (the task's ``strict_finish``, else ``SUPERVISOR_STRICT_FINISH``),
    only in a Celery worker (where the keeper outlives the task), and never for a run holding a
    concurrency slot (the slot is handed on right after the write)."""
    strict = task.strict_finish if task.strict_finish is not None else supervisor_settings.STRICT_FINISH
    return not strict and not limited and lease_keeper.in_worker


def _body_socket_cutter() -> Callable[[], None]:
    """Cuts the socket of the body's database connection (this thread's), from the keeper's thread."""
    wrapper = connections[DEFAULT_DB_ALIAS]  # this thread's wrapper; its raw connection may change

    def cut() -> None:
        raw = wrapper.connection
        if raw is None or wrapper.vendor != "postgresql":
            return
        try:
            fd = int(raw.fileno())
        except Exception:
            return
        cut_socket(fd)

    return cut


def finish(
    lease: Lease | None, write: Callable[[], object], run_id: int, attempt: int, completed: bool = False
) -> object:
    """The attempt's final write, retried through a database outage while the lease surely holds;
    returns what ``write`` returned.

    If the outage outlasts the lease, the outcome is dropped with a warning: the attempt is still
    `running` in the database, so the supervisor recovers it like any lost attempt (at-least-once).
    """
    from celery.exceptions import Ignore

    if lease is not None and lease.unprovable and not completed:
        # Self-fenced and stopped: the supervisor may have handed the run on already, and this body
        # did not finish its work. Nothing is recorded; the run is recovered from the database.
        logger.warning("run %s attempt %s: self-fenced, nothing recorded; the supervisor recovers it", run_id, attempt)
        raise Ignore()
    # A body that completed although its lease could not be confirmed (a slow database, not a
    # partition) is still recorded once, if the database confirms the claim: the write is fenced by
    # the claim's token, so it can't win once the run was handed on.
    until = lease.held_until if lease is not None else time.monotonic()
    try:
        return ride_out(write, until, f"run {run_id} attempt {attempt} finish")
    except UNAVAILABLE as exc:
        logger.warning(
            "run %s attempt %s: outcome not recorded, database unavailable past the lease (%s); "
            "the supervisor will recover the attempt",
            run_id,
            attempt,
            type(exc).__name__,
        )
        raise Ignore() from None
