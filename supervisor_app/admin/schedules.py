"""django-celery-beat's schedule admin, extended: arguments checked by type, the supervision policy
inline and the schedule's latest runs. Replaces django-celery-beat's registration of ``PeriodicTask``."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django_celery_beat import admin as beat_admin  # registers PeriodicTaskAdmin first: we replace it
from django_celery_beat.models import PeriodicTask

from ..core import arguments
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


#: The admin's messages for arguments of the wrong JSON type (``found``: what the field holds).
ARGUMENT_ERRORS: dict[arguments.Field, Any] = {
    "args": _('Positional arguments must be a JSON list, such as [1, "a"], not %(found)s.'),
    "kwargs": _('Keyword arguments must be a JSON object, such as {"key": "value"}, not %(found)s.'),
}


class SupervisedPeriodicTaskForm(beat_admin.PeriodicTaskForm):  # type: ignore[misc]
    """django-celery-beat's form with the arguments checked by type, for every task: Celery sends a
    task only with a list and an object (``TypeError`` at each send otherwise), and a supervised
    schedule with ``[1]`` as keyword arguments could not be recorded; the parent accepts any JSON."""

    def clean_args(self) -> Any:
        return self._check_type("args", super().clean_args())

    def clean_kwargs(self) -> Any:
        return self._check_type("kwargs", super().clean_kwargs())

    def _check_type(self, field: arguments.Field, text: Any) -> Any:
        # The parent has refused text that is not JSON, with its own message.
        value = json.loads(text or arguments.EXPECTED[field][1])
        if arguments.type_error(field, value) is not None:
            raise forms.ValidationError(
                ARGUMENT_ERRORS[field], code="invalid", params={"found": arguments.json_kind(value)}
            )
        return text


if admin.site.is_registered(PeriodicTask):
    admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class SupervisedPeriodicTaskAdmin(ScheduleActionsMixin, beat_admin.PeriodicTaskAdmin):
    """django-celery-beat's schedule admin plus the supervision policy and the schedule's recent runs."""

    form = SupervisedPeriodicTaskForm

    def get_inlines(self, request: HttpRequest, obj: Any) -> list[Any]:
        inlines = [*super().get_inlines(request, obj), SupervisionPolicyInline]
        # Recent runs are for reading only: left out of a save so the edit never validates them.
        if obj is not None and request.method != "POST":
            inlines.append(RecentRunsInline)
        return inlines
