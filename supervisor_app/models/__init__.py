"""The models, importable as ``supervisor_app.models.<Name>`` (the public path).

- :mod:`.runs`: ``SupervisedRun`` (one per logical run), ``RunAttempt``, ``AdoptedMessage``, ``Effect``;
- :mod:`.schedules`: ``SupervisionPolicy``;
- :mod:`.ops`: ``ProcessHeartbeat`` (liveness), ``AlertWindow`` (alert rate limit);
- :mod:`.querysets`: every read of the runs table the sweep, the admin and health checks make.

``RunStatus`` and ``AttemptOutcome`` are re-exported for queries such as
``SupervisedRun.objects.filter(status=RunStatus.FAILED)``.
"""

from ..core.states import AttemptOutcome, RunStatus
from .ops import AlertWindow, ProcessHeartbeat
from .runs import AdoptedMessage, Effect, RunAttempt, SupervisedRun
from .schedules import SupervisionPolicy

__all__ = [
    "AdoptedMessage",
    "AlertWindow",
    "AttemptOutcome",
    "Effect",
    "ProcessHeartbeat",
    "RunAttempt",
    "RunStatus",
    "SupervisedRun",
    "SupervisionPolicy",
]
