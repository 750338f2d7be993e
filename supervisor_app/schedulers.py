"""``SupervisedScheduler``: django-celery-beat's ``DatabaseScheduler`` with durable, deduplicated slots.

    celery -A project beat -S supervisor_app.schedulers:SupervisedScheduler

A periodic task whose task is a :class:`~supervisor_app.tasks.SupervisedTask` fires on its *slot
times* (:mod:`supervisor_app.slots`), not "interval after the last send": every fire records each
due slot with ``INSERT … (periodic_task, slot)`` and only the beat whose insert succeeded publishes.
Several beats can therefore run side by side for high availability, and a beat that restarts picks
up after the last *recorded* slot and applies the schedule's catch-up policy. Other periodic tasks
are scheduled exactly as by ``DatabaseScheduler``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from celery import schedules
from django.db.models import Q
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from . import scheduling, slots
from .models import ProcessHeartbeat

logger = logging.getLogger("supervisor_app")

#: Seconds until a schedule with no next slot is looked at again (a change reloads it sooner).
IDLE = 300.0


def utcnow() -> datetime:
    return datetime.now(slots.UTC)


class SupervisedEntry(ModelEntry):  # type: ignore[misc]
    """A beat entry due whenever a slot after ``cursor`` has come; firing records the slots."""

    def __init__(
        self, model: PeriodicTask, app: Any = None, *, definition: scheduling.ScheduleDef, cursor: datetime
    ) -> None:
        super().__init__(model, app=app)
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
        self.successor = type(self)(self.model, app=self.app, definition=self.definition, cursor=now)
        return self.successor

    def save(self) -> None:
        # An UPDATE, not Model.save(): save() would bump date_changed (the anchor below which slots
        # are not judged) and could signal a schedule change to every beat.
        PeriodicTask.objects.filter(pk=self.model.pk).update(
            last_run_at=self.model.last_run_at, total_run_count=self.model.total_run_count
        )


class SupervisedScheduler(DatabaseScheduler):  # type: ignore[misc]
    """Database scheduler recording every slot of supervised schedules before publishing it."""

    #: Seconds between two liveness records of this beat.
    liveness_interval = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .supervisor import process_name

        self.process_name = process_name()
        self._liveness_at = 0.0
        self._stats: dict[str, int] = {}
        self._supervised: set[str] | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ loading

    def supervised_names(self) -> set[str]:
        if self._supervised is None:
            self._supervised = scheduling.supervised_task_names(self.app)
        return self._supervised

    def enabled_models_qs(self) -> Any:
        # The parent leaves out crontabs whose hour is far from now (a speed-up); supervised
        # crontabs stay in, so a restarted beat can still apply their catch-up policy.
        names = list(self.supervised_names())
        qs = self.Model.objects.enabled().filter(Q(pk__in=super().enabled_models_qs().values("pk")) | Q(task__in=names))
        # One query for the schedules and policies instead of one per row and relation.
        return qs.select_related("interval", "crontab", "solar", "clocked", "supervision").annotate(
            last_slot=scheduling.last_slot_subquery()
        )

    def all_as_schedule(self) -> dict[str, Any]:
        names = self.supervised_names()
        now = utcnow()
        entries: dict[str, Any] = {}
        for model in self.enabled_models():
            try:
                if model.task in names:
                    definition = scheduling.definition_for(model, self.app.tasks[model.task])
                    cursor = scheduling.cursor_for(definition, model.last_slot, now)
                    entries[model.name] = SupervisedEntry(model, app=self.app, definition=definition, cursor=cursor)
                else:
                    entries[model.name] = self.Entry(model, app=self.app)
            except ValueError:
                pass  # as the parent does: a schedule that cannot be read is left out
            except Exception:
                logger.exception("schedule %r cannot be loaded; left out", model.name)
        return entries

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
        delay: float = super().tick(*args, **kwargs)
        if time.monotonic() - self._liveness_at >= self.liveness_interval:
            self.record_liveness()
        return delay

    def record_liveness(self) -> None:
        from .supervisor import record_liveness

        self._liveness_at = time.monotonic()
        try:
            record_liveness(ProcessHeartbeat.Kind.BEAT, self.process_name, dict(self._stats))
        except Exception as exc:  # the database is down: beat keeps its schedule, tries again later
            logger.warning("beat could not record its liveness (%s)", type(exc).__name__)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if not isinstance(entry, SupervisedEntry):
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        if advance:
            entry = self.reserve(entry)
        upto = entry.upto or utcnow()
        try:
            counts = scheduling.fire(entry.definition, entry.cursor, upto)
        except Exception:
            # The database is unreachable: nothing was recorded, so do not move past these slots;
            # the next fire retries them (and the supervisor judges them if the outage lasts).
            if entry.successor is not None:
                entry.successor.cursor = entry.cursor
            raise
        for key, value in counts.as_dict().items():
            self._stats[key] = self._stats.get(key, 0) + value
        if counts.run or counts.held or counts.missed or counts.skipped:
            logger.info("beat %s: %r %s", self.process_name, entry.name, counts.as_dict())
        return None
