"""The runs' admin: the changelist (built for big tables), a run's page with its attempts and the
operator actions, and the dashboard.

Runs are written only by ``supervisor_app.runs`` (the agents, the supervisor and the operator actions
below): nobody adds, edits or deletes a run through the admin. Staff with the view permission see
runs read-only; the actions each need their own permission (``retry_run``, ``cancel_run``,
``resolve_run``).

Built for big tables: the changelist does a constant number of queries whatever the page size
(``list_select_related``, no per-row lookups, no ``date_hierarchy`` scan), counts at most
:data:`COUNT_CAP` rows instead of the whole table, and every filter is backed by an index of
``SupervisedRun.Meta.indexes``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django_celery_beat.models import PeriodicTask

from .. import registry
from ..core.states import RunStatus
from ..models import AdoptedMessage, RunAttempt, SupervisedRun
from ..ops import dashboard
from ..runs import mark_resolved, request_cancel, retry_now
from .display import age, badge, human_duration, pre, pretty_json
from .readonly import ReadOnlyInline
from .workflows import WorkflowFilter, place

#: The changelist counts at most this many matching rows (``SELECT COUNT(*) FROM (… LIMIT n)``), so
#: a page costs the same on a million rows as on a thousand. Narrow with filters to page further.
COUNT_CAP = 10_000
#: An action handles at most this many runs at once ("select all" on a huge table stays bounded).
ACTION_LIMIT = 1_000
#: Columns not needed on the changelist (potentially large JSON and text).
LIST_DEFERRED = ("args", "kwargs", "options", "progress", "checkpoint", "last_error", "result")
#: Short labels of the action buttons on a run's page (the action's description is the tooltip).
DETAIL_BUTTONS: dict[str, Any] = {
    "retry_now": _("Retry now"),
    "cancel": _("Cancel"),
    "mark_resolved": _("Mark resolved"),
}


class CappedPaginator(Paginator):
    """Counts at most ``COUNT_CAP`` rows: the full-table ``COUNT(*)`` is what makes a big changelist slow."""

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        capped = self.object_list[: COUNT_CAP + 1].count()  # type: ignore[attr-defined]
        self.capped = capped > COUNT_CAP
        return min(capped, COUNT_CAP)

    capped = False


class RunChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        # ``exclude_parameters`` exists from Django 5.0 on; Django 4.2 calls with the request only.
        args = (request,) if exclude_parameters is None else (request, exclude_parameters)
        return super().get_queryset(*args).defer(*LIST_DEFERRED)


class TaskNameFilter(admin.SimpleListFilter):
    """Task names from the Celery app and the schedules, not ``SELECT DISTINCT`` over every run."""

    title = _("task")
    parameter_name = "task_name"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = registry.supervised_task_names()
        names.update(PeriodicTask.objects.exclude(task="").values_list("task", flat=True).distinct())
        names.discard("supervisor_app.sweep")
        # The web process may not have imported every task module: keep a value chosen elsewhere.
        if self.value():
            names.add(str(self.value()))
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        return queryset.filter(task_name=value) if value else queryset


class ScheduleFilter(admin.RelatedFieldListFilter):
    """Schedules by name in one query (``str(PeriodicTask)`` would fetch each one's schedule row)."""

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(str(pk), name) for pk, name in PeriodicTask.objects.order_by("name").values_list("pk", "name")]


class AttentionFilter(admin.SimpleListFilter):
    """The incident views the dashboard links to."""

    title = _("needs attention")
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("stale", _("lease expired now")),
            ("incidents", _("open incidents (failed, dead, missed; not resolved)")),
            ("recovered", _("recovered in the last 24 h")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        if value == "stale":
            return queryset.stale()  # type: ignore[attr-defined]
        if value == "incidents":
            return dashboard.open_incidents(queryset)
        if value == "recovered":
            return dashboard.runs_recovered_since(queryset, timezone.now() - dashboard.WINDOW)
        return queryset


class RunAttemptInline(ReadOnlyInline):
    """Every attempt of a run, read-only, with its error and traceback."""

    model = RunAttempt
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("number",)
    fields = ("number", "outcome_badge", "worker", "task_id", "started_at", "ended_at", "took", "error_text")
    readonly_fields = fields
    verbose_name = _("attempt")
    verbose_name_plural = _("attempts")

    # Attempts are part of their run: whoever may view the run may view its attempts.
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("supervisor_app.view_supervisedrun")

    @admin.display(description=_("outcome"))
    def outcome_badge(self, obj: RunAttempt) -> str:
        return badge(obj.outcome, obj.get_outcome_display())

    @admin.display(description=_("took"))
    def took(self, obj: RunAttempt) -> str:
        if obj.started_at is None:
            return "—"
        return human_duration((obj.ended_at or timezone.now()) - obj.started_at)

    @admin.display(description=_("error / traceback"))
    def error_text(self, obj: RunAttempt) -> str:
        if not obj.error and not obj.traceback:
            return "—"
        if not obj.traceback:
            return pre(obj.error)
        return format_html(
            '<pre class="sv-pre">{}</pre><details class="sv-traceback"><summary>traceback</summary>'
            '<pre class="sv-pre">{}</pre></details>',
            obj.error,
            obj.traceback,
        )


@admin.register(SupervisedRun)
class SupervisedRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "status_badge",
        "task_name",
        "schedule",
        "scheduled_for",
        "attempts",
        "worker",
        "heartbeat_age",
        "duration",
        "created_at",
    )
    list_display_links = ("id", "task_name")
    list_filter = (
        "status",
        AttentionFilter,
        TaskNameFilter,
        ("periodic_task", ScheduleFilter),
        ("created_at", admin.DateFieldListFilter),
        WorkflowFilter,
    )
    list_select_related = ("periodic_task",)
    list_per_page = 50
    list_max_show_all = 200
    search_fields = ("task_name", "worker", "=unique_key", "=task_id")
    search_help_text = _("A run id, part of a task name or worker name, a whole unique key or Celery task id.")
    show_full_result_count = False
    paginator = CappedPaginator
    ordering = ("-created_at", "-id")
    inlines = (RunAttemptInline,)
    actions = ("retry_now", "cancel", "mark_resolved")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "task_name",
                    "periodic_task",
                    "scheduled_for",
                    "status_badge",
                    "attempts",
                    "worker",
                    "task_id",
                    "unique",
                    "concurrency",
                    "adopted_from",
                    "cancel_requested",
                    "last_error_text",
                    "resolved",
                )
            },
        ),
        (_("Progress"), {"fields": ("progress_pretty", "checkpoint_pretty", "result_pretty")}),
        (_("Workflow"), {"fields": ("workflow",)}),
        (
            _("Lease"),
            {
                "fields": (
                    "heartbeat_at",
                    "heartbeat_age",
                    "lease_expires_at",
                    "deadline_at",
                    "next_check_at",
                    "publish_count",
                    "lease_timeout",
                    "start_timeout",
                    "max_runtime",
                )
            },
        ),
        (_("Times"), {"fields": ("created_at", "started_at", "finished_at", "duration")}),
        (_("Arguments"), {"fields": ("args_pretty", "kwargs_pretty", "options_pretty")}),
    )
    readonly_fields = (
        "task_name",
        "periodic_task",
        "scheduled_for",
        "status_badge",
        "attempts",
        "worker",
        "task_id",
        "unique",
        "concurrency",
        "adopted_from",
        "cancel_requested",
        "last_error_text",
        "resolved",
        "progress_pretty",
        "checkpoint_pretty",
        "result_pretty",
        "workflow",
        "heartbeat_at",
        "heartbeat_age",
        "lease_expires_at",
        "deadline_at",
        "next_check_at",
        "publish_count",
        "lease_timeout",
        "start_timeout",
        "max_runtime",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "args_pretty",
        "kwargs_pretty",
        "options_pretty",
    )

    # Runs are written by supervisor_app.runs only.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # One permission per operator action (see Meta.permissions).
    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("supervisor_app.retry_run")

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("supervisor_app.cancel_run")

    def has_resolve_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("supervisor_app.resolve_run")

    def get_queryset(self, request: HttpRequest) -> QuerySet[SupervisedRun]:
        # The detail page shows the schedule: fetch it with the run.
        return super().get_queryset(request).select_related("periodic_task")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return RunChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[SupervisedRun], search_term: str
    ) -> tuple[QuerySet[SupervisedRun], bool]:
        # A number is a run id (primary key lookup); anything else searches task and worker names.
        term = search_term.strip()
        if term.isdigit():
            return queryset.filter(pk=int(term)), False
        return super().get_search_results(request, queryset, search_term)

    # ------------------------------------------------------------------ columns

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: SupervisedRun) -> str:
        html = badge(obj.status, obj.get_status_display())
        if obj.cancel_requested and obj.status == RunStatus.RUNNING:
            html = format_html('{} <span title="{}">⏹</span>', html, _("cancel requested"))
        return html

    @admin.display(description=_("schedule"), ordering="periodic_task__name")
    def schedule(self, obj: SupervisedRun) -> str:
        return obj.periodic_task.name if obj.periodic_task_id and obj.periodic_task else "—"

    @admin.display(description=_("attempt / max"))
    def attempts(self, obj: SupervisedRun) -> str:
        return f"{obj.attempt} / {obj.max_attempts}"

    @admin.display(description=_("heartbeat"), ordering="heartbeat_at")
    def heartbeat_age(self, obj: SupervisedRun) -> str:
        text = age(obj.heartbeat_at)
        expired = (
            obj.status == RunStatus.RUNNING
            and obj.lease_expires_at is not None
            and obj.lease_expires_at < timezone.now()
        )
        if expired:
            return format_html(
                '<span class="sv-stale" style="color:#c62828" title="{}">{} ⚠</span>', _("lease expired"), text
            )
        return text

    @admin.display(description=_("duration"))
    def duration(self, obj: SupervisedRun) -> str:
        if obj.started_at is None:
            return "—"
        end = obj.finished_at if obj.finished_at else (timezone.now() if obj.status == RunStatus.RUNNING else None)
        return human_duration(end - obj.started_at) if end else "—"

    @admin.display(description=_("unique key"))
    def unique(self, obj: SupervisedRun) -> str:
        """The key of a unique run (``unique_by`` or ``unique_key``), and how long it holds it."""
        if not obj.unique_key:
            return "—"
        if obj.unique_until is None:
            return format_html("{} <small>({})</small>", obj.unique_key, _("held while the run is active"))
        return format_html(
            "{} <small>({} {})</small>", obj.unique_key, _("held while the run is active, and until"), obj.unique_until
        )

    @admin.display(description=_("concurrency limit"))
    def concurrency(self, obj: SupervisedRun) -> str:
        """The task's concurrency limit as this run met it: its key, the limit, and its slot or its wait."""
        if not obj.concurrency_key:
            return "—"
        where: str
        if obj.status == RunStatus.WAITING:
            where = str(_("waiting for a slot since its delivery"))
        elif obj.status == RunStatus.RUNNING and obj.concurrency_slot is not None:
            where = str(_("holds slot %(slot)s")) % {"slot": obj.concurrency_slot + 1}
        else:
            where = str(_("held a slot"))
        return format_html(
            "{} <small>({}: {}; {})</small>", obj.concurrency_key, _("limit"), obj.concurrency_limit, where
        )

    @admin.display(description=_("adopted from message"))
    def adopted_from(self, obj: SupervisedRun) -> str:
        """The Celery id of the message this run was recorded for by a worker (sent without a run)."""
        message = AdoptedMessage.objects.filter(run=obj).values_list("message_id", flat=True).first()
        return message or "—"

    @admin.display(description=_("last error"))
    def last_error_text(self, obj: SupervisedRun) -> str:
        return pre(obj.last_error)

    @admin.display(description=_("resolved"))
    def resolved(self, obj: SupervisedRun) -> str:
        if obj.resolved_at is None:
            return "—"
        return format_html("{} ({})", obj.resolved_at, obj.resolved_by or "?")

    @admin.display(description=_("progress"))
    def progress_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.progress)

    @admin.display(description=_("checkpoint"))
    def checkpoint_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.checkpoint)

    @admin.display(description=_("result"))
    def result_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.result)

    @admin.display(description=_("place in its workflow"))
    def workflow(self, obj: SupervisedRun) -> str:
        return place(obj)

    @admin.display(description=_("args"))
    def args_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.args)

    @admin.display(description=_("kwargs"))
    def kwargs_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.kwargs)

    @admin.display(description=_("publishing options"))
    def options_pretty(self, obj: SupervisedRun) -> str:
        return pretty_json(obj.options)

    # ------------------------------------------------------------------ actions

    def _ids(self, queryset: QuerySet[SupervisedRun]) -> list[int]:
        return list(queryset.order_by().values_list("pk", flat=True)[:ACTION_LIMIT])

    def _done(self, request: HttpRequest, ids: list[int]) -> HttpResponse | None:
        """Back to the run's page when the action was started from it (one run), else the list."""
        if request.POST.get("_from_detail") and len(ids) == 1:
            return HttpResponseRedirect(reverse("admin:supervisor_app_supervisedrun_change", args=[ids[0]]))
        return None

    def _tell(self, request: HttpRequest, text: str, count: int, level: int) -> None:
        """One feedback message, when there is something to count (``text`` has ``%(count)d``)."""
        if count:
            self.message_user(request, text % {"count": count}, level)

    @admin.action(permissions=["retry"], description=_("Retry now (start a new attempt)"))
    def retry_now(self, request: HttpRequest, queryset: QuerySet[SupervisedRun]) -> HttpResponse | None:
        ids = self._ids(queryset)
        done = sum(1 for pk in ids if retry_now(pk))
        self._tell(
            request,
            ngettext(
                "%(count)d run was queued for a new attempt.",
                "%(count)d runs were queued for a new attempt.",
                done,
            ),
            done,
            messages.SUCCESS,
        )
        self._tell(
            request,
            ngettext(
                "%(count)d run was not retried: it is running (cancel it first).",
                "%(count)d runs were not retried: they are running (cancel them first).",
                len(ids) - done,
            ),
            len(ids) - done,
            messages.WARNING,
        )
        return self._done(request, ids)

    @admin.action(permissions=["cancel"], description=_("Cancel (running runs are stopped by their workers)"))
    def cancel(self, request: HttpRequest, queryset: QuerySet[SupervisedRun]) -> HttpResponse | None:
        ids = self._ids(queryset)
        outcomes = [request_cancel(pk) for pk in ids]
        cancelled = outcomes.count(RunStatus.CANCELLED)
        requested = outcomes.count(RunStatus.RUNNING)
        refused = len(ids) - cancelled - requested
        self._tell(
            request,
            ngettext("%(count)d run was cancelled.", "%(count)d runs were cancelled.", cancelled),
            cancelled,
            messages.SUCCESS,
        )
        self._tell(
            request,
            ngettext(
                "Cancellation was requested for %(count)d running run: its worker stops it in one renewal.",
                "Cancellation was requested for %(count)d running runs: their workers stop them in one renewal.",
                requested,
            ),
            requested,
            messages.SUCCESS,
        )
        self._tell(
            request,
            ngettext(
                "%(count)d run was not cancelled: it has already finished.",
                "%(count)d runs were not cancelled: they have already finished.",
                refused,
            ),
            refused,
            messages.WARNING,
        )
        return self._done(request, ids)

    @admin.action(permissions=["resolve"], description=_("Mark resolved (acknowledge failed, dead or missed runs)"))
    def mark_resolved(self, request: HttpRequest, queryset: QuerySet[SupervisedRun]) -> HttpResponse | None:
        ids = self._ids(queryset)
        by = request.user.get_username()
        done = sum(1 for pk in ids if mark_resolved(pk, by=by))
        self._tell(
            request,
            ngettext("%(count)d run was marked resolved.", "%(count)d runs were marked resolved.", done),
            done,
            messages.SUCCESS,
        )
        self._tell(
            request,
            ngettext(
                "%(count)d run was not marked resolved: only open failed, dead or missed runs can be.",
                "%(count)d runs were not marked resolved: only open failed, dead or missed runs can be.",
                len(ids) - done,
            ),
            len(ids) - done,
            messages.WARNING,
        )
        return self._done(request, ids)

    # ------------------------------------------------------------------ detail page and dashboard

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # The detail page offers the actions the user may run, as buttons posting to the changelist.
        allowed = self.get_actions(request)
        extra_context = {
            **(extra_context or {}),
            "run_actions": [
                (name, DETAIL_BUTTONS.get(name, entry[2]), entry[2]) for name, entry in allowed.items() if entry
            ],
            "dashboard_url": reverse("admin:supervisor_app_dashboard"),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "dashboard_url": reverse("admin:supervisor_app_dashboard")}
        return super().changelist_view(request, extra_context)

    def get_urls(self) -> list[URLPattern]:
        dashboard_urls = [
            path(
                "dashboard/",
                self.admin_site.admin_view(self.dashboard_view),
                name="supervisor_app_dashboard",
            )
        ]
        # Before the model's own patterns: "<path:object_id>/" would swallow "dashboard/".
        return dashboard_urls + super().get_urls()  # type: ignore[operator]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        data = dashboard.summary()
        changelist = reverse("admin:supervisor_app_supervisedrun_changelist")

        def link(**params: Any) -> str:
            return f"{changelist}?{urlencode(params)}" if params else changelist

        since = data["since"].isoformat()
        for row in data["statuses"]:
            row["recent_url"] = link(status__exact=row["status"], created_at__gte=since)
            row["all_url"] = link(status__exact=row["status"])
        context = {
            **self.admin_site.each_context(request),
            **data,
            "title": _("Supervision dashboard"),
            "opts": self.model._meta,
            "changelist_url": changelist,
            "recent_url": link(created_at__gte=since),
            "stale_url": link(attention="stale"),
            "incidents_url": link(attention="incidents"),
            "recovered_url": link(attention="recovered"),
            "missed_url": link(status__exact=RunStatus.MISSED, created_at__gte=since),
            "heartbeats_url": reverse("admin:supervisor_app_processheartbeat_changelist"),
            "chart": [
                {"bar": bar, "url": link(created_at__gte=bar.start.isoformat(), created_at__lt=bar.end.isoformat())}
                for bar in data["bars"]
            ],
        }
        return TemplateResponse(request, "supervisor_app/dashboard.html", context)
