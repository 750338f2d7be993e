"""``SupervisedScheduler``: django-celery-beat's ``DatabaseScheduler`` with durable, deduplicated slots.

    celery -A project beat -S supervisor_app.schedulers:SupervisedScheduler

A periodic task whose task is a :class:`~supervisor_app.tasks.SupervisedTask` fires on its *slot
times* (:mod:`supervisor_app.core.slots`), not "interval after the last send": every fire records each
due slot with ``INSERT … (periodic_task, slot)`` and only the beat whose insert succeeded publishes.
Several beats can therefore run side by side for high availability, and a beat that restarts picks
up after the last *recorded* slot and applies the schedule's catch-up policy. Other periodic tasks
are scheduled exactly as by ``DatabaseScheduler``.

Celery's ``Scheduler.tick`` sends one entry per call. Here a tick takes every supervised entry due
now off the heap (up to ``batch_size``) and fires them together (``firing.fire_many``): the
slots of thousands of schedules due at the same minute are recorded by a few multi-row inserts and
published through one producer, instead of a transaction, a publish and an UPDATE each.
"""

from __future__ import annotations

import copy
import heapq
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import current_app, schedules
from celery.beat import event_t
from django.core.exceptions import FieldDoesNotExist
from django.db.models import F, Q
from django_celery_beat.models import CrontabSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from .. import registry
from ..core import slots
from ..models import ProcessHeartbeat
from ..ops.liveness import forget_process, process_name, record_liveness
from .definitions import PolicyDefaults, ScheduleDef, celery_schedule, cursor_for, definition_for, last_slot_subquery
from .firing import Firing, RecordCounts, fire_many

logger = logging.getLogger("supervisor_app")

#: Seconds until a schedule with no next slot is looked at again (a change reloads it sooner).
IDLE = 300.0


def utcnow() -> datetime:
    return datetime.now(slots.UTC)


def _stored(row: PeriodicTask, values: Mapping[str, Any]) -> bool:
    """Whether a periodic task row holds these field values already (a relation by its key)."""
    for key, value in values.items():
        try:
            field = row._meta.get_field(key)
        except FieldDoesNotExist:  # not a field: the parent's write reports it
            return False
        if field.is_relation:
            value = None if value is None else value.pk
        if getattr(row, field.attname) != value:
            return False
    return True


class SupervisedEntry(ModelEntry):  # type: ignore[misc]
    """A beat entry due whenever a slot after ``cursor`` has come; firing records the slots."""

    def __init__(self, model: PeriodicTask, app: Any = None, *, definition: ScheduleDef, cursor: datetime) -> None:
        # ModelEntry's attributes, but not its constructor: that parses the schedule (a crontab twice)
        # and the arguments again for every row, and a load reads thousands. The schedule comes parsed
        # once per distinct crontab, the arguments from the definition.
        self.app = app or current_app._get_current_object()  # type: ignore[attr-defined]  # a proxy
        self.name, self.task, self.model = model.name, model.task, model
        self.schedule = celery_schedule(model)
        self.args, self.kwargs = definition.args, definition.kwargs
        # The schedule's queue, routing, priority, expiry and headers, as every run of it is published.
        self.options = dict(definition.options)
        self.total_run_count = model.total_run_count
        if not model.last_run_at:  # as ModelEntry (informational here: slots come from the cursor)
            model.last_run_at = model.date_changed or self._default_now()
            if model.start_time:
                model.last_run_at -= timedelta(days=365 * 30)
        self.last_run_at = model.last_run_at
        self.definition = definition
        #: Slots up to here are decided (recorded by this or another beat, or by the supervisor).
        self.cursor = cursor
        #: Set when the entry fires: the slots in ``(cursor, upto]`` are this fire's business.
        self.upto: datetime | None = None
        self.successor: SupervisedEntry | None = None

    def is_due(self) -> Any:
        if not self.model.enabled:
            return schedules.schedstate(False, 5.0)
        now = utcnow()
        rule, bounds = self.definition.rule, self.definition.bounds
        upcoming = slots.next_slot_after(rule, self.cursor, bounds)
        if upcoming is None:
            return schedules.schedstate(False, IDLE)
        if upcoming > now:
            return schedules.schedstate(False, (upcoming - now).total_seconds())
        following = slots.next_slot_after(rule, now, bounds)
        return schedules.schedstate(True, IDLE if following is None else (following - now).total_seconds())

    def __next__(self) -> SupervisedEntry:
        now = utcnow()
        self.upto = now
        self.model.last_run_at = now
        self.model.total_run_count += 1
        # A copy, not a new ModelEntry: that would parse the schedule and the arguments again, for
        # every schedule at every fire. (copy.copy would call the constructor via __reduce__.)
        successor = object.__new__(type(self))
        successor.__dict__.update(self.__dict__)
        successor.last_run_at, successor.total_run_count = now, self.model.total_run_count
        successor.cursor, successor.upto, successor.successor = now, None, None
        self.successor = successor
        return successor

    def save(self) -> None:
        # Not called by SupervisedScheduler, which writes last_run_at and total_run_count of the
        # schedules it fired in one statement per tick (``mark_fired``). An UPDATE, not Model.save():
        # save() would bump date_changed (the anchor below which slots are not judged) and could
        # signal a schedule change to every beat.
        PeriodicTask.objects.filter(pk=self.model.pk).update(
            last_run_at=self.model.last_run_at, total_run_count=self.model.total_run_count
        )


class SupervisedScheduler(DatabaseScheduler):  # type: ignore[misc]
    """Database scheduler recording every slot of supervised schedules before publishing it."""

    #: Seconds between two liveness records of this beat.
    liveness_interval = 5.0
    #: At most this many due supervised entries are fired by one tick; the next tick (at once)
    #: takes the rest, so plain entries and liveness records are not held up for long.
    batch_size = 1000
    old_schedulers: Any  # celery's Scheduler attributes that tick_supervised uses
    _heap: list[Any] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.process_name = process_name()
        self._liveness_at = 0.0
        self._stats: dict[str, int] = {}
        self._supervised: set[str] | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ loading

    def supervised_names(self) -> set[str]:
        if self._supervised is None:
            self._supervised = registry.supervised_task_names(self.app)
        return self._supervised

    def enabled_models_qs(self) -> Any:
        # The parent leaves out crontabs whose hour is far from now (a speed-up); supervised
        # crontabs stay in, so a restarted beat can still apply their catch-up policy.
        names = list(self.supervised_names())
        qs = self.Model.objects.enabled().filter(Q(pk__in=super().enabled_models_qs().values("pk")) | Q(task__in=names))
        # One query for the schedules and policies instead of one per row and relation.
        # (enabled() also prefetches the schedules: a second walk over every row, which the join
        # already did, so it is dropped.)
        return (
            qs.select_related("interval", "crontab", "solar", "clocked", "supervision")
            .prefetch_related(None)
            .annotate(last_slot=last_slot_subquery())
        )

    def _get_unique_timezone_names(self) -> Any:
        # The parent builds one CASE branch per name returned here, but its DISTINCT also covers the
        # model's default ordering: one name per crontab row, thousands of branches on a large table
        # (django-celery-beat issue #947). Without the ordering, one per time zone.
        return CrontabSchedule.objects.order_by().values_list("timezone", flat=True).distinct()

    def all_as_schedule(self) -> dict[str, Any]:
        return self.entries_for(self.enabled_models())

    def entries_for(self, models: Iterable[PeriodicTask]) -> dict[str, Any]:
        """Beat entries of periodic task rows (read by ``enabled_models_qs``): a supervised entry for a
        supervised task, the parent's entry for any other; a row that can't be read is left out."""
        names = self.supervised_names()
        now = utcnow()
        defaults = PolicyDefaults.read()
        entries: dict[str, Any] = {}
        for model in models:
            try:
                if model.task in names:
                    definition = definition_for(model, self.app.tasks[model.task], defaults)
                    cursor = cursor_for(definition, model.last_slot, now)
                    entries[model.name] = SupervisedEntry(model, app=self.app, definition=definition, cursor=cursor)
                else:
                    entries[model.name] = self.Entry(model, app=self.app)
            except ValueError as exc:
                # Left out, as the parent leaves it out, but said: a schedule that silently never
                # fires is what this app exists to prevent.
                logger.warning("schedule %r cannot be read (%s); left out", model.name, exc)
            except Exception:
                logger.exception("schedule %r cannot be loaded; left out", model.name)
        return entries

    # ------------------------------------------------------------------ schedules from settings

    def update_from_dict(self, mapping: Mapping[str, Any]) -> None:
        """Entries of ``beat_schedule`` (``CELERY_BEAT_SCHEDULE``) and Celery's default entries: written
        to the database as django-celery-beat writes them, supervised ones loaded as supervised entries.

        The parent makes every entry a plain ``ModelEntry``, and this beat does not see its own write
        as a change: until its next full reload (up to five minutes) a supervised schedule from settings
        would be sent through the plain path, by every beat, with no slot recorded. Here it is recorded
        per slot from the first tick, like a schedule edited in the admin. Plain entries: the parent's.
        """
        names = self.supervised_names()
        supervised = {
            name: fields
            for name, fields in mapping.items()
            if isinstance(fields, Mapping) and fields.get("task") in names
        }
        super().update_from_dict({name: fields for name, fields in mapping.items() if name not in supervised})
        if not supervised:
            return
        written = []
        for name, fields in supervised.items():
            try:
                self.write_settings_row(name, fields)
            except Exception as exc:  # as the parent: that entry is left out, the others go on
                logger.exception("beat %s: cannot add schedule %r from settings (%s)", self.process_name, name, exc)
                continue
            written.append(name)
        # The rows read back as a reload reads them (policy, last recorded slot), so the cursor is the same.
        self.schedule.update(self.entries_for(self.enabled_models_qs().filter(name__in=written)))

    def write_settings_row(self, name: str, fields: Mapping[str, Any]) -> None:
        """The ``PeriodicTask`` row of a settings entry, as the parent's ``ModelEntry.from_entry`` writes it,
        but saved only when it differs: every save moves ``date_changed`` (the anchor below which slots
        are not judged, so a slot due while the beats restarted would be neither run nor missed) and
        signals a schedule change to every beat."""
        values = self.Entry._unpack_fields(**fields)  # also saves the interval/crontab row, as the parent
        row = self.Model.objects.filter(name=name).first()
        if row is not None and _stored(row, values):
            return
        self.Model._default_manager.update_or_create(name=name, defaults=values)

    # ------------------------------------------------------------------ ticking

    def schedules_equal(self, *args: Any, **kwargs: Any) -> bool:
        # Celery compares every entry with its copy at every tick (O(N) per send: beat stalls with
        # tens of thousands of schedules). The parent already invalidates the heap whenever it
        # reloads the schedule, which is the only way entries change here, so that flag suffices.
        if getattr(self, "_heap_invalidated", False):
            self._heap_invalidated = False
            return False
        return True

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay = self.tick_supervised()
        if delay is None:  # a plain entry is next, or nothing is due: the parent's one-entry step
            delay = super().tick(*args, **kwargs)
        if time.monotonic() - self._liveness_at >= self.liveness_interval:
            self.record_liveness()
        return delay

    def tick_supervised(self) -> float | None:
        """Fire every supervised entry due now at the top of the heap, as one batch.

        The heap semantics are the parent's: an entry due by its heap time but not by ``is_due`` is
        pushed back at its new time, a fired entry's successor at its next slot. Returns 0 (tick
        again at once) after any work, None when the top of the heap is a plain entry or not due.
        """
        if self._heap is None or not self.schedules_equal(self.old_schedulers, self.schedule):
            self.old_schedulers = copy.copy(self.schedule)
            self.populate_heap()
        heap = self._heap
        if heap is None:
            return None
        due: list[tuple[Any, SupervisedEntry, float]] = []
        later = []
        now: float | None = None
        while heap and len(due) < self.batch_size:
            event = heap[0]
            entry = event[2]
            if not isinstance(entry, SupervisedEntry):
                break
            if now is None:
                now = self._when(entry, 0)
            if event[0] > now:
                break
            heapq.heappop(heap)
            try:
                is_due, next_time_to_run = self.is_due(entry)
            except Exception:
                is_due, next_time_to_run = self._is_due_failed(entry)
            if is_due:
                due.append((event, entry, next_time_to_run))
            else:
                delay = next_time_to_run if isinstance(next_time_to_run, int | float) else self.max_interval
                later.append(event_t(self._when(entry, delay), event[1], entry))
        for event in later:
            heapq.heappush(heap, event)
        if not due:
            return 0.0 if later else None
        reserved, successors = [], []
        for event, entry, next_time_to_run in due:
            try:
                successor = self.reserve(entry)
            except Exception:  # as the parent would on the next tick: try again later
                logger.exception("beat %s: schedule %r cannot advance", self.process_name, entry.name)
                heapq.heappush(heap, event_t(self._when(entry, self.max_interval), event[1], entry))
                continue
            reserved.append(entry)
            successors.append(event_t(self._when(successor, next_time_to_run), event[1], successor))
        try:
            self.fire(reserved)
        finally:
            for event in successors:  # every fired entry goes back on the heap as its successor
                heapq.heappush(heap, event)
        return 0.0

    def reserve(self, entry: Any) -> Any:
        if not isinstance(entry, SupervisedEntry):
            return super().reserve(entry)
        successor = next(entry)
        # As Celery's own reserve() does (django-celery-beat's does not): the schedule holds the
        # successor, so a heap rebuilt from it without a reload does not fire from an old cursor.
        # Not marked dirty for sync(): ``fire`` records the fired schedules in one statement.
        if self._schedule is not None and self._schedule.get(entry.name) is entry:
            self._schedule[entry.name] = successor
        return successor

    def fire(self, entries: Sequence[SupervisedEntry]) -> None:
        """Record (and publish) the due slots of reserved entries; a failed one keeps its slots."""
        firings = [Firing(e.definition, e.cursor, e.upto or utcnow()) for e in entries]
        try:
            results = fire_many(firings)
        except Exception as unexpected:  # fire_many reports failures per firing: a bug, fail them all
            logger.exception("beat %s: could not fire %d schedules", self.process_name, len(entries))
            results = [unexpected] * len(entries)
        total = RecordCounts()
        fired: list[tuple[SupervisedEntry, RecordCounts]] = []
        failed: list[tuple[SupervisedEntry, Exception]] = []
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                # Nothing (or not all) was recorded: do not move past these slots; the next fire
                # retries them (and the supervisor judges them if the outage lasts).
                if entry.successor is not None:
                    entry.successor.cursor = entry.cursor
                failed.append((entry, result))
                continue
            total.add(result)
            fired.append((entry, result))
            if result.held or result.missed or result.skipped or result.replaced:
                logger.info("beat %s: %r %s", self.process_name, entry.name, result.as_dict())
        if failed:
            first, error = failed[0]
            logger.error(
                "beat %s: %d schedule(s) not fired, retried at their next fire; first: %r (%s: %s)",
                self.process_name,
                len(failed),
                first.name,
                type(error).__name__,
                error,
            )
        for key, value in total.as_dict().items():
            self._stats[key] = self._stats.get(key, 0) + value
        if total.run or total.held or total.missed or total.skipped:
            logger.info("beat %s: %d schedule(s) fired %s", self.process_name, len(entries), total.as_dict())
        self.mark_fired(fired)

    def mark_fired(self, fired: Sequence[tuple[SupervisedEntry, RecordCounts]]) -> None:
        """``last_run_at`` and ``total_run_count`` of the schedules whose runs this beat recorded: one
        UPDATE per distinct count (usually one). The beat that lost a slot leaves it to the winner.

        Informational (the admin's columns): the slot cursor comes from the runs table.
        """
        by_count: dict[int, list[int]] = {}
        for entry, counts in fired:
            if counts.run + counts.held:
                by_count.setdefault(counts.run + counts.held, []).append(entry.model.pk)
        now = utcnow()
        try:
            for count, pks in by_count.items():
                PeriodicTask.objects.filter(pk__in=pks).update(
                    last_run_at=now, total_run_count=F("total_run_count") + count
                )
        except Exception as exc:
            logger.warning("beat could not record when its schedules ran (%s)", type(exc).__name__)

    def close(self) -> None:
        """Beat stops cleanly: its liveness row goes with it (a killed beat's is pruned by the sweep)."""
        try:
            super().close()
        finally:
            try:
                forget_process(ProcessHeartbeat.Kind.BEAT, self.process_name)
            except Exception as exc:
                logger.warning("beat could not remove its liveness row (%s)", type(exc).__name__)

    def record_liveness(self) -> None:
        self._liveness_at = time.monotonic()
        try:
            record_liveness(ProcessHeartbeat.Kind.BEAT, self.process_name, dict(self._stats))
        except Exception as exc:  # the database is down: beat keeps its schedule, tries again later
            logger.warning("beat could not record its liveness (%s)", type(exc).__name__)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if not isinstance(entry, SupervisedEntry):
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        if advance:
            self.reserve(entry)  # sets entry.upto (the end of this fire) and its successor
        self.fire([entry])
        return None
