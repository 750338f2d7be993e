"""Lazy, typed access to the ``SUPERVISOR_*`` settings.

Every value is read from ``django.conf.settings`` on first use and kept until a setting changes
(Django's ``setting_changed``, sent by ``override_settings`` and pytest-django's ``settings``), never
read at import: the agent reads several of them for every task. Durations are accepted as seconds
(int or float) or as :class:`datetime.timedelta` and are always returned as float seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

PREFIX = "SUPERVISOR_"


@dataclass(frozen=True)
class Setting:
    """One documented setting: its default and what it means (used by the docs and checks)."""

    name: str
    default: Any
    doc: str
    duration: bool = False


#: Every setting the app reads, with its default. The README's settings reference is generated from
#: (and tested against) this table.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting(
            "HEARTBEAT_INTERVAL",
            5.0,
            "Seconds between two lease renewals by a worker process.",
            duration=True,
        ),
        Setting(
            "LEASE_TIMEOUT",
            20.0,
            "Seconds a lease lasts after a renewal. A run whose lease is older is considered lost, so "
            "a killed worker's run starts again within about this plus the sweep interval (25 s by "
            "default). Must be larger than the heartbeat interval (at least 3x is advised): measured "
            "under CPU saturation, connections cut every 15 s and a 2 s pause of the whole worker, "
            "renewals came at most 10.0 s apart (`bench/renewal_jitter.py`).",
            duration=True,
        ),
        Setting(
            "SWEEP_INTERVAL",
            5.0,
            "Seconds between two supervisor sweeps (`manage.py supervise`).",
            duration=True,
        ),
        Setting("MAX_ATTEMPTS", 3, "Attempts a run gets before it is `dead`."),
        Setting(
            "START_TIMEOUT",
            None,
            "Seconds a published attempt may wait before a worker starts it; after that the "
            "supervisor asks the broker about its queue and publishes it again if its message is "
            "gone (no message ready in the queue: purged, lost, held by a hung worker), or its queue "
            "has no consumer while others have; behind a healthy backlog it is left waiting. "
            "None means the lease timeout.",
            duration=True,
        ),
        Setting(
            "MAX_PUBLISHES",
            20,
            'Publishes of one attempt that no worker starts before the run ends `dead`, "never started: '
            'no worker took it" (a task no worker knows, a queue nobody consumes), with an alert. '
            "Republishing backs off from the start timeout to 10 minutes, so 20 is about 3 hours with "
            "the default start timeout. Only publishes of a lost message or to an unconsumed queue "
            "count: a run left waiting behind a healthy backlog, or while no queue has a consumer "
            "(a worker outage), is not published and does not count.",
        ),
        Setting(
            "MAX_BACKLOG_WAIT",
            3600.0,
            "Seconds a run waits behind a healthy backlog (its queue has ready messages and consumers) "
            "before it is published once more anyway, and again after each further such wait: the bound "
            "on detecting a message lost from a queue that never empties. On Redis, where consumers "
            "can't be counted, those publishes count toward `SUPERVISOR_MAX_PUBLISHES`. None: no bound.",
            duration=True,
        ),
        Setting(
            "BACKOFF",
            2.0,
            "Base delay in seconds of the exponential backoff between attempts after a retryable error.",
            duration=True,
        ),
        Setting(
            "BACKOFF_MAX",
            600.0,
            "Upper bound in seconds of the backoff delay.",
            duration=True,
        ),
        Setting("BACKOFF_JITTER", True, "Randomise backoff delays (full jitter) to avoid thundering herds."),
        Setting(
            "MAX_RUNTIME",
            None,
            "Seconds an attempt may run before the supervisor times it out (fenced, body interrupted) and "
            "retries (None: no limit).",
            duration=True,
        ),
        Setting(
            "CANCEL_GRACE",
            None,
            "Seconds a running run has to stop at a heartbeat after an operator cancels it; then the "
            "supervisor marks it cancelled and fences it; its lease keeper interrupts the body (None: the "
            "run's lease timeout).",
            duration=True,
        ),
        Setting(
            "RETRYABLE_EXCEPTIONS",
            ["builtins.Exception"],
            "Dotted paths of exception classes that are retried (tasks may override).",
        ),
        Setting(
            "NON_RETRYABLE_EXCEPTIONS",
            [],
            "Dotted paths of exception classes that fail a run at once; they win over retryable ones. "
            "`supervisor_app.NonRetryable` is always non-retryable.",
        ),
        Setting("SWEEP_BATCH_SIZE", 500, "Rows the supervisor locks and handles per batch."),
        Setting(
            "SWEEP_TIME_LIMIT",
            30.0,
            "A sweep stops starting new batches after this many seconds, so it can never stall.",
            duration=True,
        ),
        Setting(
            "STALE_AFTER",
            None,
            "Seconds after which a silent supervisor or beat is reported stale. "
            "None means three sweep intervals plus the lease timeout.",
            duration=True,
        ),
        Setting(
            "PROCESS_RETENTION",
            86400.0,
            "Seconds after which the liveness row of a supervisor or beat that stopped reporting (killed, "
            "host gone) is deleted by the sweep, so `health/` and `supervisor_status` stop listing it as "
            "stale. A process that stops cleanly deletes its own row at once.",
            duration=True,
        ),
        Setting(
            "ASYNC_AGENT_COMMIT",
            True,
            "PostgreSQL: workers' claims, lease renewals and completions do not wait for the WAL flush "
            "(`synchronous_commit = off` for those statements only). A database crash can forget the "
            "last fraction of a second of them; each is then recovered like a lost worker. Dispatch "
            "always waits: a recorded run survives a crash.",
        ),
        Setting(
            "STRICT_FINISH",
            False,
            "Write a successful attempt's completion before the task returns to Celery. Off (the "
            "default), completions are queued in the worker process and written in batches, one "
            "statement each, within `SUPERVISOR_FINISH_DELAY`: a worker killed in between leaves the run "
            "`running`, and it is recovered and executed again (at-least-once, fencing unchanged). "
            "A task's `strict_finish` attribute overrides it. Failures are always written at once.",
        ),
        Setting(
            "FINISH_DELAY",
            0.05,
            "Seconds a queued completion may wait before its worker process writes it (see "
            "`SUPERVISOR_STRICT_FINISH`); it is written sooner when the batch is full or its lease "
            "nears its end, and on shutdown.",
            duration=True,
        ),
        Setting(
            "INTERRUPT_BODIES",
            True,
            "When a worker's lease keeper learns that a running body lost its lease (timed out, taken "
            "over) or that its run was cancelled, raise `LeaseLost` / `RunCancelled` in the body at once "
            "(a signal to the pool process; prefork and solo pools), instead of waiting for the body's "
            "next `heartbeat()`. Bodies must let these exceptions propagate.",
        ),
        Setting(
            "AGENT_SOCKET_TIMEOUT",
            None,
            "Seconds after which a worker's PostgreSQL socket that gets no answer from the server (a "
            "network partition that drops packets) fails instead of blocking (TCP keepalives and "
            "`TCP_USER_TIMEOUT`, Linux). Applied to every connection a worker process opens, so the "
            "lease keeper, `heartbeat()` and the final write never hang past the lease; a server busy "
            "with a long query still answers at the TCP level and is not affected. None means a "
            "third of the lease timeout (at least 2 s); 0 leaves sockets alone.",
            duration=True,
        ),
        Setting(
            "STOP_GRACE",
            10.0,
            "Seconds a body has to stop after it was interrupted (lease lost or unprovable, timed out, "
            "cancelled). A prefork pool process whose body is still that very attempt after this grace "
            "exits, so nothing of it goes on; Celery replaces the process. None: never exit (the body "
            "runs to its end, and its writes are fenced).",
            duration=True,
        ),
        Setting(
            "REQUIRE_BEAT",
            None,
            "Whether health checks require a live beat. None: required when any periodic task is enabled.",
        ),
        Setting(
            "METRICS_TOKEN",
            None,
            "When set, `metrics/` and the details of `health/` need `Authorization: Bearer <token>` "
            "(or a staff session). None: open, for a scraper inside your network.",
        ),
        # ------------------------------------------------ schedules (SupervisionPolicy defaults)
        Setting(
            "ALERT_GRACE",
            60.0,
            "Seconds a schedule slot may be late and still run as on time. An unrecorded slot older "
            "than this is overdue: the catch-up policy runs it or records it `missed` (and alerts).",
            duration=True,
        ),
        Setting(
            "START_WINDOW",
            None,
            "Seconds after its slot within which a scheduled run must start, else it is `missed` (None: no limit).",
            duration=True,
        ),
        Setting(
            "OVERLAP",
            "allow",
            "What a slot does while the schedule's previous run is active: `allow`, `skip`, `queue_one` or `replace`.",
        ),
        Setting("CATCH_UP", "latest", "What happens to overdue slots after downtime: `none`, `latest` or `all`."),
        Setting(
            "PAUSE_AFTER_FAILURES",
            None,
            "A schedule is disabled (and one `paused` alert sent) after this many consecutive failed or dead "
            "runs (per schedule: the policy's `pause_after_failures`). None: never.",
        ),
        Setting(
            "CATCH_UP_WINDOW",
            3600.0,
            "Seconds: overdue slots older than this are never caught up, only recorded `missed`.",
            duration=True,
        ),
        Setting(
            "ALERT_RECIPIENTS",
            [],
            "E-mail addresses alerted (through Django's mail) on the `SUPERVISOR_ALERT_ON` events: runs of any "
            "task, and missed slots (per schedule: the policy's).",
        ),
        # ------------------------------------------------ alert channels
        Setting(
            "ALERT_ON",
            ["dead", "failed", "missed", "paused"],
            "Events that alert the e-mail recipients and the webhook: any of `dead`, `failed`, `missed`, "
            "`recovered`, `paused` (a schedule disabled after failures; per schedule: the policy's `alert_on`).",
        ),
        Setting(
            "ALERT_WEBHOOK_URL",
            None,
            "URL that receives each alert as a JSON POST, sent by a Celery task (never by the sweep). "
            "Per schedule: the policy's. It may hold a token: logs show only its scheme and host.",
        ),
        Setting(
            "ALERT_WEBHOOK_TIMEOUT",
            5.0,
            "Seconds one webhook request may take (connect and read).",
            duration=True,
        ),
        Setting(
            "ALERT_WEBHOOK_RETRIES",
            3,
            "Further tries after a webhook request times out, cannot connect or gets a 5xx or 429 answer.",
        ),
        Setting(
            "ALERT_WEBHOOK_BACKOFF",
            1.0,
            "Seconds before the first webhook retry; doubled each time (capped at 30 s).",
            duration=True,
        ),
        Setting(
            "ALERT_QUEUE",
            None,
            "Celery queue of the webhook task (None: the default queue).",
        ),
        Setting(
            "ALERT_RATE_LIMIT",
            10,
            "At most this many alerts per channel (one recipient list, one webhook) per window; the rest are "
            "counted and summarised in one digest after the window. None: no limit.",
        ),
        Setting(
            "ALERT_RATE_WINDOW",
            3600.0,
            "Seconds of one rate-limit window.",
            duration=True,
        ),
        Setting(
            "SCHEDULE_LOOKBACK",
            86400.0,
            "Seconds back the beat and supervisor look for unrecorded slots; older ones are forgotten.",
            duration=True,
        ),
        Setting("SCHEDULE_MAX_SLOTS", 1000, "At most this many overdue slots of one schedule are recorded at once."),
        # ------------------------------------------------ bad input (issue 6)
        Setting(
            "MAX_ARGS_BYTES",
            1048576,
            "Largest JSON encoding (bytes) of a run's arguments; a bigger dispatch is refused with "
            "`ValueError` before anything is recorded (pass a reference instead). None: no limit.",
        ),
        # ------------------------------------------------ workflows and results (issue 14)
        Setting(
            "MAX_RESULT_BYTES",
            1048576,
            "Largest JSON encoding (bytes) of a return value stored with its run (`SupervisedRun.result`, "
            "what the result handle's `.get()` returns and a chain's next step receives); a bigger or "
            "non-JSON value is stored as None, with a warning. None: no limit.",
        ),
        Setting(
            "RESULT_POLL_INTERVAL",
            0.1,
            "Seconds between two reads of a run by its result handle's `.get()` (or its own `interval=`).",
        ),
    ]
}


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{PREFIX}{name} must be a number of seconds or a timedelta, not {value!r}")
    return float(value)


class SupervisorSettings:
    """Attribute access to ``SUPERVISOR_<NAME>`` with the defaults of :data:`SETTINGS`."""

    def __init__(self) -> None:
        self._read: dict[str, Any] = {}

    def raw(self, name: str) -> Any:
        try:
            return self._read[name]
        except KeyError:
            value = self._read[name] = getattr(django_settings, PREFIX + name, SETTINGS[name].default)
            return value

    def forget(self, **kwargs: Any) -> None:
        """Drop the values read so far (a setting changed)."""
        self._read.clear()

    def __getattr__(self, name: str) -> Any:
        if name not in SETTINGS:
            raise AttributeError(name)
        value = self.raw(name)
        if SETTINGS[name].duration:
            return _seconds(name, value)
        return value

    # Typed accessors for the values used on hot paths (mypy sees these, not __getattr__).
    @property
    def heartbeat_interval(self) -> float:
        return float(_seconds("HEARTBEAT_INTERVAL", self.raw("HEARTBEAT_INTERVAL")) or 0.0)

    @property
    def lease_timeout(self) -> float:
        return float(_seconds("LEASE_TIMEOUT", self.raw("LEASE_TIMEOUT")) or 0.0)

    @property
    def sweep_interval(self) -> float:
        return float(_seconds("SWEEP_INTERVAL", self.raw("SWEEP_INTERVAL")) or 0.0)

    @property
    def max_attempts(self) -> int:
        return int(self.raw("MAX_ATTEMPTS"))

    @property
    def start_timeout(self) -> float:
        value = _seconds("START_TIMEOUT", self.raw("START_TIMEOUT"))
        return self.lease_timeout if value is None else value

    @property
    def max_publishes(self) -> int:
        return max(int(self.raw("MAX_PUBLISHES")), 1)

    @property
    def max_backlog_wait(self) -> float | None:
        return _seconds("MAX_BACKLOG_WAIT", self.raw("MAX_BACKLOG_WAIT"))

    @property
    def max_runtime(self) -> float | None:
        return _seconds("MAX_RUNTIME", self.raw("MAX_RUNTIME"))

    @property
    def cancel_grace(self) -> float | None:
        return _seconds("CANCEL_GRACE", self.raw("CANCEL_GRACE"))

    @property
    def retry_backoff(self) -> float:
        return float(_seconds("BACKOFF", self.raw("BACKOFF")) or 0.0)

    @property
    def retry_backoff_max(self) -> float:
        return float(_seconds("BACKOFF_MAX", self.raw("BACKOFF_MAX")) or 0.0)

    @property
    def backoff_jitter(self) -> bool:
        return bool(self.raw("BACKOFF_JITTER"))

    @property
    def sweep_batch_size(self) -> int:
        return int(self.raw("SWEEP_BATCH_SIZE"))

    @property
    def sweep_time_limit(self) -> float:
        return float(_seconds("SWEEP_TIME_LIMIT", self.raw("SWEEP_TIME_LIMIT")) or 0.0)

    @property
    def stale_after(self) -> float:
        value = _seconds("STALE_AFTER", self.raw("STALE_AFTER"))
        if value is None:
            return 3 * self.sweep_interval + self.lease_timeout
        return value


supervisor_settings = SupervisorSettings()


def connect() -> None:
    """Connected by the app's ``ready()`` (never at import): values read are dropped when a setting
    changes."""
    setting_changed.connect(supervisor_settings.forget, weak=False, dispatch_uid="supervisor_app.settings")
