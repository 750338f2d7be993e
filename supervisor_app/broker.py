"""Publishing attempts to the broker: message options, the producer, revokes; no database writes.

Every publish of every attempt goes through :func:`send`, with options built by :func:`run_options`
(when a run is recorded, from ``apply_async`` options or a schedule) and :func:`send_options` (at each
publish, from what the run kept): a schedule's queue, routing key, exchange, priority, headers and
expiry reach the first message and every republished one alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from django.utils import timezone

logger = logging.getLogger("supervisor_app")

#: Message headers that carry the run and the attempt (the fencing token) to the agent. Headers,
#: not keyword arguments: a task's signature would reject unknown kwargs.
HEADER_RUN = "supervisor_run"
HEADER_ATTEMPT = "supervisor_attempt"

#: Publishing options a run keeps (as JSON, in ``SupervisedRun.options``) for every publish of it.
KEPT_OPTIONS = ("queue", "routing_key", "exchange", "priority", "expires", "headers")

#: One quick reconnect (a connection that died since its last use, a broker restart), no waiting:
#: the run is durable and the supervisor publishes it again, so blocking the caller buys nothing.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class Message(NamedTuple):
    """One attempt to publish."""

    run_id: int
    attempt: int
    task_name: str
    args: Any
    kwargs: Any
    #: The run's kept options (see :func:`run_options`).
    options: Mapping[str, Any]
    task_id: str


# --------------------------------------------------------------------------- options


def _absolute_expiry(value: Any, now: datetime | None) -> str | None:
    """An ``expires`` option as an absolute ISO time: seconds count from now (the dispatch), so a
    message published again later expires when the first one would have, not later."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).isoformat()
    if isinstance(value, datetime):
        aware = value if timezone.is_aware(value) else timezone.make_aware(value)
        return aware.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ((now or timezone.now()) + timedelta(seconds=float(value))).isoformat()
    raise TypeError(f"expires must be seconds, a datetime or an ISO time, not {value!r}")


def run_options(options: Mapping[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """The publishing options a run keeps, from ``apply_async`` options or a schedule's: JSON values
    only (``expires`` absolute, see above), unset ones left out, our own headers never kept."""
    kept: dict[str, Any] = {}
    for name in KEPT_OPTIONS:
        value = (options or {}).get(name)
        if value is None:
            continue
        if name == "expires":
            value = _absolute_expiry(value, now)
        elif name == "headers":
            value = {k: v for k, v in dict(value).items() if k not in (HEADER_RUN, HEADER_ATTEMPT)}
            if not value:
                continue
        kept[name] = value
    return kept


def schedule_options(pt: Any) -> dict[str, Any]:
    """The options a django-celery-beat ``PeriodicTask`` gives its messages, as ``ModelEntry`` does:
    queue, exchange, routing key, priority, expiry (``expires`` or ``expire_seconds``) and headers
    (with ``periodic_task_name``). Raises ``ValueError`` when the headers are not a JSON object."""
    options: dict[str, Any] = {
        k: getattr(pt, k) for k in ("queue", "exchange", "routing_key", "priority") if getattr(pt, k) is not None
    }
    expires = getattr(pt, "expires_", None)
    if expires:
        options["expires"] = expires
    headers = json.loads(pt.headers or "{}")
    if not isinstance(headers, dict):
        raise ValueError(f"the headers of periodic task {pt.name!r} are not a JSON object")
    options["headers"] = {**headers, "periodic_task_name": pt.name}
    return options


def expiry(options: Mapping[str, Any]) -> datetime | None:
    """When a run's messages expire (None: never). Relative values are from rows written before
    expiry was kept absolute: they count from each publish, as they always did."""
    value = options.get("expires")
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def send_options(message: Message) -> dict[str, Any]:
    """The ``send_task`` options of one publish: the kept ones, plus the run and attempt headers."""
    out: dict[str, Any] = {k: v for k, v in message.options.items() if k in KEPT_OPTIONS}
    if isinstance(out.get("expires"), str):
        out["expires"] = datetime.fromisoformat(out["expires"])
    out["headers"] = {**(out.get("headers") or {}), HEADER_RUN: message.run_id, HEADER_ATTEMPT: message.attempt}
    return out


# --------------------------------------------------------------------------- sending


def send(message: Message, producer: Any = None) -> None:
    """Publish one attempt (raises when the broker cannot be reached)."""
    from celery import current_app

    current_app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=message.task_id,
        retry=True,
        retry_policy=RETRY_POLICY,
        producer=producer,
        # Whatever the app's task_serializer: a run's arguments are stored as JSON and travel as
        # JSON, never pickle (a worker accepting pickle would run code from anyone who can publish).
        serializer="json",
        **send_options(message),
    )


P = TypeVar("P", bound="Publisher")


class Publisher:
    """Sends attempts to the broker.

    One producer (one broker channel) serves every message of a publisher's lifetime, a sweep:
    a mass recovery publishes hundreds of messages without a pool round trip each. After one failure
    it stops trying for its lifetime, so a broker outage costs one connection error per sweep, not
    one per run. What could not be sent goes to :meth:`unsent` (``runs`` records it, so the runs stay
    queued and the next sweep tries again).
    """

    def __init__(self) -> None:
        self.broken = False
        self.sent = 0
        self.failed = 0
        self._producer: Any = None
        self._closed = False

    def _acquire(self) -> Any:
        if self._producer is None:
            from celery import current_app

            self._producer = current_app.producer_pool.acquire(block=True)
        return self._producer

    def close(self) -> None:
        """Return the producer to the pool. A publish after this (an ``on_commit`` callback of a
        transaction that outlived the ``with`` block, as when the sweep runs inside the caller's
        transaction) borrows a producer for that publish only: none is ever kept out of the pool,
        which holds ten by default and blocks the eleventh caller for ever."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.release()
            except Exception:  # a dead connection: the pool revives it on its next use
                logger.debug("producer release failed", exc_info=True)

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _try(self, message: Message) -> bool:
        if self.broken:
            return False
        try:
            send(message, producer=self._acquire())
        except Exception as exc:  # broker down, DNS, auth...: the run stays queued
            self.broken = True
            self._release()
            logger.warning(
                "could not publish run %s attempt %s (%s); it stays queued and the supervisor will publish it again",
                message.run_id,
                message.attempt,
                type(exc).__name__,
            )
            return False
        self.sent += 1
        return True

    def publish(self, message: Message) -> bool:
        return self.publish_many([message]) == 1

    def publish_many(self, messages: Iterable[Message]) -> int:
        """Publish each message; once the broker failed, the rest are handed to :meth:`unsent`
        together. Returns how many were sent."""
        sent = 0
        unsent: list[Message] = []
        try:
            for message in messages:
                if self._try(message):
                    sent += 1
                else:
                    unsent.append(message)
        finally:
            if self._closed:
                self._release()
        if unsent:
            self.failed += len(unsent)
            self.unsent(unsent)
        return sent

    def unsent(self, messages: Sequence[Message]) -> None:
        """Messages that could not be sent. Nothing to do here; ``runs.publishing`` records them."""


def revoke(task_id: str) -> None:
    """Kill the worker process running ``task_id`` (a timed-out or force-cancelled attempt)."""
    from celery import current_app

    try:
        current_app.control.revoke(task_id, terminate=True, signal="SIGKILL")
    except Exception as exc:  # the attempt is fenced anyway; a failed revoke only wastes a worker
        logger.warning("could not revoke %s (%s)", task_id, type(exc).__name__)
