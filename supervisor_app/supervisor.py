"""The supervisor's sweep: one static list of phases; short, idempotent, batched, bounded in time.

It trusts nothing held in memory: each run phase selects a batch of rows with ``FOR UPDATE SKIP
LOCKED`` (so several supervisors split the work instead of queueing on each other), and each action
is a conditional update that re-checks why the row was selected (``runs.recovery``). A sweep that is
killed half-way leaves every row either handled or untouched.

The phases, in order, are one static list (:data:`PHASES`): lost leases, overdue attempts, retries
due, unstarted attempts, finished runs' workflow continuations, then the schedules (missed slots,
start windows, ``queue_one`` releases), the liveness rows of processes long gone, and the alert
digests. Nothing adds itself to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import DurationField, ExpressionWrapper, F
from django.db.models.functions import Now

from .alerts.digests import digest_phase
from .conf import supervisor_settings
from .core.states import RunStatus
from .db import recover_connection
from .models import ProcessHeartbeat, SupervisedRun
from .models.querysets import RunQuerySet
from .ops.isolation import SweepErrors, isolated
from .ops.liveness import process_name, prune_phase, record_liveness
from .runs import concurrency, recovery, workflow
from .runs.publishing import RunPublisher
from .scheduling.sweep import sweep_schedules

logger = logging.getLogger("supervisor_app")


@dataclass
class SweepReport:
    recovered: int = 0
    timed_out: int = 0
    dead: int = 0
    retried: int = 0
    republished: int = 0
    #: Cancelled runs that did not stop within the grace period (or whose agent died).
    cancelled: int = 0
    published: int = 0
    publish_failures: int = 0
    batches: int = 0
    duration: float = 0.0
    truncated: bool = False
    #: Seconds between a lease's expiry and the sweep that acted on it (database clock).
    detection_latencies: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Rows, schedules or phases that raised: isolated, skipped, and reported (``health/``, the admin).
    errors: SweepErrors = field(default_factory=SweepErrors)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("detection_latencies")
        return data

    def add(self, part: SweepReport) -> None:
        """Add the counts of a batch handled on a report of its own (kept only if it committed)."""
        for name in ("recovered", "timed_out", "dead", "retried", "republished", "cancelled"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.detection_latencies += part.detection_latencies
        self.extra.update(part.extra)

    @property
    def acted(self) -> int:
        return self.recovered + self.timed_out + self.dead + self.retried + self.republished + self.cancelled


Handler = Callable[[list[SupervisedRun], RunPublisher, SweepReport], None]


def _lost(batch: list[SupervisedRun], publisher: RunPublisher, report: SweepReport) -> None:
    queued, dead, cancelled = recovery.recover_lost_batch(batch, publisher)
    report.recovered += len(queued)
    report.dead += len(dead)
    report.cancelled += len(cancelled)
    acted = set(queued) | set(dead)
    for run in batch:
        lag = getattr(run, "lag", None)
        if lag is not None and run.pk in acted:
            report.detection_latencies.append(max(lag.total_seconds(), 0.0))


def _overdue(batch: list[SupervisedRun], publisher: RunPublisher, report: SweepReport) -> None:
    for run in batch:
        status = recovery.time_out(run, publisher)
        if status == RunStatus.QUEUED:
            report.timed_out += 1
        elif status == RunStatus.DEAD:
            report.dead += 1
        elif status == RunStatus.CANCELLED:
            report.cancelled += 1


def _retry(batch: list[SupervisedRun], publisher: RunPublisher, report: SweepReport) -> None:
    for run in batch:
        if recovery.dispatch_retry(run, publisher):
            report.retried += 1


def _unstarted(batch: list[SupervisedRun], publisher: RunPublisher, report: SweepReport) -> None:
    for status in recovery.republish_batch(batch, publisher):
        if status == RunStatus.QUEUED:
            report.republished += 1
        elif status == RunStatus.DEAD:  # never started: no worker took it
            report.dead += 1


def _workflows(report: SweepReport, deadline: float) -> None:
    """Finished runs whose workflow continuation (or result backend report) their agent did not
    dispatch: a crash right after the finish, a broker outage, a run the supervisor ended."""
    total = 0
    while time.monotonic() < deadline:
        done = workflow.follow_up()
        total += done
        if done < workflow.BATCH:
            break
    if total:
        report.extra["followed_up"] = total


def _slots(report: SweepReport, deadline: float) -> None:
    """Runs waiting for a slot of a concurrency limit, released into the free slots, key by key.

    Each finish of a limited run does this for its own key; this catches a slot freed by recovery
    (a killed worker's run) and a release lost with its process."""
    released = 0
    with RunPublisher() as publisher:
        for key in concurrency.waiting_keys():
            if time.monotonic() > deadline:
                report.truncated = True
                break
            count = 0
            with isolated(report.errors, "slots", f"concurrency key {key}"):
                count = concurrency.release_waiters(key, publisher)
            released += count
    if released:
        report.extra["released_waiters"] = released


def _stale_with_lag(qs: RunQuerySet) -> RunQuerySet:
    # How late the detection is, measured by the database clock: feeds the latency histogram.
    return qs.stale().annotate(lag=ExpressionWrapper(Now() - F("lease_expires_at"), output_field=DurationField()))


@dataclass(frozen=True)
class RunPhase:
    """A phase over runs: ``select`` narrows the runs table, ``handle`` acts on one locked batch."""

    name: str
    select: Callable[[RunQuerySet], RunQuerySet]
    handle: Handler


@dataclass(frozen=True)
class Phase:
    """A phase with its own reads and batching (schedules, alert digests), bounded by the deadline."""

    name: str
    run: Callable[[SweepReport, float], None]


#: Every phase of a sweep, in order.
PHASES: tuple[RunPhase | Phase, ...] = (
    RunPhase("lost", _stale_with_lag, _lost),
    RunPhase("overdue", RunQuerySet.overdue, _overdue),
    RunPhase("retries", RunQuerySet.due_retries, _retry),
    RunPhase("unstarted", RunQuerySet.unstarted, _unstarted),
    Phase("workflows", _workflows),
    Phase("slots", _slots),
    Phase("schedules", sweep_schedules),
    Phase("process rows", prune_phase),
    Phase("alert digests", digest_phase),
)


class CumulativeHistogram:
    """Detection latencies since this process started, in Prometheus' cumulative-bucket form.

    Kept in the supervisor's liveness row (``stats``) so the metrics URL, served by another
    process, can add up every supervisor's histogram.
    """

    BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe_all(self, values: list[float]) -> dict[str, Any]:
        for value in values:
            self.total += 1
            self.sum += value
            for i, bound in enumerate(self.BUCKETS):
                if value <= bound:
                    self.counts[i] += 1
        return {"buckets": dict(zip([str(b) for b in self.BUCKETS], self.counts, strict=True)),
                "count": self.total, "sum": self.sum}  # fmt: skip


DETECTION_LATENCY = CumulativeHistogram()


def _run_phase(phase: RunPhase, publisher: RunPublisher, report: SweepReport, deadline: float, size: int) -> None:
    """Locked batches of the phase's rows until none is left (or the time is up)."""
    failed: list[int] = []
    while True:
        if time.monotonic() > deadline:
            report.truncated = True
            return
        with transaction.atomic():
            # A row that failed stays due; leaving it out keeps the next batch from retrying it.
            qs = phase.select(SupervisedRun.objects.exclude(pk__in=failed) if failed else SupervisedRun.objects.all())
            batch = list(qs.select_for_update(skip_locked=True, of=("self",)).order_by()[:size])
            if batch:
                failed += _handle(phase, batch, publisher, report)
        report.batches += 1
        if len(batch) < size:
            return


def _handle(phase: RunPhase, batch: list[SupervisedRun], publisher: RunPublisher, report: SweepReport) -> list[int]:
    """Handle a locked batch so that one bad row can't poison it. Returns the ids of rows that failed.

    The whole batch first, in one savepoint (two statements per batch, so a mass recovery stays a
    handful of statements); if anything in it raises, each row again in a savepoint of its own, and
    the rows that still raise are reported and skipped. A rolled-back savepoint may drop a row's
    lock, so another supervisor could take that row meanwhile: harmless, every action re-checks in
    its ``WHERE`` why the row was selected.
    """
    part = SweepReport()
    with isolated(None, phase.name) as whole:
        phase.handle(batch, publisher, part)
    if not whole.failed:
        report.add(part)
        return []
    failed = []
    for run in batch:
        part = SweepReport()
        with isolated(report.errors, phase.name, f"run {run.pk}") as one:
            phase.handle([run], publisher, part)
        if one.failed:
            failed.append(run.pk)
        else:
            report.add(part)
    return failed


def run_sweep(name: str | None = None) -> SweepReport:
    """One pass over everything the supervisor watches. Safe to run in parallel with itself."""
    started = time.monotonic()
    deadline = started + supervisor_settings.sweep_time_limit
    batch_size = supervisor_settings.sweep_batch_size
    report = SweepReport()
    with RunPublisher() as publisher:
        for phase in PHASES:
            # A phase that fails as a whole (its query, a bug) is reported; the next phases go on.
            with isolated(report.errors, phase.name, savepoint=False):
                if isinstance(phase, Phase):
                    phase.run(report, deadline)
                else:
                    _run_phase(phase, publisher, report, deadline, batch_size)
    report.published = publisher.sent
    report.publish_failures = publisher.failed
    queues = publisher.queues.summary()
    if queues:  # runs left waiting behind a backlog or for workers, or on a queue nobody consumes
        report.extra["queues"] = queues
    report.duration = time.monotonic() - started
    stats = report.as_dict()
    stats["detection_latency"] = DETECTION_LATENCY.observe_all(report.detection_latencies)
    record_liveness(ProcessHeartbeat.Kind.SUPERVISOR, name or process_name(), stats)
    if report.acted:
        logger.info(
            "sweep recovered=%s timed_out=%s dead=%s retried=%s republished=%s in %.3fs",
            report.recovered,
            report.timed_out,
            report.dead,
            report.retried,
            report.republished,
            report.duration,
        )
    return report


def loop(stop: threading.Event, interval: float | None = None, name: str | None = None) -> int:
    """Sweep every ``interval`` seconds until ``stop`` is set. Returns the number of sweeps."""
    name = name or process_name()
    sweeps = 0
    failures = 0
    failing_since = 0.0
    while not stop.is_set():
        began = time.monotonic()
        try:
            run_sweep(name)
            sweeps += 1
            if failures:
                logger.warning(
                    "sweeping again after %d failed sweeps (%.1fs)", failures, time.monotonic() - failing_since
                )
                failures = 0
        except Exception as exc:
            # A database restart or a network cut: log, drop the broken connection and try again at
            # the next interval. The sweep holds no state between passes, so nothing is lost. The
            # traceback once per outage; then one line per failure, not a traceback every interval.
            if not failures:
                failing_since = began
                logger.exception("sweep failed; retrying at the next interval")
            else:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                logger.error("sweep failed again (%s: %s)", type(exc).__name__, first_line)
            failures += 1
            recover_connection()
        wait = (interval if interval is not None else supervisor_settings.sweep_interval) - (time.monotonic() - began)
        stop.wait(max(wait, 0.0))
    return sweeps
