"""A sweep that can't be poisoned: each piece of work in its own savepoint, each failure counted and
kept (with its id and phase) for the liveness row, ``health/`` and the admin.

One row or schedule that raises (bad data, a bug, a value the database refuses) must not roll back
the rest of its batch, stop the phases after it, or keep the supervisor from recording its liveness.
Only a failure that leaves the enclosing transaction unusable (its savepoint could not be rolled
back: the connection is gone) still ends the sweep; the sweep loop then reconnects.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.db import InterfaceError, transaction

logger = logging.getLogger("supervisor_app")

#: Failures kept, with their ids, in one sweep's report (the count has no limit).
KEEP = 10
#: Longest error text kept per failure: the liveness row is read by every health probe.
TEXT_LIMIT = 300


@dataclass
class SweepErrors:
    """What failed in one sweep. Stored in the supervisor's liveness row (``stats["errors"]``)."""

    count: int = 0
    #: The first :data:`KEEP` failures: ``{"phase", "key", "error"}``.
    recent: list[dict[str, str]] = field(default_factory=list)

    def record(self, phase: str, key: str, exc: BaseException) -> None:
        self.count += 1
        text = f"{type(exc).__name__}: {exc}"[:TEXT_LIMIT]
        if len(self.recent) < KEEP:
            self.recent.append({"phase": phase, "key": key, "error": text})
        _log(phase, key, exc, text)


# The traceback of a failure the first time this process sees it, then one line per sweep: a row
# that fails every five seconds must not bury the log in identical tracebacks. Bounded memory.
_seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
_SEEN_LIMIT = 1000


def _log(phase: str, key: str, exc: BaseException, text: str) -> None:
    what = f"sweep phase {phase!r}" + (f", {key}" if key else "")
    seen_key = (phase, key, type(exc).__name__)
    if seen_key in _seen:
        logger.error("%s failed again and was skipped (%s)", what, text)
        return
    _seen[seen_key] = None
    if len(_seen) > _SEEN_LIMIT:
        _seen.popitem(last=False)
    logger.error("%s failed and was skipped; the rest of the sweep goes on", what, exc_info=exc)


@dataclass
class Outcome:
    """Whether the isolated block failed (and was rolled back to its savepoint)."""

    failed: bool = False


@contextmanager
def isolated(errors: SweepErrors | None, phase: str, key: str = "", savepoint: bool = True) -> Iterator[Outcome]:
    """Run the block in its own savepoint (or transaction); an exception rolls back only the block,
    is recorded in ``errors`` (None: not recorded, the caller retries piece by piece) and is not
    raised again, unless the surrounding transaction can't go on.

    ``transaction.on_commit`` callbacks registered inside a rolled-back block are discarded by Django,
    so nothing of the failed piece is published or signalled. ``savepoint=False`` for a block that
    manages its own transactions (a whole phase: one transaction around it would hold its locks and
    defer its publishes until its end).
    """
    outcome = Outcome()
    try:
        if savepoint:
            with transaction.atomic():
                yield outcome
        else:
            yield outcome
    except Exception as exc:
        conn = transaction.get_connection()
        # needs_rollback after an atomic block that had a savepoint: rolling back to it failed, so
        # the enclosing transaction is broken. InterfaceError: the connection itself is closed.
        if isinstance(exc, InterfaceError) or (conn.in_atomic_block and conn.needs_rollback):
            raise
        outcome.failed = True
        if errors is not None:
            errors.record(phase, key, exc)
