"""``SupervisedTask``, the Celery base class users build on (public as ``supervisor_app.tasks.SupervisedTask``,
where the usage example is).

Its ``apply_async`` records the run before publishing; its ``__call__`` hands each delivered attempt to
:func:`~supervisor_app.worker.execute.execute` (claim, lease, fenced finish).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any, ClassVar

from celery import Task

from .. import runs
from ..broker import HEADER_ATTEMPT, HEADER_RUN
from ..conf import supervisor_settings
from ..core import unique
from ..core.delay import dispatch_delay
from ..core.ids import new_task_id
from ..core.policies import RunPolicy
from ..core.retry import RetryPolicy, exception_types
from ..core.workflow import (
    CANVAS_OPTIONS,
    CONTINUATION_OPTIONS,
    IGNORED_OPTIONS,
    canvas_of,
    from_request,
    has_continuation,
)
from ..models import AdoptedMessage
from ..runs import effects
from . import execute
from .results import RunResult

logger = logging.getLogger("supervisor_app")


class SupervisedTask(Task):  # type: ignore[misc]
    """A Celery task whose every run is recorded, leased, supervised and fenced.

    Class attributes (or ``@shared_task(...)`` options) override the ``SUPERVISOR_*`` settings;
    ``None`` means "use the setting".
    """

    #: Marks supervised tasks in Celery's registry (``supervisor_app.registry``), so that the layers
    #: below can tell them apart without importing this class.
    supervised: ClassVar[bool] = True
    #: Celery's ``track_started`` as configured (the task's option; None: ``task_track_started``). The
    #: agent stores ``STARTED`` once its claim is won (``worker.started``); Celery's tracer, which
    #: would store it for every delivery, duplicates included, sees ``track_started`` False.
    report_started: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # ``@shared_task(base=SupervisedTask, track_started=True)`` puts the option in the class: keep
        # it as ``report_started`` and let the property below answer the tracer.
        if "track_started" in cls.__dict__ and not isinstance(cls.__dict__["track_started"], property):
            value = cls.__dict__["track_started"]
            if value is not None:
                cls.report_started = bool(value)
            delattr(cls, "track_started")

    @property
    def track_started(self) -> bool:  # type: ignore[override]
        """False for Celery's tracer, which stores ``STARTED`` before the task's code runs, so a
        duplicate delivery would overwrite a stored ``SUCCESS``; see ``report_started``."""
        return False

    #: Seconds a lease lasts after each renewal (``SUPERVISOR_LEASE_TIMEOUT``).
    lease_timeout: float | None = None
    #: Seconds between automatic lease renewals (``SUPERVISOR_HEARTBEAT_INTERVAL``).
    heartbeat_interval: float | None = None
    #: Attempts before the run is dead (``SUPERVISOR_MAX_ATTEMPTS``).
    max_attempts: int | None = None
    #: Backoff base, cap and jitter after a retryable error (``SUPERVISOR_BACKOFF*``).
    backoff: float | None = None
    backoff_max: float | None = None
    backoff_jitter: bool | None = None
    #: Exception types retried / failed at once (``SUPERVISOR_[NON_]RETRYABLE_EXCEPTIONS``).
    retryable_exceptions: tuple[type[BaseException], ...] | None = None
    non_retryable_exceptions: tuple[type[BaseException], ...] | None = None
    #: Seconds an attempt may run before it is timed out (fenced, its body interrupted) and retried
    #: (``SUPERVISOR_MAX_RUNTIME``).
    max_runtime: float | None = None
    #: Seconds a published attempt may wait unstarted before it is published again.
    start_timeout: float | None = None
    #: Unique runs: dispatches with equal values of these arguments (names, passed by position or by
    #: keyword; ``"args"``: all of them) share one run while it is active: dispatching again records
    #: nothing and returns that run's handle. ``apply_async(unique_key=...)`` gives a key per call.
    unique_by: str | tuple[str, ...] | None = None
    #: Seconds (or a timedelta): a unique run holds its key that long after its dispatch, whatever
    #: its status ("at most once per period"). ``apply_async(unique_for=...)`` per call.
    unique_for: float | timedelta | None = None
    #: At most this many runs of the task execute at once, across every worker (None: no limit).
    #: The others wait in the database (status ``waiting``), holding no worker, and start as slots free.
    concurrency_limit: int | None = None
    #: The limit applies per key: the names of the arguments that make it (``("customer",)``), or
    #: ``"args"`` for all of them. None: one limit for the whole task.
    concurrency_by: str | tuple[str, ...] | None = None
    #: Write the run's success before the task returns to Celery (``SUPERVISOR_STRICT_FINISH``). Off,
    #: a successful attempt's completion is queued in the worker process and written with others in
    #: one statement within ``SUPERVISOR_FINISH_DELAY``: a crash in between runs the body again.
    strict_finish: bool | None = None

    # ------------------------------------------------------------------ policy

    def resolved_heartbeat_interval(self) -> float:
        return float(self.heartbeat_interval or supervisor_settings.heartbeat_interval)

    def run_policy(self) -> RunPolicy:
        lease = float(self.lease_timeout or supervisor_settings.lease_timeout)
        return RunPolicy(
            max_attempts=int(self.max_attempts or supervisor_settings.max_attempts),
            lease_timeout=lease,
            start_timeout=float(self.start_timeout or supervisor_settings.start_timeout),
            max_runtime=self.max_runtime if self.max_runtime is not None else supervisor_settings.max_runtime,
        )

    def retry_policy(self, max_attempts: int | None = None) -> RetryPolicy:
        s = supervisor_settings
        return RetryPolicy(
            max_attempts=int(max_attempts or self.max_attempts or s.max_attempts),
            backoff=float(self.backoff if self.backoff is not None else s.retry_backoff),
            backoff_max=float(self.backoff_max if self.backoff_max is not None else s.retry_backoff_max),
            jitter=bool(self.backoff_jitter if self.backoff_jitter is not None else s.backoff_jitter),
            retryable=tuple(self.retryable_exceptions)
            if self.retryable_exceptions is not None
            else exception_types(s.RETRYABLE_EXCEPTIONS),
            non_retryable=tuple(self.non_retryable_exceptions)
            if self.non_retryable_exceptions is not None
            else exception_types(s.NON_RETRYABLE_EXCEPTIONS),
        )

    # ------------------------------------------------------------------ dispatch

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        """Record the run, then publish it after the surrounding transaction commits.

        If the broker is down the run stays ``queued`` and the supervisor publishes it later.
        Messages that already carry a run (the supervisor's own publishes) and eager mode go
        straight to Celery. A unique dispatch (``unique_key=``, or the task's ``unique_by``) that finds
        a run holding its key records nothing and returns that run's handle (``result.deduplicated``);
        so does a dispatch whose ``task_id`` names a recorded run.

        Canvas (``link``, ``link_error``, and the chain, chord and group a Celery workflow passes) is
        kept with the run and dispatched once its final status is recorded (``runs.workflow``).
        Returns a :class:`~supervisor_app.worker.results.RunResult` that follows the run.
        """
        given_key, window = options.pop("unique_key", None), options.pop("unique_for", self.unique_for)
        headers = options.get("headers") or {}
        if HEADER_RUN in headers or self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        if shadow is not None:
            raise NotImplementedError(f"{self.name}: shadow= is not supported for supervised tasks")
        for name in IGNORED_OPTIONS:
            options.pop(name, None)
        canvas = canvas_of(options, link, link_error)
        for name in CANVAS_OPTIONS:
            options.pop(name, None)
        if "parent_id" not in canvas:
            # Dispatched from a task: this run's place in the workflow is under it (kept with the run,
            # so a republished attempt carries it too).
            parent = self.app.current_worker_task
            if parent is not None and parent.request.id:
                canvas["parent_id"] = parent.request.id
                canvas.setdefault("root_id", parent.request.root_id or parent.request.id)
        if "root_id" not in canvas and has_continuation(canvas):
            # The first step of a workflow is its root: the admin's workflow view starts from it.
            task_id = task_id or new_task_id()
            canvas["root_id"] = task_id
        run = runs.create_run(
            self.name,
            args,
            kwargs,
            self.run_policy(),
            options={**options, **canvas},
            countdown=dispatch_delay(options.pop("countdown", None), options.pop("eta", None)),
            unique_key=self.unique_key_for(args, kwargs, given_key),
            unique_for=unique.window_seconds(window),
            task_id=task_id,
        )
        assert run is not None  # only schedule slots can be refused
        return self._handle(run.celery_task_id, run.pk, run.deduplicated)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> RunResult:
        """The handle of the run ``task_id``: follows the run (see :class:`RunResult`). Celery's
        canvas asks the task for it, so a chain's or group's frozen results follow their runs too."""
        return RunResult(task_id, backend=self.backend, app=self.app, **kwargs)

    def _handle(self, task_id: str, run_id: int, deduplicated: bool) -> RunResult:
        result = self.AsyncResult(task_id)
        result.run_id, result.deduplicated = run_id, deduplicated
        return result

    def unique_key_for(self, args: Any = None, kwargs: Any = None, given: str | None = None) -> str | None:
        """The key a dispatch with these arguments holds (None: not unique): ``given`` (a call's
        ``unique_key``), else the values of the task's ``unique_by`` arguments, hashed."""
        if given is not None:
            return unique.given_key(given)
        if self.unique_by is None:
            return None
        return unique.arguments_key(self.run, self.unique_by, args, kwargs)

    def dispatch_many(self, calls: Any, **options: Any) -> list[Any]:
        """Fan-out: record one run per ``(args, kwargs)`` pair of ``calls`` and publish them after the
        surrounding transaction commits, through one producer. Returns their handles, in order.

        Each call behaves as ``apply_async(args, kwargs, **options)`` would (the same policy,
        options, ``countdown``, ``unique_key``/``unique_by`` and ``unique_for``), but the runs are
        recorded together: one multi-row ``INSERT`` per 5,000 runs on PostgreSQL (unique calls are
        inserted one by one, to find each key's holder). Every call's arguments are checked before
        anything is recorded: a call that is not JSON (or over ``SUPERVISOR_MAX_ARGS_BYTES``) raises
        ``TypeError`` (``ValueError``) naming its index, and nothing of the batch is recorded. The
        batch is all or nothing: in the caller's transaction, or in one of its own.
        """
        given_key, window = options.pop("unique_key", None), options.pop("unique_for", self.unique_for)
        pairs = list(calls)
        if self.app.conf.task_always_eager:
            return [self.apply_async(args, kwargs, unique_key=given_key, **options) for args, kwargs in pairs]
        for name in ("link", "link_error", "task_id", "producer", "shadow"):
            if options.get(name) is not None:
                raise NotImplementedError(f"dispatch_many does not take {name}=")
        delay = dispatch_delay(options.pop("countdown", None), options.pop("eta", None))
        keys = None
        if given_key is not None or self.unique_by is not None:
            keys = [self.unique_key_for(*self._pair(i, pair), given=given_key) for i, pair in enumerate(pairs)]
        created = runs.create_runs(
            self.name,
            pairs,
            self.run_policy(),
            options=options,
            countdown=delay,
            unique_keys=keys,
            unique_for=unique.window_seconds(window),
        )
        return [self._handle(one.task_id, one.run_id, one.deduplicated) for one in created]

    def _pair(self, index: int, pair: Any) -> tuple[Any, Any]:
        try:
            args, kwargs = pair
        except (TypeError, ValueError):
            raise TypeError(f"{self.name}: call {index} of dispatch_many must be an (args, kwargs) pair") from None
        return args, kwargs

    # ------------------------------------------------------------------ execution

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        run_id = getattr(request, HEADER_RUN, None)
        attempt = getattr(request, HEADER_ATTEMPT, None)
        if request.called_directly or request.is_eager:
            return self.run(*args, **kwargs)  # called as a function or eagerly: nothing to supervise
        if run_id is None and attempt is None:
            # A plain message with no run: a producer that bypassed apply_async (send_task from
            # another service, a non-supervising beat). Adopt it: record a run for it here and
            # execute that run's attempt 1, so a crash from now on is recovered like any other.
            adopted = self._adopt(args, kwargs)
            if adopted is None:
                return self.run(*args, **kwargs)
            run_id, attempt = adopted, 1
            setattr(request, HEADER_RUN, run_id)  # self.run_id, effect() and heartbeat() see it
            setattr(request, HEADER_ATTEMPT, attempt)
        try:
            run, number = int(str(run_id)), int(str(attempt))
        except (TypeError, ValueError):
            run, number = 0, 0
        # The canvas this message carries is the run's (kept with it): its continuation is dispatched
        # once, when the run's final status is recorded (runs.workflow), never by Celery's tracer for
        # one attempt, which would fire errbacks for an attempt that will be retried, or the next
        # step twice.
        workflow = any(getattr(request, name, None) for name in CONTINUATION_OPTIONS)
        for name in CONTINUATION_OPTIONS:
            setattr(request, name, None)
        if run < 1 or number < 1:
            # Half a fencing token is no token: never run such a message outside the fence.
            logger.error(
                "%s: message %s has a malformed run/attempt (%r, %r); dropped", self.name, request.id, run_id, attempt
            )
            from celery.exceptions import Ignore

            raise Ignore()
        return execute.execute(self, run, number, args, kwargs, workflow=workflow)

    def _adopt(self, args: Any, kwargs: Any) -> int | None:
        """Record a run for a message that carries none; None if it can't be recorded.

        Keyed by the message's Celery id: a redelivery of the same message (a worker lost with it
        unacknowledged, a connection dropped) finds the run the first delivery recorded, and its
        attempt 1 is then claimed or refused like any supervised message's: run once, not twice.
        """
        from django.db import DatabaseError, IntegrityError

        request = self.request
        message_id = str(request.id) if request.id else None
        try:
            # The message's canvas (a plain send_task with link=, a chain step) becomes the run's.
            canvas = canvas_of(from_request(request))
            run = runs.create_run(
                self.name,
                args,
                kwargs,
                self.run_policy(),
                options=canvas,
                publish=False,
                adopted_message_id=message_id,
                task_id=message_id,
            )
        except IntegrityError as exc:
            # Recorded by an earlier delivery of this very message: that run's attempt 1 is this
            # one, and the claim decides whether it still runs (it does only if it never started).
            try:
                pk = AdoptedMessage.objects.filter(pk=message_id).values_list("run_id", flat=True).first()
            except DatabaseError as again:
                self._unsupervised(again)
                return None
            if pk is None:
                self._unsupervised(exc)
                return None
            logger.warning("%s: message %s redelivered; adopted before as run %s", self.name, message_id, pk)
            return int(pk)
        except (DatabaseError, TypeError, ValueError) as exc:
            self._unsupervised(exc)
            return None
        assert run is not None  # only schedule slots can be refused
        logger.warning(
            "%s: message %s carried no run; adopted as run %s (sent without apply_async?)",
            self.name,
            self.request.id,
            run.pk,
        )
        return int(run.pk)

    def _unsupervised(self, exc: Exception) -> None:
        """Nothing can be recorded (database down, arguments not JSON): the message runs as plain
        Celery would run it, once and unsupervised, and the log says so."""
        logger.warning(
            "%s: message %s carries no run and none could be recorded (%s); executed unsupervised",
            self.name,
            self.request.id,
            type(exc).__name__,
        )

    @property
    def checkpoint(self) -> Any:
        """The last checkpoint saved by an earlier attempt of this run (None on a fresh run)."""
        return getattr(self.request, "supervisor_checkpoint", None)

    @property
    def run_id(self) -> int | None:
        value = getattr(self.request, HEADER_RUN, None)
        return None if value is None else int(value)

    @property
    def attempt(self) -> int | None:
        value = getattr(self.request, HEADER_ATTEMPT, None)
        return None if value is None else int(value)

    @property
    def idempotency_key(self) -> str | None:
        """A key that is the same on every attempt of this run, for services that deduplicate on one.

        None outside a supervised execution (called directly, eager).
        """
        run_id = self.run_id
        return None if run_id is None else effects.idempotency_key(run_id)

    def effect(self, key: str) -> AbstractContextManager[bool]:
        """``with self.effect("key") as first:`` perform a database side effect once per run.

        The block is a transaction holding the effect's record (unique per run and key) and your
        writes; ``first`` is False when an earlier attempt already committed it. Raises ``LeaseLost``
        in a zombie whose run was taken over. See :mod:`supervisor_app.idempotency`.
        """
        return effects.effect(self.run_id, key, self.attempt)

    def heartbeat(self, progress: Any = None, checkpoint: Any = None) -> None:
        """Renew the lease now, optionally recording progress and a JSON checkpoint.

        Raises :class:`~supervisor_app.core.errors.LeaseLost` when this agent no longer holds the run
        (write nothing more), :class:`~supervisor_app.core.errors.RunCancelled` on an operator's cancel.
        Outside a supervised execution (called directly, eager) it does nothing.
        """
        run_id, attempt = self.run_id, self.attempt
        if run_id is None or attempt is None:
            return
        if checkpoint is not None:
            setattr(self.request, "supervisor_checkpoint", checkpoint)  # noqa: B010
        execute.heartbeat(run_id, attempt, progress=progress, checkpoint=checkpoint)
