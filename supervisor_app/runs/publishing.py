"""Publishing attempts of recorded runs, after commit, and recording what could not be sent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connections, router, transaction
from django.db.models.functions import Now

from .. import broker
from ..core.ids import legacy_task_id
from ..core.states import RunStatus
from ..models import SupervisedRun

Message = broker.Message


class RunPublisher(broker.Publisher):
    """A :class:`~supervisor_app.broker.Publisher` that records, in the runs table, the attempts it
    could not send: ``next_check_at = now()`` so the next sweep tries again at once (rather than after
    the start timeout), ``publish_count = 0`` (it was counted optimistically). One UPDATE per attempt
    number, in batches, not one per run."""

    def unsent(self, messages: Sequence[Message]) -> None:
        by_attempt: dict[int, list[int]] = {}
        for message in messages:
            by_attempt.setdefault(message.attempt, []).append(message.run_id)
        for attempt, ids in by_attempt.items():
            for start in range(0, len(ids), 500):
                SupervisedRun.objects.filter(
                    pk__in=ids[start : start + 500], attempt=attempt, status=RunStatus.QUEUED
                ).update(next_check_at=Now(), publish_count=0)


def message(run: SupervisedRun, attempt: int, task_id: str) -> Message:
    return Message(run.pk, attempt, run.task_name, run.args, run.kwargs, run.options, task_id)


def publish_on_commit(run: SupervisedRun, attempt: int, task_id: str, publisher: RunPublisher) -> None:
    """Publish attempt ``attempt`` of ``run`` once the surrounding transaction commits."""
    msg = message(run, attempt, task_id)
    transaction.on_commit(lambda: publisher.publish(msg), using=router.db_for_write(SupervisedRun))


def publish_many_on_commit(messages: Sequence[Message], publisher: RunPublisher) -> None:
    """Publish attempts once the surrounding transaction commits, all in one go through ``publisher``
    (one producer; after a broker failure the rest are recorded unsent together)."""
    if messages:
        batch = list(messages)
        transaction.on_commit(lambda: publisher.publish_many(batch), using=router.db_for_write(SupervisedRun))


class CommitBatch:
    """New runs' first attempts, published together once the transaction that recorded them commits
    (an ``on_commit`` callback)."""

    __slots__ = ("messages", "ran")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = list(messages)
        self.ran = False

    def __call__(self) -> None:
        # A test's captureOnCommitCallbacks(execute=True) runs callbacks and leaves them registered:
        # a batch that ran takes no more messages.
        self.ran = True
        with RunPublisher() as publisher:
            publisher.publish_many(self.messages)


def publish_batch_on_commit(messages: Sequence[Message]) -> None:
    """Publish new runs after commit, through one producer.

    Runs recorded one after another in one transaction (a ``group``, a loop of ``.delay()``) are
    published together: these messages join the batch registered just before, when it is the
    transaction's last ``on_commit`` callback and was registered at the same savepoint level (so a
    savepoint rolled back discards both, as it would discard their own callbacks). A callback
    registered between them (the caller's) starts a new batch: callbacks still run in the order
    they were registered. Outside a transaction, published at once, as ``on_commit`` does."""
    using = router.db_for_write(SupervisedRun)
    batch = _last_batch(connections[using])
    if batch is not None:
        batch.messages.extend(messages)
    else:
        transaction.on_commit(CommitBatch(messages), using=using)


def _last_batch(connection: Any) -> CommitBatch | None:
    """The transaction's last ``on_commit`` callback, if it is a :class:`CommitBatch` registered at
    the current savepoint level. (``run_on_commit`` holds ``(savepoint ids, callback, …)`` for each
    callback, as it has since Django 1.9 (``robust`` third since 4.2); ``savepoint_rollback`` drops the
    callbacks of a savepoint rolled back.)"""
    if not connection.in_atomic_block:
        return None
    hooks = getattr(connection, "run_on_commit", None)
    if not hooks:
        return None
    sids, callback = hooks[-1][:2]
    if isinstance(callback, CommitBatch) and not callback.ran and sids == set(connection.savepoint_ids):
        return callback
    return None


def publish_by_id(run_id: int, publisher: RunPublisher | None = None) -> bool:
    """Publish the current attempt of a queued run (reads it back first)."""
    row = (
        SupervisedRun.objects.filter(pk=run_id, status=RunStatus.QUEUED)
        .values("attempt", "task_name", "args", "kwargs", "options", "task_id")
        .first()
    )
    if row is None:
        return False
    msg = Message(
        run_id,
        row["attempt"],
        row["task_name"],
        row["args"],
        row["kwargs"],
        row["options"],
        row["task_id"] or legacy_task_id(run_id),
    )
    if publisher is not None:
        return publisher.publish(msg)
    with RunPublisher() as own:
        return own.publish(msg)
