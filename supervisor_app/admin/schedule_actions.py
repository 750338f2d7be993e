"""Operators' actions on schedules (django-celery-beat's ``PeriodicTask``): run now, backfill a range of
slots, enable (which resumes a schedule paused after failures), and the pause state in the list.

A mixin of :class:`~supervisor_app.admin.schedules.SupervisedPeriodicTaskAdmin`. Every action needs
the permission to change periodic tasks (django-celery-beat's own enable, disable and toggle actions
included: here they need it too).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.formats import localize
from django.utils.timezone import localtime
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..models import SupervisionPolicy
from ..scheduling import operator, pausing

#: Schedules one action handles at most (a "select all" over a huge table is cut here).
ACTION_LIMIT = 100


class BackfillForm(forms.Form):
    start = forms.DateTimeField(help_text=_("First instant (inclusive), e.g. 2026-03-01 00:00 (server time zone)."))
    end = forms.DateTimeField(help_text=_("Last instant (inclusive)."))

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("start") and data.get("end") and data["end"] < data["start"]:
            raise forms.ValidationError(_("The range ends before it starts."))
        return data


def _policy(pt: Any) -> SupervisionPolicy | None:
    try:
        return pt.supervision  # type: ignore[no-any-return]
    except SupervisionPolicy.DoesNotExist:
        return None


def paused_policy(pt: Any) -> SupervisionPolicy | None:
    """The policy of a schedule that is disabled because it was paused after failures."""
    policy = _policy(pt)
    return policy if policy is not None and policy.paused_at is not None and not pt.enabled else None


def pause_state(pt: Any) -> str:
    """``paused <when>: <why>`` for a schedule disabled after failures; what would pause it, else."""
    paused = paused_policy(pt)
    if paused is not None and paused.paused_at is not None:
        when = localize(localtime(paused.paused_at))
        return str(_("paused %(when)s after %(why)s") % {"when": when, "why": paused.paused_reason})
    n = pausing.threshold(_policy(pt))
    return str(_("pauses after %(n)d failed runs") % {"n": n}) if n else ""


class ScheduleActionsMixin:
    """Run now, backfill, enable-resumes and the pause state, for a ``PeriodicTask`` admin."""

    actions = ("enable_tasks", "disable_tasks", "toggle_tasks", "run_tasks", "run_now", "backfill_slots")
    message_user: Any
    admin_site: Any
    model: Any

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).select_related("supervision")  # type: ignore[misc]

    def get_list_display(self, request: HttpRequest) -> Any:
        return [*super().get_list_display(request), "supervision_state"]  # type: ignore[misc]

    @admin.display(description=_("pause on failure"))
    def supervision_state(self, obj: Any) -> str:
        return pause_state(obj)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "GET":
            pt = self.get_queryset(request).filter(pk=object_id).first()
            if pt is not None and paused_policy(pt) is not None:
                self.message_user(
                    request,
                    _("This schedule is %(state)s. Enable it to resume; its failures are then counted from zero.")
                    % {"state": pause_state(pt)},
                    messages.WARNING,
                )
        return super().change_view(request, object_id, form_url, extra_context)  # type: ignore[misc,no-any-return]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        if change and obj.enabled and "enabled" in form.changed_data:
            pausing.resume([obj.pk])

    # ------------------------------------------------------------------ django-celery-beat's, resuming

    @admin.action(permissions=["change"], description=_("Enable selected tasks"))
    def enable_tasks(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = list(queryset.filter(enabled=False).values_list("pk", flat=True))
        super().enable_tasks(request, queryset)  # type: ignore[misc]
        pausing.resume(ids)

    @admin.action(permissions=["change"], description=_("Disable selected tasks"))
    def disable_tasks(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().disable_tasks(request, queryset)  # type: ignore[misc]

    @admin.action(permissions=["change"], description=_("Toggle activity of selected tasks"))
    def toggle_tasks(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = list(queryset.filter(enabled=False).values_list("pk", flat=True))
        super().toggle_tasks(request, queryset)  # type: ignore[misc]
        pausing.resume(ids)

    @admin.action(permissions=["change"], description=_("Run selected tasks"))
    def run_tasks(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().run_tasks(request, queryset)  # type: ignore[misc]

    # ------------------------------------------------------------------ run now, backfill

    @admin.action(permissions=["change"], description=_("Run now (a supervised run, in the schedule's history)"))
    def run_now(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        recorded, refused = [], []
        for pt in queryset[:ACTION_LIMIT]:
            try:
                run = operator.run_now(pt)
            except (ValueError, TypeError) as exc:
                refused.append(f"{pt.name}: {exc}")
                continue
            recorded.append(f"{pt.name} (run {run.pk})")
        if recorded:
            self.message_user(
                request,
                ngettext("Run recorded: %(runs)s.", "Runs recorded: %(runs)s.", len(recorded))
                % {"runs": ", ".join(recorded)},
                messages.SUCCESS,
            )
        for text in refused:
            self.message_user(request, _("Not run: %(why)s") % {"why": text}, messages.ERROR)

    @admin.action(permissions=["change"], description=_("Backfill slots in a range…"))
    def backfill_slots(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        schedules = list(queryset[:ACTION_LIMIT])
        form = BackfillForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            for pt in schedules:
                try:
                    result = operator.backfill(pt, form.cleaned_data["start"], form.cleaned_data["end"])
                except (ValueError, TypeError) as exc:
                    self.message_user(
                        request, _("%(name)s: not backfilled: %(why)s") % {"name": pt.name, "why": exc}, messages.ERROR
                    )
                    continue
                self.message_user(
                    request,
                    _("%(name)s: %(slots)d slot(s) in the range, %(recorded)d recorded, %(existing)d already recorded.")
                    % {
                        "name": pt.name,
                        "slots": result.slots,
                        "recorded": result.recorded,
                        "existing": result.existing,
                    },
                    messages.SUCCESS if result.recorded or not result.slots else messages.INFO,
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": _("Backfill slots"),
            "opts": self.model._meta,
            "form": form,
            "schedules": schedules,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "action": "backfill_slots",
        }
        return TemplateResponse(request, "admin/supervisor_app/periodictask/backfill.html", context)
