"""Concurrency limits: runs that wait in the database for a slot, and their release.

A task with ``concurrency_limit = N`` has N slots per key (the task, or the task and the arguments
its ``concurrency_by`` names). The claim takes a free slot (:func:`~.leases.claim`); a delivery that
finds none moves its run to ``waiting`` (:func:`wait_for_slot`), which holds no worker and no
message. Each finish of a limited run releases the oldest waiters of its key into the free slots
(:func:`release_waiters`), and the supervisor's sweep does the same for every key (a slot freed by
recovery of a killed worker, or a release that was lost with its process).
"""

from __future__ import annotations

import logging
from typing import Literal

from django.db import transaction

from ..core.states import RELEASE_WAITER, WAIT_FOR_SLOT, RunStatus
from ..db import after
from ..models import SupervisedRun
from . import rows
from .publishing import RunPublisher, publish_on_commit

logger = logging.getLogger("supervisor_app")


def running(key: str) -> int:
    return SupervisedRun.objects.filter(concurrency_key=key, status=RunStatus.RUNNING).count()


def wait_for_slot(run_id: int, attempt: int, key: str, limit: int) -> Literal["waiting", "free", "gone"]:
    """After a claim refused under a limit: ``waiting`` if every slot is taken (the run now waits),
    ``free`` if a slot freed meanwhile (claim again), ``gone`` if the attempt is not queued (another
    delivery has it, or it was superseded: drop the message)."""
    with transaction.atomic():
        if not rows.of(WAIT_FOR_SLOT, run_id, attempt).exists():
            return "gone"
        if running(key) < limit:
            return "free"
        moved = rows.of(WAIT_FOR_SLOT, run_id, attempt).update(
            status=WAIT_FOR_SLOT.target,
            concurrency_key=key,
            concurrency_limit=limit,
            next_check_at=None,
        )
    # A slot that freed between the count and the update is given out by the next finish or sweep.
    return "waiting" if moved else "gone"


def release_waiters(key: str, publisher: RunPublisher) -> int:
    """Publish the oldest runs waiting for a slot of ``key``, as many as slots are free."""
    with transaction.atomic():
        waiting = SupervisedRun.objects.filter(status=RunStatus.WAITING, concurrency_key=key)
        limit = waiting.order_by().values_list("concurrency_limit", flat=True).first()
        if limit is None:
            return 0
        free = limit - running(key)
        if free <= 0:
            return 0
        batch = list(waiting.select_for_update(skip_locked=True, of=("self",)).order_by("created_at", "id")[:free])
        released = 0
        for run in batch:
            # Counted as one publish: the run was delivered and taken before, so its task is known.
            if rows.of(RELEASE_WAITER, run.pk, run.attempt).update(
                status=RELEASE_WAITER.target, next_check_at=after(run.start_timeout), publish_count=1
            ):
                publish_on_commit(run, run.attempt, run.task_id, publisher)
                released += 1
    if released:
        logger.info("%s run(s) waiting for a slot of %s released", released, key)
    return released


def waiting_keys() -> list[str]:
    """Every key some run waits for (the partial index ``supervisor_run_waiting`` answers this)."""
    return list(
        SupervisedRun.objects.filter(status=RunStatus.WAITING)
        .order_by()
        .values_list("concurrency_key", flat=True)
        .distinct()
    )
