"""Health URL, metrics URL, supervisor_status and prune_runs."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db.models import F
from django.test import Client

from supervisor_app import runs
from supervisor_app.core.retry import FailureDecision
from supervisor_app.core.states import RunStatus
from supervisor_app.models import ProcessHeartbeat, RunAttempt, SupervisedRun
from supervisor_app.supervisor import run_sweep

pytestmark = pytest.mark.django_db

POLICY = runs.RunPolicy(max_attempts=3, lease_timeout=30, start_timeout=30, max_runtime=None)


def new_run(**kw: Any) -> SupervisedRun:
    run = runs.create_run("project.tasks.noop", [], {}, POLICY, countdown=3600, **kw)
    assert run is not None
    return run


def age_supervisors(seconds: float) -> None:
    ProcessHeartbeat.objects.update(last_seen=F("last_seen") - timedelta(seconds=seconds))


def test_health_is_503_until_a_supervisor_has_run(client: Client, settings: Any) -> None:
    settings.SUPERVISOR_REQUIRE_BEAT = False
    response = client.get("/supervisor/health/")
    assert response.status_code == 503
    assert "no supervisor has ever run" in response.json()["problems"][0]
    run_sweep("sup-1")
    response = client.get("/supervisor/health/")
    assert response.status_code == 200 and response.json()["ok"] is True


def test_health_reports_a_stale_supervisor_and_stuck_runs(client: Client, settings: Any) -> None:
    settings.SUPERVISOR_REQUIRE_BEAT = False
    settings.SUPERVISOR_STALE_AFTER = 60
    run_sweep("sup-1")
    age_supervisors(120)
    body = client.get("/supervisor/health/").json()
    assert any("supervisor stale" in p for p in body["problems"])
    run = new_run()
    SupervisedRun.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED)
    runs.claim(run.pk, 1, "ghost")
    SupervisedRun.objects.filter(pk=run.pk).update(lease_expires_at=F("lease_expires_at") - timedelta(hours=1))
    body = client.get("/supervisor/health/").json()
    assert body["stuck_running"] == 1
    assert any("lease expired" in p for p in body["problems"])


def test_health_requires_beat_when_periodic_tasks_are_enabled(client: Client) -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    run_sweep("sup-1")
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="p", task="project.tasks.noop", interval=every)
    response = client.get("/supervisor/health/")
    assert response.status_code == 503
    assert "no beat has ever run" in " ".join(response.json()["problems"])


def test_metrics_names_and_values(client: Client, settings: Any) -> None:
    pytest.importorskip("prometheus_client")
    settings.SUPERVISOR_REQUIRE_BEAT = False
    new_run()
    run_sweep("sup-1")
    text = client.get("/supervisor/metrics/").content.decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert names and all(name.startswith("supervisor_") for name in names)
    assert 'supervisor_runs_active{status="queued"} 1.0' in text
    assert "supervisor_detection_latency_seconds_bucket" in text
    assert 'supervisor_sweep_duration_seconds{name="sup-1"}' in text


def test_metrics_can_be_restricted_by_a_token(client: Client, settings: Any) -> None:
    pytest.importorskip("prometheus_client")
    settings.SUPERVISOR_METRICS_TOKEN = "s3cret"
    assert client.get("/supervisor/metrics/").status_code == 403
    assert client.get("/supervisor/metrics/", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/supervisor/metrics/", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200
    # Anonymous probes still get the verdict, without process names.
    assert set(client.get("/supervisor/health/").json()) == {"ok", "problems"}


def test_supervisor_status_exit_code(settings: Any) -> None:
    settings.SUPERVISOR_REQUIRE_BEAT = False
    out = StringIO()
    with pytest.raises(SystemExit) as exc:
        call_command("supervisor_status", stdout=out)
    assert exc.value.code == 1 and "no supervisor has ever run" in out.getvalue()
    run_sweep("sup-1")
    out = StringIO()
    call_command("supervisor_status", stdout=out)  # no SystemExit: healthy
    assert "OK" in out.getvalue() and "sup-1" in out.getvalue()


def test_prune_runs_deletes_old_terminal_runs_and_keeps_the_last_per_schedule() -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    schedule = PeriodicTask.objects.create(name="p", task="project.tasks.noop", interval=every)
    old_adhoc = [new_run() for _ in range(5)]
    old_scheduled = [
        new_run(periodic_task_id=schedule.pk, scheduled_for=f"2026-01-0{i + 1}T00:00:00Z") for i in range(4)
    ]
    active = new_run()
    for run in old_adhoc + old_scheduled:
        SupervisedRun.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED)
        runs.claim(run.pk, 1, "w")
        runs.finish_failure(run.pk, 1, FailureDecision(RunStatus.FAILED, None), "x", "")
    SupervisedRun.objects.exclude(pk=active.pk).update(finished_at=F("finished_at") - timedelta(days=40))
    out = StringIO()
    call_command("prune_runs", "--older-than", "30d", "--keep-last", "2", "--dry-run", stdout=out)
    assert "would delete 7" in out.getvalue()
    call_command("prune_runs", "--older-than", "30d", "--keep-last", "2", "--batch-size", "3", stdout=out)
    remaining = set(SupervisedRun.objects.values_list("pk", flat=True))
    assert remaining == {active.pk, old_scheduled[-1].pk, old_scheduled[-2].pk}
    assert not RunAttempt.objects.exclude(run_id__in=remaining).exists()


def test_prune_runs_rejects_a_bad_age() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="30d"):
        call_command("prune_runs", "--older-than", "a month")
