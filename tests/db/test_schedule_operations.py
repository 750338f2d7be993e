"""Operating schedules: backfill a range of slots, run now, pause after failures (command, admin and the
receivers that count failures). Publishes are captured (``sent``), time is passed in, never slept."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from celery import current_app
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from supervisor_app import NonRetryable, broker, registry
from supervisor_app.core.states import RunStatus
from supervisor_app.models import SupervisedRun, SupervisionPolicy
from supervisor_app.scheduling import operator, pausing
from tests.conftest import deliver

pytestmark = pytest.mark.django_db

UTC = timezone.get_fixed_timezone(0)
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
CHANGELIST = "admin:django_celery_beat_periodictask_changelist"


def make_schedule(task: str = "project.tasks.noop", every: int = 10, kwargs: str = "{}", **policy: Any) -> PeriodicTask:
    registry.supervised_task_names(current_app)  # the task modules imported, so a test can run alone
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(
        name=f"s-{time.monotonic_ns()}",
        task=task,
        interval=interval,
        args="[7]" if task.endswith("noop") else "[]",
        kwargs=kwargs,
    )
    if policy:
        SupervisionPolicy.objects.create(periodic_task=pt, **policy)
    return PeriodicTask.objects.select_related("supervision", "interval").get(pk=pt.pk)


def staff(*codenames: str) -> Client:
    user = User.objects.create_user(f"u{time.monotonic_ns()}", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def post_action(client: Client, action: str, *pts: PeriodicTask, **extra: Any) -> Any:
    data = {"action": action, "index": "0", "_selected_action": [str(p.pk) for p in pts], **extra}
    return client.post(reverse(CHANGELIST), data, follow=True)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# --------------------------------------------------------------------------- backfill


def backfill_command(name: str, start: str, end: str) -> str:
    out = StringIO()
    call_command("supervisor_backfill", name, "--start", start, "--end", end, stdout=out)
    return out.getvalue()


def test_backfill_records_one_run_per_slot_both_ends_included_and_only_once(
    sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(every=10, max_attempts=7)
    start, end = T0.isoformat(), (T0 + timedelta(seconds=30)).isoformat()
    with django_capture_on_commit_callbacks(execute=True):
        out = backfill_command(pt.name, start, end)
    assert "4 slot(s)" in out and "4 recorded, 0 already recorded" in out
    rows = SupervisedRun.objects.filter(periodic_task=pt).order_by("scheduled_for")
    assert [r.scheduled_for for r in rows] == [T0 + timedelta(seconds=10 * k) for k in range(4)]
    assert {(r.status, r.max_attempts, tuple(r.args)) for r in rows} == {(RunStatus.QUEUED, 7, (7,))}
    assert sorted(run_id for run_id, _, _ in sent) == sorted(r.pk for r in rows)  # each published once

    with django_capture_on_commit_callbacks(execute=True):
        again = backfill_command(pt.name, start, end)
    assert "4 slot(s)" in again and "0 recorded, 4 already recorded" in again
    assert SupervisedRun.objects.filter(periodic_task=pt).count() == 4 and len(sent) == 4


def test_backfill_fills_only_the_gaps_left_by_the_beat(sent: list[Any]) -> None:
    pt = make_schedule(every=10)
    operator.backfill(pt, T0 + timedelta(seconds=10), T0 + timedelta(seconds=10))  # the beat's slot
    result = operator.backfill(pt, T0, T0 + timedelta(seconds=25))
    assert (result.slots, result.recorded, result.existing) == (3, 2, 1)
    assert (result.first, result.last) == (T0, T0 + timedelta(seconds=20))


def test_backfill_of_a_crontab_follows_its_time_zone(sent: list[Any]) -> None:
    registry.supervised_task_names(current_app)
    cron = CrontabSchedule.objects.create(minute="0", hour="3", timezone="Europe/Paris")
    pt = PeriodicTask.objects.create(name="nightly", task="project.tasks.noop", crontab=cron)
    result = operator.backfill(pt, datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 3, 2, 0, tzinfo=UTC))
    assert result.recorded == 3  # 02:00 UTC on the 1st, 2nd and 3rd (03:00 in Paris, winter)
    assert result.last == datetime(2030, 1, 3, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--start", "2030-01-01", "--end", "2030-01-02"], "no periodic task named"),
        (["{name}", "--start", "2030-01-02", "--end", "2030-01-01"], "before it starts"),
        (["{name}", "--start", "yesterday", "--end", "2030-01-01"], "not an ISO 8601"),
        (["{name}", "--start", "2030-01-01", "--end", "2030-12-31", "--limit", "5"], "more than 5 slots"),
    ],
)
def test_backfill_refuses_bad_input_and_records_nothing(args: list[str], message: str) -> None:
    pt = make_schedule()
    with pytest.raises(CommandError, match=message):
        call_command("supervisor_backfill", *[a.format(name=pt.name) for a in args], stdout=StringIO())
    assert not SupervisedRun.objects.exists()


def test_backfill_of_a_schedule_of_a_plain_task_is_refused() -> None:
    registry.supervised_task_names(current_app)
    interval, _ = IntervalSchedule.objects.get_or_create(every=10, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(name="plain", task="project.tasks.plain_noop", interval=interval)
    with pytest.raises(ValueError, match="not a registered SupervisedTask"):
        operator.backfill(pt, T0, T0 + timedelta(minutes=1))


def test_backfill_admin_action_asks_for_the_range_then_records(
    admin_client: Client, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(every=60)
    form = post_action(admin_client, "backfill_slots", pt)
    assert form.status_code == 200 and b'name="apply"' in form.content and pt.name.encode() in form.content
    assert not SupervisedRun.objects.exists()
    bad = post_action(admin_client, "backfill_slots", pt, apply="1", start="2030-01-01 12:10", end="2030-01-01 12:00")
    assert b"The range ends before it starts" in bad.content and not SupervisedRun.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        done = post_action(
            admin_client, "backfill_slots", pt, apply="1", start="2030-01-01 12:00", end="2030-01-01 12:05"
        )
    assert done.redirect_chain and any("6 slot(s) in the range, 6 recorded, 0 already" in m for m in messages_of(done))
    assert SupervisedRun.objects.filter(periodic_task=pt).count() == 6 and len(sent) == 6
    again = post_action(admin_client, "backfill_slots", pt, apply="1", start="2030-01-01 12:00", end="2030-01-01 12:05")
    assert any("0 recorded, 6 already recorded" in m for m in messages_of(again))


# --------------------------------------------------------------------------- run now


def test_run_now_records_an_ad_hoc_run_with_the_schedules_arguments_and_policy(
    admin_client: Client, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    pt = make_schedule(max_attempts=9, lease_timeout=timedelta(seconds=45))
    with django_capture_on_commit_callbacks(execute=True):
        response = post_action(admin_client, "run_now", pt)
    run = SupervisedRun.objects.get(periodic_task=pt)
    assert any(f"run {run.pk}" in m for m in messages_of(response))
    assert (run.task_name, run.args, run.scheduled_for, run.status) == ("project.tasks.noop", [7], None, "queued")
    assert (run.max_attempts, run.lease_timeout) == (9, timedelta(seconds=45))
    assert sent == [(run.pk, 1, "project.tasks.noop")]
    # In the schedule's history, and a second run now is a second run (it takes no slot).
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_change", args=[pt.pk]))
    assert reverse("admin:supervisor_app_supervisedrun_change", args=[run.pk]).encode() in page.content
    with django_capture_on_commit_callbacks(execute=True):
        post_action(admin_client, "run_now", pt)
    assert SupervisedRun.objects.filter(periodic_task=pt).count() == 2 and len(sent) == 2


def test_schedule_actions_need_the_change_permission(sent: list[Any]) -> None:
    pt = make_schedule()
    viewer = staff("view_periodictask")
    changelist = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "run_now" not in changelist and "backfill_slots" not in changelist and "enable_tasks" not in changelist
    for action in ("run_now", "backfill_slots", "enable_tasks"):
        post_action(viewer, action, pt, apply="1", start="2030-01-01 12:00", end="2030-01-01 12:05")
    assert not SupervisedRun.objects.exists()
    editor = staff("view_periodictask", "change_periodictask")
    changelist = editor.get(reverse(CHANGELIST)).content.decode()
    assert "run_now" in changelist and "backfill_slots" in changelist


# --------------------------------------------------------------------------- pause after failures


def run_attempt(task: Any, run_id: int, *args: Any) -> None:
    """Execute the first attempt of a run in this process, as a worker would on its message."""
    headers = {broker.HEADER_RUN: run_id, broker.HEADER_ATTEMPT: 1}
    deliver(task, f"{run_id}.1", *args, **headers)


def fail_once(pt: PeriodicTask, capture: Any) -> SupervisedRun:
    """Run the schedule now, and its worker fails the run (a non-retryable error)."""
    from project.tasks import flaky

    with capture(execute=True):
        run = operator.run_now(pt)
        with pytest.raises(NonRetryable):
            run_attempt(flaky, run.pk, "fatal")
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    return run


def test_a_schedule_is_paused_after_n_consecutive_failures_with_one_alert(
    sent: list[Any], django_capture_on_commit_callbacks: Any, mailoutbox: list[Any], admin_client: Client
) -> None:
    pt = make_schedule(
        task="project.tasks.flaky", kwargs='{"mode": "fatal"}', pause_after_failures=3, alert_recipients="ops@x.org"
    )
    for _ in range(2):
        fail_once(pt, django_capture_on_commit_callbacks)
    assert PeriodicTask.objects.get(pk=pt.pk).enabled
    last = fail_once(pt, django_capture_on_commit_callbacks)
    pt.refresh_from_db()
    policy = SupervisionPolicy.objects.get(periodic_task=pt)
    assert not pt.enabled and policy.paused_at is not None and "3 consecutive failed" in policy.paused_reason
    paused = [m for m in mailoutbox if "paused" in m.subject]
    assert len(paused) == 1 and str(last.pk) in paused[0].body and "Enable it again" in paused[0].body
    # A further failure (a run now while paused) alerts its failure, never a second pause.
    fail_once(pt, django_capture_on_commit_callbacks)
    assert len([m for m in mailoutbox if "paused" in m.subject]) == 1
    # The pause is visible in the list and on the schedule's page.
    assert "paused " in admin_client.get(reverse(CHANGELIST)).content.decode()
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_change", args=[pt.pk]))
    assert any("Enable it to resume" in m for m in messages_of(page))

    # Enabled again in the admin: the count starts from zero, two failures do not pause it.
    response = post_action(admin_client, "enable_tasks", pt)
    assert response.status_code == 200
    pt.refresh_from_db()
    policy.refresh_from_db()
    assert pt.enabled and policy.paused_at is None and policy.failures_counted_from is not None
    for _ in range(2):
        fail_once(pt, django_capture_on_commit_callbacks)
    assert PeriodicTask.objects.get(pk=pt.pk).enabled
    fail_once(pt, django_capture_on_commit_callbacks)
    assert not PeriodicTask.objects.get(pk=pt.pk).enabled


def make_run(pt: PeriodicTask, status: str, slot: int | None, created: int = 0) -> SupervisedRun:
    """A finished run of the schedule: slot ``slot`` (minutes after an hour ago), or a run now recorded
    ``created`` minutes after an hour ago."""
    base = timezone.now() - timedelta(hours=1)
    run = SupervisedRun.objects.create(
        task_name=pt.task,
        periodic_task=pt,
        scheduled_for=None if slot is None else base + timedelta(minutes=slot),
        status=status,
        lease_timeout=timedelta(seconds=60),
        start_timeout=timedelta(seconds=60),
    )
    recorded = base + timedelta(minutes=created if slot is None else slot)
    SupervisedRun.objects.filter(pk=run.pk).update(created_at=recorded)
    run.refresh_from_db()
    return run


def test_a_success_breaks_the_streak_and_skipped_or_missed_runs_do_not_count() -> None:
    pt = make_schedule(pause_after_failures=3)
    make_run(pt, RunStatus.FAILED, 1)
    make_run(pt, RunStatus.SUCCEEDED, 2)
    make_run(pt, RunStatus.DEAD, 3)
    make_run(pt, RunStatus.SKIPPED, 4)
    make_run(pt, RunStatus.MISSED, 5)
    last = make_run(pt, RunStatus.FAILED, 6)
    assert pausing.check_after_failure(last) is False  # failed, dead, then the success
    adhoc = make_run(pt, RunStatus.DEAD, None, created=7)  # a run now, after the slot runs
    assert [r.pk for r in pausing.latest_outcomes(pt.pk, 3)] == [adhoc.pk, last.pk, last.pk - 3]
    assert pausing.check_after_failure(adhoc) is True
    assert pausing.check_after_failure(adhoc) is False  # paused once: the second caller does nothing


def test_a_schedule_disabled_by_hand_or_without_a_threshold_is_left_alone(settings: Any) -> None:
    pt = make_schedule()
    runs = [make_run(pt, RunStatus.FAILED, k) for k in range(5)]
    assert pausing.check_after_failure(runs[-1]) is False  # no policy, no setting: never
    settings.SUPERVISOR_PAUSE_AFTER_FAILURES = 5
    PeriodicTask.objects.filter(pk=pt.pk).update(enabled=False)
    assert pausing.check_after_failure(runs[-1]) is False
    PeriodicTask.objects.filter(pk=pt.pk).update(enabled=True)
    assert pausing.check_after_failure(runs[-1]) is True  # the setting, with a policy row created for the pause
    assert SupervisionPolicy.objects.get(periodic_task=pt).paused_at is not None


def test_saving_the_schedule_enabled_in_its_form_resumes_it(rf: Any, admin_user: Any) -> None:
    from django.contrib import admin

    pt = make_schedule(pause_after_failures=2)
    runs = [make_run(pt, RunStatus.FAILED, k) for k in range(2)]
    assert pausing.check_after_failure(runs[-1]) is True
    pt.refresh_from_db()
    model_admin = admin.site._registry[PeriodicTask]
    request = rf.post("/")
    request.user = admin_user
    pt.enabled = True

    class Form:
        changed_data = ["enabled"]

    model_admin.save_model(request, pt, Form(), True)
    policy = SupervisionPolicy.objects.get(periodic_task=pt)
    assert policy.paused_at is None and policy.failures_counted_from is not None
    assert pausing.latest_outcomes(pt.pk, 2, policy.failures_counted_from) == []
