from __future__ import annotations

from django.apps import AppConfig


class SupervisorAppConfig(AppConfig):
    name = "supervisor_app"
    verbose_name = "Supervised runs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as supervisor_checks

        checks.register(supervisor_checks.check_settings, checks.Tags.compatibility)
        checks.register(supervisor_checks.check_celery, checks.Tags.compatibility)
        # Importing scheduling registers the missed-slot phase of the sweep.
        from . import alerts, scheduling  # noqa: F401

        checks.register(alerts.check_alert_settings, checks.Tags.compatibility)
        alerts.install()  # signal receivers of the alert channels, and the digest phase of the sweep
