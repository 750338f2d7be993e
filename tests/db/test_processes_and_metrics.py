"""Processes as operators meet them: liveness rows removed on a clean stop and pruned when silent for
long; ``metrics/`` without prometheus-client; the dashboard linked from the admin index."""

from __future__ import annotations

import sys
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from celery import current_app
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from supervisor_app.checks import check_metrics
from supervisor_app.models import ProcessHeartbeat
from supervisor_app.ops.health import check_health
from supervisor_app.ops.liveness import record_liveness
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db

SUPERVISOR, BEAT = ProcessHeartbeat.Kind.SUPERVISOR, ProcessHeartbeat.Kind.BEAT


def seen(kind: str, name: str, ago: timedelta) -> None:
    at = timezone.now() - ago
    ProcessHeartbeat.objects.create(kind=kind, name=name, started_at=at, last_seen=at)


def names() -> set[str]:
    return set(ProcessHeartbeat.objects.values_list("name", flat=True))


def test_a_supervisor_stopped_cleanly_removes_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor_app.management.commands import supervise

    def one_sweep_then_stopped(stop: Any, interval: float, name: str) -> int:
        run_sweep(name)  # records the row, as the loop does every interval
        assert name in names()
        return 1

    monkeypatch.setattr(supervise, "loop", one_sweep_then_stopped)
    seen(SUPERVISOR, "other:1", timedelta(seconds=1))
    call_command("supervise", "--name", "sup:1", stdout=StringIO())
    assert names() == {"other:1"}  # its own row only


@pytest.mark.django_db(transaction=True)  # the scheduler's sync closes old connections
def test_a_beat_closed_cleanly_removes_its_row() -> None:
    from supervisor_app.schedulers import SupervisedScheduler

    scheduler = SupervisedScheduler(app=current_app)
    scheduler.record_liveness()
    assert names() == {scheduler.process_name}
    scheduler.close()
    assert names() == set()


def test_the_sweep_prunes_rows_of_processes_silent_longer_than_the_retention(settings: Any) -> None:
    seen(SUPERVISOR, "killed:1", timedelta(days=2))
    seen(BEAT, "old-beat:1", timedelta(days=2))
    seen(BEAT, "recent-beat:1", timedelta(hours=1))
    report = run_sweep("sup:live")
    assert report.extra["processes_pruned"] == 2
    assert names() == {"recent-beat:1", "sup:live"}
    settings.SUPERVISOR_PROCESS_RETENTION = 60  # seconds
    assert run_sweep("sup:live").extra["processes_pruned"] == 1
    assert names() == {"sup:live"}
    assert not [p for p in check_health().supervisors if p.stale]


def test_rows_are_kept_for_ever_with_no_retention(settings: Any) -> None:
    settings.SUPERVISOR_PROCESS_RETENTION = None
    seen(BEAT, "ancient:1", timedelta(days=400))
    record_liveness(SUPERVISOR, "sup:live", {})
    assert "processes_pruned" not in run_sweep("sup:live").extra
    assert "ancient:1" in names()


# --------------------------------------------------------------------------- metrics without the extra


def test_metrics_without_prometheus_client_answer_501_and_a_check_warns(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_metrics() == []
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails, as when not installed
    response = client.get("/supervisor/metrics/")
    assert response.status_code == 501
    assert b"prometheus-client" in response.content and b"supervisor-app[metrics]" in response.content
    [warning] = check_metrics()
    assert warning.id == "supervisor_app.W020" and "/supervisor/metrics/" in warning.msg


# --------------------------------------------------------------------------- admin index


def test_the_admin_index_links_the_dashboard_for_those_who_may_see_runs(admin_client: Client) -> None:
    dashboard = reverse("admin:supervisor_app_dashboard")
    assert f'href="{dashboard}"'.encode() in admin_client.get(reverse("admin:index")).content
    user = User.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_periodictask"))
    clerk = Client()
    clerk.force_login(user)
    page = clerk.get(reverse("admin:index"))
    assert page.status_code == 200 and dashboard.encode() not in page.content
