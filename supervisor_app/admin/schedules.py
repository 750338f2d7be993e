"""django-celery-beat's schedule admin, extended: the supervision policy inline and the schedule's
latest runs. Replaces django-celery-beat's registration of ``PeriodicTask``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django_celery_beat import admin as beat_admin  # registers PeriodicTaskAdmin first: we replace it
from django_celery_beat.models import PeriodicTask

from ..models import SupervisedRun, SupervisionPolicy
from .display import badge
from .readonly import ReadOnlyInline
from .runs import LIST_DEFERRED
from .schedule_actions import ScheduleActionsMixin

#: Runs shown inline on a schedule's page.
RECENT_RUNS = 20


class RecentRunsInline(ReadOnlyInline):
    """The schedule's latest runs (read-only, at most ``RECENT_RUNS``)."""

    model = SupervisedRun
    fk_name = "periodic_task"
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    fields = ("status_badge", "scheduled_for", "attempts", "worker", "started_at", "finished_at", "created_at")
    readonly_fields = fields
    verbose_name = _("recent run")
    verbose_name_plural = _("recent runs (latest %(n)d)") % {"n": RECENT_RUNS}

    def get_queryset(self, request: HttpRequest) -> QuerySet[SupervisedRun]:
        return super().get_queryset(request).defer(*LIST_DEFERRED).order_by("-created_at", "-id")

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)

        class Recent(formset):  # type: ignore[misc,valid-type]
            def get_queryset(self) -> Any:
                # Slice after the formset filtered by schedule (a sliced queryset can't be filtered).
                if not hasattr(self, "_recent"):
                    self._recent = super().get_queryset()[:RECENT_RUNS]
                return self._recent

        return Recent

    @admin.display(description=_("status"))
    def status_badge(self, obj: SupervisedRun) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description=_("attempt / max"))
    def attempts(self, obj: SupervisedRun) -> str:
        return f"{obj.attempt} / {obj.max_attempts}"


class SupervisionPolicyInline(admin.StackedInline):
    """The schedule's supervision policy. An empty form is shown when the schedule has none; left empty
    it saves nothing. The model validates every field (choices, durations, addresses, the task)."""

    model = SupervisionPolicy
    extra = 1
    can_delete = True
    verbose_name = _("supervision policy")
    verbose_name_plural = _("supervision policy")


if admin.site.is_registered(PeriodicTask):
    admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class SupervisedPeriodicTaskAdmin(ScheduleActionsMixin, beat_admin.PeriodicTaskAdmin):
    """django-celery-beat's schedule admin plus the supervision policy and the schedule's recent runs."""

    def get_inlines(self, request: HttpRequest, obj: Any) -> list[Any]:
        inlines = [*super().get_inlines(request, obj), SupervisionPolicyInline]
        # Recent runs are for reading only: left out of a save so the edit never validates them.
        if obj is not None and request.method != "POST":
            inlines.append(RecentRunsInline)
        return inlines
