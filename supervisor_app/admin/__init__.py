"""The operators' view: runs, attempts, process liveness, schedules and a dashboard.

Django's admin autodiscovery imports this package; the ``@admin.register`` decorators of its
modules are Django's own way of registering (the only registration that happens at import).

- :mod:`.runs`: runs, their attempts, operator actions, the dashboard;
- :mod:`.schedules`: ``PeriodicTask`` with the supervision policy and recent runs;
- :mod:`.processes`: liveness of supervisors and beats;
- :mod:`.display`, :mod:`.readonly`: presentation helpers.
"""

from . import processes, runs, schedules

__all__ = ["processes", "runs", "schedules"]
