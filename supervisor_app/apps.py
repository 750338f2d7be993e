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
        from . import scheduling  # noqa: F401  (registers the missed-slot phase of the sweep)
