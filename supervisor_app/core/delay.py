"""When a dispatched run is due: ``countdown=`` and ``eta=`` as one rule (a pure function).

A supervised run's delay is held in the database (``next_check_at``) and the supervisor publishes the
run when it is due: no ETA message waits in a worker's memory, where a broker's visibility timeout
would deliver it again. Celery's meanings are kept: ``countdown`` seconds from now, else ``eta`` a
datetime (naive: UTC, as Celery takes it) or an ISO 8601 string; ``countdown`` wins when both are
given; a time already past means now.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def dispatch_delay(countdown: Any = None, eta: Any = None, now: datetime | None = None) -> float:
    """Seconds from ``now`` until the run is due (0.0: publish at once). Raises ``TypeError`` or
    ``ValueError`` with a clear message for a value that is neither."""
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, int | float):
            raise TypeError(f"countdown must be a number of seconds, not {countdown!r}")
        return max(0.0, float(countdown))
    if eta is None:
        return 0.0
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            raise ValueError(f"eta must be a datetime or an ISO 8601 time, not {eta!r}") from None
    if not isinstance(eta, datetime):
        raise TypeError(f"eta must be a datetime or an ISO 8601 time, not {eta!r}")
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    return max(0.0, (eta - current).total_seconds())
