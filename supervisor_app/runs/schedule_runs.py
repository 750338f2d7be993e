"""The scheduler's writes to runs that exist: start windows that passed, ``queue_one`` runs released
or cancelled."""

from __future__ import annotations

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now

from .. import signals
from ..core.states import CANCEL_HELD, EXPIRE_UNSTARTED, RELEASE_HELD
from ..db import after
from ..models import SupervisedRun
from . import rows
from .notify import send_on_commit
from .publishing import publish_by_id


def expire_unstarted(run_id: int, why: str) -> SupervisedRun | None:
    """A scheduled run's first attempt did not start inside its start window: ``missed``, unless a
    worker claimed it meanwhile (then None). Returns the run, for the alert."""
    expired = rows.of(EXPIRE_UNSTARTED, run_id, attempt=1).filter(started_at__isnull=True)
    if not expired.update(status=EXPIRE_UNSTARTED.target, finished_at=Now(), next_check_at=None, last_error=why):
        return None
    return SupervisedRun.objects.get(pk=run_id)


def release_held(run_id: int) -> bool:
    """Publish a held ``queue_one`` run (its schedule has no other active run any more)."""
    with transaction.atomic():
        if (
            not rows.of(RELEASE_HELD, run_id)
            .filter(next_check_at__isnull=True)
            .update(
                next_check_at=after(F("start_timeout")),
                publish_count=1,
            )
        ):
            return False
        transaction.on_commit(lambda: publish_by_id(run_id))
    return True


def cancel_held(run_id: int, why: str) -> bool:
    """A held ``queue_one`` run whose schedule was deleted or disabled: nothing would ever release it,
    so it ends ``cancelled`` with the reason (unless it was released meanwhile)."""
    held = rows.of(CANCEL_HELD, run_id).filter(next_check_at__isnull=True)
    if not held.update(**rows.ended(CANCEL_HELD), last_error=why):
        return False
    send_on_commit(signals.run_cancelled, run_id, attempt=None)
    return True
