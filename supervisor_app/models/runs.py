"""The durable record: one ``SupervisedRun`` per logical run, one ``RunAttempt`` per attempt, and the
rows that hang off a run (``AdoptedMessage``, ``Effect``)."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.fields.json import KeyTransform

from ..compat import check_constraint
from ..core.ids import legacy_task_id
from ..core.states import ACTIVE_STATUSES, TERMINAL_STATUSES, AttemptOutcome, RunStatus
from .querysets import RunQuerySet

#: The runs that hold their unique key: active ones, and those with a ``unique_for`` window (until a
#: dispatch finds the window over and releases the key, ``supervisor_app.runs.unique``).
HOLDS_KEY = Q(unique_key__isnull=False) & (Q(status__in=sorted(ACTIVE_STATUSES)) | Q(unique_until__isnull=False))


class SupervisedRun(models.Model):
    """One logical run: a schedule slot or an ad-hoc ``.delay()``.

    ``worker``, ``started_at``, ``heartbeat_at`` and ``lease_expires_at`` describe the *current*
    attempt (``attempt``). The attempt number is the fencing token: every agent write is conditional
    on it (see ``supervisor_app.runs``).
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
    #: Unique runs (``supervisor_app.runs.unique``): the caller's ``unique_key``, or a hash of the
    #: arguments the task's ``unique_by`` names. One run per (task, key) holds it (:data:`HOLDS_KEY`).
    #: NULL, not "", on every other run: "no key" is then never equal to a key.
    unique_key = models.CharField(max_length=80, null=True, blank=True, editable=False)  # noqa: DJ001
    #: ``unique_for``: the run holds its key until this time (database clock), whatever its status.
    unique_until = models.DateTimeField(null=True, blank=True, editable=False)

    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    attempt = models.PositiveIntegerField(default=1)
    max_attempts = models.PositiveIntegerField(default=3)

    worker = models.CharField(max_length=255, blank=True, default="")
    #: The run's Celery id (a UUID, or the caller's ``task_id=``): every attempt is published under it
    #: and the caller's handle follows it. Unique: a dispatch naming a recorded id records nothing and
    #: returns that run (a chain step dispatched again after a crash is the same run).
    task_id = models.CharField(max_length=255, blank=True, default="", help_text="Celery id of the run.")
    #: Drawn by the agent for each claim and required by its renewals and final write: the fence is
    #: unique per claim, so two agents that both claimed one attempt number (a claim forgotten by a
    #: database crash under asynchronous commit, then the attempt published again) never share a lease.
    lease_token = models.UUIDField(null=True, blank=True, editable=False)
    #: A task's ``concurrency_limit``: the runs that share a key (the task, or the task and the
    #: arguments named by ``concurrency_by``), the limit, and the slot a running run holds. Set by the
    #: agent at its claim (or when the run waits for a slot); the constraint below keeps a slot to one
    #: running run, whatever the number of workers.
    concurrency_key = models.CharField(max_length=200, blank=True, default="")
    concurrency_limit = models.PositiveIntegerField(null=True, blank=True)
    concurrency_slot = models.PositiveIntegerField(null=True, blank=True)
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
    #: The successful attempt's return value, as JSON (None when it returned None or a value that
    #: could not be stored: not JSON, or over ``SUPERVISOR_MAX_RESULT_BYTES``).
    result = models.JSONField(null=True, blank=True)
    #: True while the run's workflow continuation (callbacks, errbacks, next chain step, chord part;
    #: kept in ``options``) is still to be dispatched for its final status. Cleared, in the
    #: transaction that records the supervised steps, by whoever dispatches it (``runs.workflow``).
    follow_up = models.BooleanField(default=False, db_default=False)
    progress = models.JSONField(null=True, blank=True)
    checkpoint = models.JSONField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    #: Set by an operator's "mark resolved" (``runs.mark_resolved``) on a failed, dead or missed run.
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")

    objects = RunQuerySet.as_manager()

    #: Not a column: True on the run a unique dispatch returns when another run already held its key
    #: (nothing was recorded; ``supervisor_app.runs.unique``).
    deduplicated = False

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two beats, a restarted beat or a catch-up cannot record the same slot twice.
            models.UniqueConstraint(
                fields=["periodic_task", "scheduled_for"],
                condition=Q(periodic_task__isnull=False),
                name="supervisor_run_unique_slot",
            ),
            # queue_one: at most one held run (queued, never published) per schedule, whoever records
            # slots at once. Its predicate is false for every row a claim or finish writes, so those
            # never touch this index.
            models.UniqueConstraint(
                fields=["periodic_task"],
                condition=Q(status=RunStatus.QUEUED, next_check_at__isnull=True, periodic_task__isnull=False),
                name="supervisor_run_one_held",
            ),
            # Unique runs: at most one run per (task, key) holds the key, whoever dispatches at once.
            # Runs without a key (all but unique ones) are never in this index.
            models.UniqueConstraint(
                fields=["task_name", "unique_key"], condition=HOLDS_KEY, name="supervisor_run_unique_key"
            ),
            # A concurrency limit: slot n of a key is held by at most one running run.
            models.UniqueConstraint(
                fields=["concurrency_key", "concurrency_slot"],
                condition=Q(status=RunStatus.RUNNING, concurrency_slot__isnull=False),
                name="supervisor_run_one_per_slot",
            ),
            # A run's Celery id names one run: dispatching a recorded id again finds it.
            models.UniqueConstraint(fields=["task_id"], condition=~Q(task_id=""), name="supervisor_run_unique_task_id"),
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
            # Runs waiting for a slot, by key, oldest first (the sweep and each finish release them).
            models.Index(
                fields=["concurrency_key", "created_at"],
                condition=Q(status=RunStatus.WAITING),
                name="supervisor_run_waiting",
            ),
            # Finished runs whose workflow continuation is still to be dispatched (the sweep's).
            models.Index(
                fields=["finished_at"],
                condition=Q(follow_up=True, status__in=sorted(TERMINAL_STATUSES)),
                name="supervisor_run_follow_up",
            ),
            # The admin's workflow view: the steps of a workflow, and a step's children.
            models.Index(
                KeyTransform("root_id", "options"),
                condition=Q(options__has_key="root_id"),
                name="supervisor_run_root",
            ),
            models.Index(
                KeyTransform("parent_id", "options"),
                condition=Q(options__has_key="parent_id"),
                name="supervisor_run_parent",
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

    @property
    def celery_task_id(self) -> str:
        """The Celery id every attempt of the run is published under (rows recorded before migration
        0014 kept none until claimed: theirs was derived from the primary key)."""
        return self.task_id or legacy_task_id(self.pk)


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
    """One side effect of a run, recorded once (``supervisor_app.runs.effects``).

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
