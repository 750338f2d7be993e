"""A schedule's supervision policy (one-to-one with django-celery-beat's ``PeriodicTask``)."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import models
from django.db.models import Q

from .. import registry
from ..compat import check_constraint
from ..conf import supervisor_settings
from ..core.alerting import parse_events
from ..core.policies import CatchUp, Overlap


def _positive(name: str, value: timedelta | None, errors: dict[str, str]) -> None:
    if value is not None and value <= timedelta(0):
        errors[name] = f"Must be a positive duration, got {value}."


class SupervisionPolicy(models.Model):
    """How the runs of one schedule are supervised. Every empty field means the ``SUPERVISOR_`` setting.

    Read through ``supervisor_app.scheduling.definitions.definition_for``, never field by field, so a missing
    policy row and an empty field mean the same thing.
    """

    #: The policy choices, defined once in ``core.policies`` (kept here as attributes for callers
    #: that wrote ``SupervisionPolicy.Overlap.SKIP``).
    Overlap = Overlap
    CatchUp = CatchUp

    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", on_delete=models.CASCADE, related_name="supervision"
    )
    lease_timeout = models.DurationField(null=True, blank=True, help_text="SUPERVISOR_LEASE_TIMEOUT if empty.")
    max_attempts = models.PositiveIntegerField(null=True, blank=True, help_text="SUPERVISOR_MAX_ATTEMPTS if empty.")
    backoff = models.DurationField(null=True, blank=True, help_text="SUPERVISOR_BACKOFF if empty.")
    backoff_max = models.DurationField(null=True, blank=True, help_text="SUPERVISOR_BACKOFF_MAX if empty.")
    max_runtime = models.DurationField(null=True, blank=True, help_text="SUPERVISOR_MAX_RUNTIME if empty.")
    start_window = models.DurationField(
        null=True,
        blank=True,
        help_text="A run not started this long after its slot is missed. SUPERVISOR_START_WINDOW if empty.",
    )
    overlap = models.CharField(
        max_length=16, choices=Overlap.choices, blank=True, default="", help_text="SUPERVISOR_OVERLAP if empty."
    )
    catch_up = models.CharField(
        max_length=16, choices=CatchUp.choices, blank=True, default="", help_text="SUPERVISOR_CATCH_UP if empty."
    )
    catch_up_window = models.DurationField(null=True, blank=True, help_text="SUPERVISOR_CATCH_UP_WINDOW if empty.")
    alert_grace = models.DurationField(
        null=True, blank=True, help_text="How late a slot may run as on time. SUPERVISOR_ALERT_GRACE if empty."
    )
    alert_recipients = models.TextField(
        blank=True,
        default="",
        help_text="E-mail addresses, comma or newline separated. SUPERVISOR_ALERT_RECIPIENTS if empty.",
    )
    alert_on = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text="Events that alert, comma separated (dead, failed, missed, recovered), or `none`. "
        "SUPERVISOR_ALERT_ON if empty.",
    )
    alert_webhook_url = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        # http(s) only: urllib would also open file:// URLs. (A CharField: URLField's form field warns
        # about its default scheme on Django 5.x.)
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="Alerts are POSTed here as JSON (from a task). SUPERVISOR_ALERT_WEBHOOK_URL if empty.",
    )
    pause_after_failures = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Disable the schedule after this many consecutive failed or dead runs. "
        "SUPERVISOR_PAUSE_AFTER_FAILURES if empty (never by default).",
    )
    #: Consecutive failures are counted among the runs recorded after this time: set when the
    #: schedule is enabled again, so re-enabling a paused schedule starts the count from zero.
    failures_counted_from = models.DateTimeField(null=True, blank=True, editable=False)
    #: When (and why) the schedule was disabled after failures; cleared when it is enabled again.
    paused_at = models.DateTimeField(null=True, blank=True, editable=False)
    paused_reason = models.CharField(max_length=255, blank=True, default="", editable=False)

    class Meta:
        verbose_name = "supervision policy"
        verbose_name_plural = "supervision policies"
        constraints = [
            # The choices, enforced by the database too: a value written by code (or by an old
            # release) that no policy means is refused instead of read as another policy.
            check_constraint(Q(overlap__in=["", *Overlap.values]), "supervisor_policy_overlap_valid"),
            check_constraint(Q(catch_up__in=["", *CatchUp.values]), "supervisor_policy_catch_up_valid"),
        ]

    def __str__(self) -> str:
        return f"supervision of {self.periodic_task_id}"

    def recipients(self) -> list[str]:
        return [r.strip() for r in self.alert_recipients.replace("\n", ",").replace(";", ",").split(",") if r.strip()]

    def clean(self) -> None:
        errors: dict[str, str] = {}
        for name in ("lease_timeout", "backoff", "backoff_max", "max_runtime", "start_window", "catch_up_window"):
            _positive(name, getattr(self, name), errors)
        if self.alert_grace is not None and self.alert_grace < timedelta(0):
            errors["alert_grace"] = f"Must not be negative, got {self.alert_grace}."
        if self.max_attempts is not None and self.max_attempts < 1:
            errors["max_attempts"] = "A run needs at least one attempt."
        heartbeat = timedelta(seconds=supervisor_settings.heartbeat_interval)
        if "lease_timeout" not in errors and self.lease_timeout is not None and self.lease_timeout <= heartbeat:
            errors["lease_timeout"] = (
                f"The lease must outlast the heartbeat interval ({heartbeat}), or every run is lost; "
                "at least 2x is advised."
            )
        if self.backoff and self.backoff_max and self.backoff_max < self.backoff:
            errors["backoff_max"] = "The backoff cap must not be smaller than the backoff."
        grace = self.alert_grace if self.alert_grace is not None else timedelta(seconds=supervisor_settings.ALERT_GRACE)
        if (
            self.catch_up_window is not None
            and "catch_up_window" not in errors
            and self.catch_up != self.CatchUp.NONE
            and self.catch_up_window <= grace
        ):
            errors["catch_up_window"] = (
                f"The catch-up window must be longer than the grace period ({grace}): a slot is caught up only "
                "once it is older than the grace, so a shorter window would never catch anything up."
            )
        bad = []
        for address in self.recipients():
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
        if bad:
            errors["alert_recipients"] = f"Not e-mail addresses: {', '.join(bad)}."
        if self.alert_on:
            try:
                parse_events(self.alert_on)
            except ValueError as exc:
                errors["alert_on"] = str(exc)
        task_error = self._task_error()
        if task_error:
            errors["periodic_task"] = task_error
        if errors:
            raise ValidationError(errors)

    def _task_error(self) -> str | None:
        """A policy on a task that is registered but not a ``SupervisedTask`` would do nothing."""
        if not self.periodic_task_id:
            return None
        name = self.periodic_task.task
        if registry.is_registered(name) and not registry.is_supervised(name):
            return f"{name} is not a SupervisedTask: a supervision policy would have no effect on it."
        return None
