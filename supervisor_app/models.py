"""The durable record: one ``SupervisedRun`` per logical run, one ``RunAttempt`` per attempt."""

from __future__ import annotations

from datetime import timedelta

from django.core.validators import URLValidator
from django.db import models
from django.db.models import Q

from .compat import check_constraint
from .querysets import RunQuerySet
from .states import ACTIVE_STATUSES, AttemptOutcome, RunStatus


class SupervisedRun(models.Model):
    """One logical run: a schedule slot or an ad-hoc ``.delay()``.

    ``worker``, ``started_at``, ``heartbeat_at`` and ``lease_expires_at`` describe the *current*
    attempt (``attempt``). The attempt number is the fencing token: every agent write is conditional
    on it (see ``services``).
    """

    task_name = models.CharField(max_length=255)
    periodic_task = models.ForeignKey(
        "django_celery_beat.PeriodicTask",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="supervised_runs",
        # The (periodic_task, scheduled_for) unique constraint already indexes this column first.
        db_index=False,
    )
    scheduled_for = models.DateTimeField(null=True, blank=True, help_text="The schedule slot.")
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    #: Publishing options kept for re-publishing (queue, routing key, priority...).
    options = models.JSONField(default=dict, blank=True)

    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    attempt = models.PositiveIntegerField(default=1)
    max_attempts = models.PositiveIntegerField(default=3)

    worker = models.CharField(max_length=255, blank=True, default="")
    task_id = models.CharField(max_length=255, blank=True, default="", help_text="Celery id of the current attempt.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_timeout = models.DurationField(help_text="Lease length granted at claim and renewal.")
    start_timeout = models.DurationField(help_text="How long a published attempt may wait to start.")
    max_runtime = models.DurationField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True, help_text="Max runtime of the current attempt.")
    #: When the supervisor should look at a queued (republish) or retrying (dispatch) run next.
    next_check_at = models.DateTimeField(null=True, blank=True)
    publish_count = models.PositiveIntegerField(default=0)

    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    last_error = models.TextField(blank=True, default="")
    progress = models.JSONField(null=True, blank=True)
    checkpoint = models.JSONField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    #: Set by an operator's "mark resolved" (``services.mark_resolved``) on a failed, dead or missed run.
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two beats, a restarted beat or a catch-up cannot record the same slot twice.
            models.UniqueConstraint(
                fields=["periodic_task", "scheduled_for"],
                condition=Q(periodic_task__isnull=False),
                name="supervisor_run_unique_slot",
            ),
            check_constraint(Q(attempt__gte=1), "supervisor_run_attempt_gte_1"),
            check_constraint(Q(status__in=[s.value for s in RunStatus]), "supervisor_run_status_valid"),
        ]
        indexes = [
            # The sweep's queries read only active rows: these partial indexes stay small however
            # long the history grows.
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status=RunStatus.RUNNING),
                name="supervisor_run_lease_active",
            ),
            models.Index(
                fields=["next_check_at"],
                condition=Q(status__in=[RunStatus.QUEUED, RunStatus.RETRYING]),
                name="supervisor_run_next_check",
            ),
            models.Index(
                fields=["deadline_at"],
                condition=Q(status=RunStatus.RUNNING, deadline_at__isnull=False),
                name="supervisor_run_deadline",
            ),
            # The admin's. Each full index costs every claim, heartbeat and finish one more index
            # write, so there are two: the changelist's order and date filter / the dashboard's 24 h
            # window, and the task filter (with the same order).
            models.Index(fields=["created_at"], name="supervisor_run_created"),
            models.Index(fields=["task_name", "created_at"], name="supervisor_run_task_created"),
            # Status filters on the rare terminal statuses and the open-incident view: partial, so
            # the hot path (queued, running, retrying, succeeded rows) never writes to it.
            models.Index(
                fields=["status", "created_at"],
                condition=Q(status__in=[RunStatus.FAILED, RunStatus.DEAD, RunStatus.MISSED, RunStatus.CANCELLED]),
                name="supervisor_run_problems",
            ),
        ]
        permissions = [
            ("retry_run", "Can retry a run (start a new attempt)"),
            ("cancel_run", "Can cancel a run"),
            ("resolve_run", "Can mark a failed, dead or missed run resolved"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} #{self.pk} ({self.status}, attempt {self.attempt})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES


class RunAttempt(models.Model):
    """History: one row per attempt of a run."""

    run = models.ForeignKey(SupervisedRun, on_delete=models.CASCADE, related_name="attempts", db_index=False)
    number = models.PositiveIntegerField()
    task_id = models.CharField(max_length=255, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["run_id", "number"]
        constraints = [
            # Two supervisors cannot both re-enqueue the same lost attempt.
            models.UniqueConstraint(fields=["run", "number"], name="supervisor_attempt_unique_number"),
        ]
        indexes = [
            # The dashboard's recoveries in the last 24 h: partial, only lost / timed-out attempts.
            models.Index(
                fields=["ended_at"],
                condition=Q(outcome__in=[AttemptOutcome.LOST, AttemptOutcome.TIMED_OUT]),
                name="supervisor_attempt_recovered",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} attempt {self.number} ({self.outcome})"


class ProcessHeartbeat(models.Model):
    """Liveness of supervisors and beats, so the admin and health checks can tell they are alive."""

    class Kind(models.TextChoices):
        SUPERVISOR = "supervisor", "supervisor"
        BEAT = "beat", "beat"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=255, help_text="host:pid of the process.")
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    #: Figures of the last cycle (sweep counts and duration, beat sends...).
    stats = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "name"], name="supervisor_process_unique")]
        indexes = [models.Index(fields=["kind", "-last_seen"], name="supervisor_process_seen")]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


# --------------------------------------------------------------------------- scheduling (issue 3)


def _positive(name: str, value: timedelta | None, errors: dict[str, str]) -> None:
    if value is not None and value <= timedelta(0):
        errors[name] = f"Must be a positive duration, got {value}."


class SupervisionPolicy(models.Model):
    """How the runs of one schedule are supervised. Every empty field means the ``SUPERVISOR_`` setting.

    Read through ``supervisor_app.scheduling.definition_for``, never field by field, so a missing
    policy row and an empty field mean the same thing.
    """

    class Overlap(models.TextChoices):
        #: Every slot runs, whatever is still running.
        ALLOW = "allow", "allow: run every slot"
        #: A slot whose previous run is still active is recorded ``skipped``.
        SKIP = "skip", "skip while the previous run is active"
        #: One slot waits for the active run to end; further ones are ``skipped``.
        QUEUE_ONE = "queue_one", "queue one behind the active run"
        #: The active run is cancelled and the new slot runs.
        REPLACE = "replace", "replace (cancel) the active run"

    class CatchUp(models.TextChoices):
        #: Overdue slots are recorded ``missed``.
        NONE = "none", "none: record overdue slots as missed"
        #: The newest overdue slot runs (inside the catch-up window); the others are ``missed``.
        LATEST = "latest", "run the latest overdue slot"
        #: Every overdue slot inside the catch-up window runs; older ones are ``missed``.
        ALL = "all", "run all overdue slots within the window"

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

    class Meta:
        verbose_name = "supervision policy"
        verbose_name_plural = "supervision policies"

    def __str__(self) -> str:
        return f"supervision of {self.periodic_task_id}"

    def recipients(self) -> list[str]:
        return [r.strip() for r in self.alert_recipients.replace("\n", ",").replace(";", ",").split(",") if r.strip()]

    def clean(self) -> None:
        from django.core.exceptions import ValidationError
        from django.core.validators import validate_email

        from .conf import supervisor_settings

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
            from .alerts import parse_events

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
        from celery import current_app

        from .scheduling import supervised_task_names

        name = self.periodic_task.task
        supervised = supervised_task_names(current_app)
        if name in current_app.tasks and name not in supervised:
            return f"{name} is not a SupervisedTask: a supervision policy would have no effect on it."
        return None


# --------------------------------------------------------------------------- exactly-once effects (issue 6)


class AdoptedMessage(models.Model):
    """A message that carried no run (``send_task`` from another service), adopted by a worker as
    ``run``. The message's Celery id is the key, so a redelivery of that message finds this run
    instead of recording a second one.

    A table of its own, not a unique column of the runs table: every index on that table is weighed
    when planning every claim and finish (measured: a partial unique index there, never written,
    still cost claim + finish about 6%).
    """

    message_id = models.CharField(max_length=255, primary_key=True)
    run = models.OneToOneField(SupervisedRun, on_delete=models.CASCADE, related_name="adopted_message")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"message {self.message_id} adopted as run {self.run_id}"


class Effect(models.Model):
    """One side effect of a run, recorded once (``supervisor_app.idempotency``).

    Inserted in the same transaction as the effect's own database writes: the unique ``(run, key)``
    constraint lets exactly one attempt of a run commit the effect, however often the body runs.
    """

    run = models.ForeignKey(SupervisedRun, on_delete=models.CASCADE, related_name="effects", db_index=False)
    key = models.CharField(max_length=255)
    #: The attempt that performed the effect.
    attempt = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="supervisor_effect_unique_key")]

    def __str__(self) -> str:
        return f"run {self.run_id} effect {self.key!r} (attempt {self.attempt})"


# --------------------------------------------------------------------------- alerts (issue 7)


class AlertWindow(models.Model):
    """How many alerts one channel (a recipient list, a webhook) sent in one fixed time window.

    The rate limit is a conditional ``UPDATE … SET sent = sent + 1 WHERE sent < limit`` on this row
    (created with ``ON CONFLICT DO NOTHING``), so any number of supervisors and workers share it.
    Alerts over the limit only count ``suppressed``; one digest per window reports them.
    """

    #: ``email:<hash>`` or ``webhook:<hash>``: a hash of the destination, never the destination.
    channel = models.CharField(max_length=80)
    window_start = models.DateTimeField()
    sent = models.PositiveIntegerField(default=0)
    suppressed = models.PositiveIntegerField(default=0)
    #: Where the digest goes: ``{"kind": "email", "to": [...]}`` or ``{"kind": "webhook", "policy": pk}``
    #: (a webhook URL is looked up again at sending time and never stored here).
    route = models.JSONField(default=dict, blank=True)
    digest_sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["channel", "window_start"], name="supervisor_alert_window")]
        indexes = [
            # The sweep's digest query: only windows that suppressed something and await their digest.
            models.Index(
                fields=["window_start"],
                condition=Q(suppressed__gt=0, digest_sent_at__isnull=True),
                name="supervisor_alert_digest_due",
            )
        ]

    def __str__(self) -> str:
        return f"{self.channel} from {self.window_start:%Y-%m-%d %H:%M} ({self.sent} sent, {self.suppressed} held)"
