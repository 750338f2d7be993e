"""A run's place in its workflow (Celery canvas), for the run's admin page, and the workflow view: the
runs changelist filtered to one workflow's steps (``?workflow=<root task id>``)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from ..core.workflow import has_continuation
from ..models import SupervisedRun
from .display import badge

#: At most this many children are listed on a run's page (a fan-out may have thousands).
CHILDREN_SHOWN = 20


class WorkflowFilter(admin.SimpleListFilter):
    """Every step of one workflow: the runs sharing a root (``options.root_id``), and the root itself.
    Offered only once chosen (from a run's page): a lookup list of every workflow would scan the table."""

    title = _("workflow")
    parameter_name = "workflow"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        value = self.value()
        return [(value, value)] if value else []

    def has_output(self) -> bool:
        return bool(self.value())

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        return queryset.in_workflow(str(value)) if value else queryset  # type: ignore[attr-defined]


def _run_link(run: SupervisedRun | None, task_id: str) -> str:
    if run is None:
        return format_html("<code>{}</code> <small>({})</small>", task_id, _("not a supervised run"))
    url = reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])
    return format_html(
        '<a href="{}">#{} {}</a> {}', url, run.pk, run.task_name, badge(run.status, run.get_status_display())
    )


def _by_task_id(task_id: str | None) -> SupervisedRun | None:
    if not task_id:
        return None
    return SupervisedRun.objects.filter(task_id=task_id).only("pk", "task_name", "status").first()


def _names(signatures: Any) -> str:
    names = [str(s.get("task", "?")) for s in signatures or () if isinstance(s, dict)]
    return ", ".join(names) or "—"


def place(obj: SupervisedRun) -> str:
    """The run's workflow: root, parent, group, children, and the continuation it carries."""
    options = obj.options or {}
    root_id, parent_id = options.get("root_id"), options.get("parent_id")
    children = list(
        SupervisedRun.objects.children_of(obj.celery_task_id)
        .only("pk", "task_name", "status")
        .order_by("created_at", "id")[: CHILDREN_SHOWN + 1]
    )
    has_canvas = any(options.get(k) for k in ("callbacks", "errbacks", "chain", "chord", "group_id"))
    if not (root_id or parent_id or children or has_canvas):
        return "—"
    rows: list[tuple[Any, Any]] = []
    if root_id and root_id != obj.celery_task_id:
        rows.append((_("root"), _run_link(_by_task_id(root_id), root_id)))
    if parent_id:
        rows.append((_("parent"), _run_link(_by_task_id(parent_id), parent_id)))
    if options.get("group_id"):
        rows.append((_("group"), format_html("<code>{}</code> #{}", options["group_id"], options.get("group_index"))))
    if children:
        shown = format_html_join("<br>", "{}", ((_run_link(c, c.task_id),) for c in children[:CHILDREN_SHOWN]))
        more = _(" … and more") if len(children) > CHILDREN_SHOWN else ""
        rows.append((_("children"), format_html("{}{}", shown, more)))
    chain = options.get("chain") or []
    if chain:
        rows.append((_("next in chain"), _names(list(reversed(chain)))))
    if options.get("callbacks"):
        rows.append((_("on success (link)"), _names(options["callbacks"])))
    if options.get("errbacks"):
        rows.append((_("on failure (link_error)"), _names(options["errbacks"])))
    if options.get("chord"):
        rows.append((_("chord body"), _names([options["chord"]])))
    if has_continuation(options):
        if obj.is_active:
            state = _("dispatched when the run ends")
        elif obj.follow_up:
            state = _("still to dispatch (by the supervisor's next sweep)")
        else:
            state = _("dispatched")
        rows.append((_("continuation"), state))
    url = reverse("admin:supervisor_app_supervisedrun_changelist") + f"?workflow={root_id or obj.celery_task_id}"
    rows.append(("", format_html('<a href="{}">{}</a>', url, _("every step of this workflow"))))
    body = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
    return format_html('<table class="sv-workflow">{}</table>', body)
