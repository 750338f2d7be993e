"""The admin: runs list and detail, actions and their permissions, the dashboard, schedules.

Django's test client; portable (PostgreSQL and SQLite). The browser tests are in test_admin_browser.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from supervisor_app import admin as sv_admin
from supervisor_app import runs
from supervisor_app.core.states import AttemptOutcome, RunStatus
from supervisor_app.models import ProcessHeartbeat, RunAttempt, SupervisedRun

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:supervisor_app_supervisedrun_changelist"
DASHBOARD = "admin:supervisor_app_dashboard"


def make_run(status: str = RunStatus.SUCCEEDED, task_name: str = "project.tasks.noop", **fields: Any) -> SupervisedRun:
    now = timezone.now()
    values: dict[str, Any] = dict(
        task_name=task_name,
        status=status,
        lease_timeout=timedelta(seconds=60),
        start_timeout=timedelta(seconds=60),
        worker="celery@host-a",
        started_at=now - timedelta(seconds=12),
        heartbeat_at=now - timedelta(seconds=4),
    )
    if status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DEAD, RunStatus.CANCELLED):
        values["finished_at"] = now - timedelta(seconds=2)
    if status == RunStatus.RUNNING:
        values["lease_expires_at"] = now + timedelta(seconds=50)
    values.update(fields)
    return SupervisedRun.objects.create(**values)


def schedule(name: str = "every minute") -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name=name, task="project.tasks.noop", interval=interval)


def staff(username: str, *codenames: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    perms = Permission.objects.filter(content_type__app_label="supervisor_app", codename__in=codenames)
    assert perms.count() == len(codenames)
    user.user_permissions.add(*perms)
    client = Client()
    client.force_login(user)
    return client


def post_action(client: Client, action: str, *runs: SupervisedRun, **extra: str) -> Any:
    data = {"action": action, "index": "0", "_selected_action": [str(r.pk) for r in runs], **extra}
    return client.post(reverse(CHANGELIST), data, follow=True)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# --------------------------------------------------------------------------- list and detail


def test_changelist_shows_badge_attempts_heartbeat_and_schedule(admin_client: Client) -> None:
    task = schedule("nightly report")
    make_run(RunStatus.RUNNING, periodic_task=task, scheduled_for=timezone.now(), attempt=2, max_attempts=5)
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'class="sv-badge sv-running"' in html
    assert "2 / 5" in html
    assert "nightly report" in html
    assert "s ago" in html  # heartbeat age
    assert "celery@host-a" in html
    assert reverse(DASHBOARD) in html


def test_changelist_marks_expired_lease(admin_client: Client) -> None:
    make_run(RunStatus.RUNNING, lease_expires_at=timezone.now() - timedelta(seconds=30))
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'class="sv-stale"' in html


def test_detail_shows_attempts_error_traceback_progress_and_checkpoint(admin_client: Client) -> None:
    run = make_run(
        RunStatus.RETRYING,
        attempt=2,
        progress={"step": 3, "of": 10},
        checkpoint={"cursor": "abc<&>"},
        last_error="ValueError: boom",
    )
    RunAttempt.objects.create(
        run=run,
        number=1,
        outcome=AttemptOutcome.LOST,
        worker="celery@gone",
        error="attempt 1 lost: lease expired",
    )
    RunAttempt.objects.create(
        run=run,
        number=2,
        outcome=AttemptOutcome.FAILED,
        error="ValueError: boom",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom',
    )
    response = admin_client.get(reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "celery@gone" in html and "attempt 1 lost: lease expired" in html
    assert "Traceback (most recent call last):" in html
    assert 'class="sv-badge sv-lost"' in html and 'class="sv-badge sv-failed"' in html
    assert "&quot;step&quot;: 3" in html  # pretty-printed JSON, escaped
    assert "abc&lt;&amp;&gt;" in html
    # Read-only: no save buttons, no editable inputs for the run.
    assert 'name="_save"' not in html
    assert 'name="status"' not in html
    # A superuser gets the action buttons.
    for name in ("retry_now", "cancel", "mark_resolved"):
        assert f'id="sv-action-{name}"' in html


def test_nobody_adds_edits_or_deletes_runs(admin_client: Client) -> None:
    run = make_run(RunStatus.FAILED)
    assert admin_client.get(reverse("admin:supervisor_app_supervisedrun_add")).status_code == 403
    assert admin_client.post(reverse("admin:supervisor_app_supervisedrun_delete", args=[run.pk])).status_code == 403
    admin_client.post(reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk]), {"status": "succeeded"})
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "delete_selected" not in html


# --------------------------------------------------------------------------- filters and search


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status__exact": "failed"}, {"failed"}),
        ({"task_name": "project.tasks.slow_job"}, {"slow"}),
        ({"attention": "stale"}, {"stale"}),
        ({"attention": "incidents"}, {"failed", "dead"}),
        ({"attention": "recovered"}, {"recovered"}),
        ({"q": "project.tasks.slow"}, {"slow"}),
        ({"q": "host-z"}, {"stale"}),
    ],
)
def test_filters_and_search(admin_client: Client, query: dict[str, str], expected: set[str]) -> None:
    made = {
        "ok": make_run(RunStatus.SUCCEEDED),
        "failed": make_run(RunStatus.FAILED),
        "dead": make_run(RunStatus.DEAD),
        "resolved": make_run(RunStatus.DEAD),
        "slow": make_run(RunStatus.SUCCEEDED, task_name="project.tasks.slow_job"),
        "stale": make_run(RunStatus.RUNNING, worker="celery@host-z", lease_expires_at=timezone.now() - timedelta(1)),
        "recovered": make_run(RunStatus.SUCCEEDED, attempt=2),
    }
    assert runs.mark_resolved(made["resolved"].pk, by="ops")
    RunAttempt.objects.create(
        run=made["recovered"], number=1, outcome=AttemptOutcome.LOST, ended_at=timezone.now() - timedelta(hours=1)
    )
    response = admin_client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200
    shown = {run.pk for run in response.context["cl"].result_list}
    assert shown == {made[name].pk for name in expected}


def test_filter_by_schedule_and_date_and_search_by_id(admin_client: Client) -> None:
    task = schedule()
    mine = make_run(periodic_task=task, scheduled_for=timezone.now())
    old = make_run()
    SupervisedRun.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    other = make_run()

    def shown(**query: Any) -> set[int]:
        response = admin_client.get(reverse(CHANGELIST), query)
        assert response.status_code == 200, response
        return {run.pk for run in response.context["cl"].result_list}

    assert shown(periodic_task__id__exact=task.pk) == {mine.pk}
    since = (timezone.now() - timedelta(days=7)).isoformat()
    assert shown(created_at__gte=since) == {mine.pk, other.pk}
    assert shown(q=str(old.pk)) == {old.pk}


def test_count_is_capped(admin_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sv_admin.runs, "COUNT_CAP", 3)
    for _ in range(5):
        make_run()
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "more than 3" in html


# --------------------------------------------------------------------------- actions


def test_retry_now_starts_a_new_attempt(admin_client: Client) -> None:
    failed = make_run(RunStatus.FAILED, max_attempts=1)
    running = make_run(RunStatus.RUNNING)
    response = post_action(admin_client, "retry_now", failed, running)
    assert response.status_code == 200
    failed.refresh_from_db()
    running.refresh_from_db()
    assert (failed.status, failed.attempt) == (RunStatus.QUEUED, 2)
    assert RunAttempt.objects.filter(run=failed, number=2, outcome=AttemptOutcome.PENDING).exists()
    assert (running.status, running.attempt) == (RunStatus.RUNNING, 1)
    assert messages_of(response) == [
        "1 run was queued for a new attempt.",
        "1 run was not retried: it is running (cancel it first).",
    ]


def test_cancel_is_immediate_for_queued_and_cooperative_for_running(admin_client: Client) -> None:
    queued = make_run(RunStatus.QUEUED)
    running = make_run(RunStatus.RUNNING)
    done = make_run(RunStatus.SUCCEEDED)
    response = post_action(admin_client, "cancel", queued, running, done)
    for run in (queued, running, done):
        run.refresh_from_db()
    assert queued.status == RunStatus.CANCELLED
    # The agent sees the request at its next heartbeat and stops; the run stays running until then.
    assert (running.status, running.cancel_requested) == (RunStatus.RUNNING, True)
    assert runs.heartbeat(running.pk, running.attempt).cancel_requested
    assert done.status == RunStatus.SUCCEEDED
    assert messages_of(response) == [
        "1 run was cancelled.",
        "Cancellation was requested for 1 running run: its worker stops it in one renewal.",
        "1 run was not cancelled: it has already finished.",
    ]


def test_mark_resolved(admin_client: Client) -> None:
    dead = make_run(RunStatus.DEAD)
    missed = make_run(RunStatus.MISSED)
    ok = make_run(RunStatus.SUCCEEDED)
    response = post_action(admin_client, "mark_resolved", dead, missed, ok)
    assert messages_of(response) == [
        "2 runs were marked resolved.",
        "1 run was not marked resolved: only open failed, dead or missed runs can be.",
    ]
    dead.refresh_from_db()
    assert dead.status == RunStatus.DEAD  # the status keeps saying what happened
    assert dead.resolved_at is not None and dead.resolved_by == "admin"
    ok.refresh_from_db()
    assert ok.resolved_at is None
    # Resolving twice is refused: nothing is open any more.
    assert not runs.mark_resolved(dead.pk)


def test_resolved_run_that_fails_again_is_an_open_incident() -> None:
    run = make_run(RunStatus.FAILED)
    assert runs.mark_resolved(run.pk, by="ops")
    from supervisor_app.ops import dashboard

    assert not dashboard.open_incidents().filter(pk=run.pk).exists()
    # Retried by an operator and failed again later: it finishes after the resolution.
    SupervisedRun.objects.filter(pk=run.pk).update(finished_at=timezone.now() + timedelta(seconds=5))
    assert dashboard.open_incidents().filter(pk=run.pk).exists()
    assert runs.mark_resolved(run.pk)


def test_action_from_the_detail_page_returns_to_it(admin_client: Client) -> None:
    run = make_run(RunStatus.DEAD)
    response = post_action(admin_client, "retry_now", run, _from_detail="1")
    change_url = reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])
    assert response.redirect_chain[-1][0] == change_url
    assert "1 run was queued for a new attempt." in messages_of(response)


# --------------------------------------------------------------------------- permissions


def test_view_only_staff_sees_runs_but_no_actions(client: Client) -> None:
    viewer = staff("viewer", "view_supervisedrun")
    run = make_run(RunStatus.FAILED)
    response = viewer.get(reverse(CHANGELIST))
    assert response.status_code == 200
    html = response.content.decode()
    assert str(run.task_name) in html
    assert 'name="action"' not in html  # no action dropdown, no checkboxes
    assert "_selected_action" not in html
    detail = viewer.get(reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])).content.decode()
    assert "sv-action-" not in detail
    assert "sv-badge sv-failed" in detail  # attempts and fields still visible
    assert viewer.get(reverse(DASHBOARD)).status_code == 200


@pytest.mark.parametrize("action", ["retry_now", "cancel", "mark_resolved"])
def test_posting_an_action_without_its_permission_changes_nothing(action: str) -> None:
    viewer = staff("viewer", "view_supervisedrun")
    run = make_run(RunStatus.FAILED)
    queued = make_run(RunStatus.QUEUED)
    before = list(SupervisedRun.objects.order_by("pk").values())
    response = post_action(viewer, action, run, queued)
    assert response.status_code == 200
    assert list(SupervisedRun.objects.order_by("pk").values()) == before
    assert not RunAttempt.objects.exists()
    assert not any("run" in m and "was" in m for m in messages_of(response))


def test_each_action_needs_its_own_permission() -> None:
    retrier = staff("retrier", "view_supervisedrun", "retry_run")
    html = retrier.get(reverse(CHANGELIST)).content.decode()
    assert 'value="retry_now"' in html
    assert 'value="cancel"' not in html and 'value="mark_resolved"' not in html
    queued = make_run(RunStatus.QUEUED)
    failed = make_run(RunStatus.FAILED)
    post_action(retrier, "cancel", queued)
    post_action(retrier, "mark_resolved", failed)
    queued.refresh_from_db()
    failed.refresh_from_db()
    assert queued.status == RunStatus.QUEUED and failed.resolved_at is None
    post_action(retrier, "retry_now", failed)
    failed.refresh_from_db()
    assert failed.status == RunStatus.QUEUED


def test_staff_without_view_permission_is_refused() -> None:
    nobody = staff("nobody")
    assert nobody.get(reverse(CHANGELIST)).status_code == 403
    assert nobody.get(reverse(DASHBOARD)).status_code == 403


def test_anonymous_is_sent_to_login(client: Client) -> None:
    response = client.get(reverse(DASHBOARD))
    assert response.status_code == 302 and "/login/" in response["Location"]


# --------------------------------------------------------------------------- dashboard


def test_dashboard(admin_client: Client, settings: Any) -> None:
    settings.SUPERVISOR_STALE_AFTER = 30
    now = timezone.now()
    make_run(RunStatus.SUCCEEDED)
    make_run(RunStatus.FAILED)
    make_run(RunStatus.MISSED)
    stale = make_run(RunStatus.RUNNING, lease_expires_at=now - timedelta(minutes=5))
    recovered = make_run(RunStatus.SUCCEEDED, attempt=2)
    RunAttempt.objects.create(run=recovered, number=1, outcome=AttemptOutcome.LOST, ended_at=now)
    ProcessHeartbeat.objects.create(kind="supervisor", name="host:1", started_at=now, last_seen=now)
    ProcessHeartbeat.objects.create(
        kind="beat", name="host:2", started_at=now - timedelta(hours=1), last_seen=now - timedelta(minutes=10)
    )
    url = reverse(DASHBOARD)
    assert "supervisor_app" in url or "supervisedrun" in url
    response = admin_client.get(url)
    assert response.status_code == 200
    ctx = response.context
    assert ctx["stale_count"] == 1 and [r.pk for r in ctx["stale"]] == [stale.pk]
    assert ctx["recovered_total"] == 1 and ctx["recovered_lost"] == 1
    assert ctx["missed"] == 1
    assert ctx["incidents"] == 2
    assert ctx["recent_total"] == 5
    alive = {p.name: not p.stale for p in ctx["processes"]}
    assert alive == {"host:1": True, "host:2": False}
    html = response.content.decode()
    assert "<svg" in html and "<rect" in html
    assert "?attention=stale" in html and "?attention=incidents" in html
    assert f'href="{reverse("admin:supervisor_app_supervisedrun_change", args=[stale.pk])}"' in html
    # The links into the changelist are accepted by its filters.
    for key in ("stale_url", "incidents_url", "recovered_url", "missed_url", "recent_url"):
        assert admin_client.get(ctx[key]).status_code == 200, key
    assert admin_client.get(ctx["chart"][-1]["url"]).status_code == 200


def test_dashboard_without_any_process_says_so(admin_client: Client) -> None:
    html = admin_client.get(reverse(DASHBOARD)).content.decode()
    assert "No beat or supervisor has ever reported" in html


def test_heartbeat_admin_is_read_only(admin_client: Client) -> None:
    now = timezone.now()
    beat = ProcessHeartbeat.objects.create(kind="beat", name="host:9", started_at=now, last_seen=now, stats={"sent": 3})
    assert admin_client.get(reverse("admin:supervisor_app_processheartbeat_changelist")).status_code == 200
    html = admin_client.get(reverse("admin:supervisor_app_processheartbeat_change", args=[beat.pk])).content.decode()
    assert "&quot;sent&quot;: 3" in html and 'name="_save"' not in html


# --------------------------------------------------------------------------- query counts


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def _populate(n: int) -> None:
    # More schedules too: the schedule filter must not cost a query per schedule either.
    tasks = [schedule(f"schedule {n}-{i}") for i in range(3 if n < 10 else 30)]
    now = timezone.now()
    for i in range(n):
        status = [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.RUNNING, RunStatus.RETRYING, RunStatus.MISSED][i % 5]
        run = make_run(status, periodic_task=tasks[i % len(tasks)], scheduled_for=now - timedelta(minutes=i, seconds=n))
        RunAttempt.objects.create(run=run, number=1, outcome=AttemptOutcome.LOST, ended_at=now)


@pytest.mark.parametrize(
    "url",
    ["changelist", "changelist-filtered", "dashboard", "detail"],
)
def test_query_count_does_not_grow_with_rows(admin_client: Client, url: str) -> None:
    def target() -> str:
        if url == "changelist":
            return reverse(CHANGELIST)
        if url == "changelist-filtered":
            return reverse(CHANGELIST) + "?status__exact=failed&attention=incidents&task_name=project.tasks.noop"
        if url == "dashboard":
            return reverse(DASHBOARD)
        run = SupervisedRun.objects.order_by("pk").first()
        assert run is not None
        return reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])

    _populate(5)
    admin_client.get(target())  # warm the per-process caches (content types), which cost a query once
    few = _queries(admin_client, target())
    _populate(45)  # 50 runs
    many = _queries(admin_client, target())
    assert many == few, (url, few, many)
    assert many <= 12, (url, many)


# --------------------------------------------------------------------------- schedules


def test_schedule_page_shows_recent_runs_and_policy_inline(admin_client: Client) -> None:
    task = schedule()
    now = timezone.now()
    for i in range(25):
        make_run(periodic_task=task, scheduled_for=now - timedelta(minutes=i))
    response = admin_client.get(reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "recent runs (latest 20)" in html.lower()
    assert html.count('class="sv-badge sv-succeeded"') == 20
    assert 'id="supervision-group"' in html


def test_schedule_changelist_still_works(admin_client: Client) -> None:
    schedule()
    assert admin_client.get(reverse("admin:django_celery_beat_periodictask_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:django_celery_beat_periodictask_add")).status_code == 200


def test_a_run_waiting_for_a_concurrency_slot_shows_its_key_and_limit(admin_client: Client) -> None:
    run = make_run(RunStatus.WAITING)
    SupervisedRun.objects.filter(pk=run.pk).update(concurrency_key="project.tasks.limited_job", concurrency_limit=2)
    html = admin_client.get(reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk])).content.decode()
    assert "project.tasks.limited_job" in html and "limit: 2; waiting for a slot" in html
    listing = admin_client.get(reverse("admin:supervisor_app_supervisedrun_changelist") + "?status=waiting")
    assert listing.status_code == 200 and "waiting for a slot" in listing.content.decode()
