"""The only wiring of the package: system checks and signal receivers, connected in ``ready()``."""

from __future__ import annotations

from django.apps import AppConfig


class SupervisorAppConfig(AppConfig):
    """The only wiring of the package: system checks and signal receivers, connected here, never by
    a module as it is imported. (The sweep's phases are a static list in ``supervisor.PHASES``.)"""

    name = "supervisor_app"
    verbose_name = "Supervised runs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as supervisor_checks
        from . import conf
        from .alerts import receivers
        from .scheduling import pausing
        from .worker import interrupt, lease_keeper

        checks.register(supervisor_checks.check_settings, checks.Tags.compatibility)
        checks.register(supervisor_checks.check_celery, checks.Tags.compatibility)
        checks.register(supervisor_checks.check_database, checks.Tags.compatibility)
        checks.register(supervisor_checks.check_alert_settings, checks.Tags.compatibility)
        checks.register(supervisor_checks.check_schedule_arguments, checks.Tags.database)
        conf.connect()
        receivers.connect()
        checks.register(supervisor_checks.check_metrics, checks.Tags.compatibility)
        pausing.connect()
        interrupt.connect()
        lease_keeper.connect()
