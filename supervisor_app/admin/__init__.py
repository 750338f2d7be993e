"""The operators' view: runs, attempts, process liveness, schedules and a dashboard.

Django's admin autodiscovery imports this package; the ``@admin.register`` decorators of its
modules are Django's own way of registering (the only registration that happens at import).

- :mod:`.runs`: runs, their attempts, operator actions, the dashboard;
- :mod:`.schedules`: ``PeriodicTask`` with the supervision policy and recent runs;
- :mod:`.processes`: liveness of supervisors and beats;
- :mod:`.display`, :mod:`.readonly`: presentation helpers.
"""

from django.contrib import admin

from . import processes, runs, schedules

# The admin index with a link to the dashboard (extends the project's "admin/index.html"), unless
# the project chose an index template of its own.
if admin.site.index_template is None:
    admin.site.index_template = "admin/supervisor_app/index.html"

__all__ = ["processes", "runs", "schedules"]
