"""The admin in a real browser: Playwright driving Debian's Chromium against a live server on PostgreSQL.

Screenshots go to test-artifacts/screenshots/; the dashboard's and a run's page are also copied to
docs/img/ for the README. Chromium is installed with apt-get when missing; the tests skip (saying
why) only when that is impossible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from supervisor_app.core.states import AttemptOutcome, RunStatus
from supervisor_app.models import ProcessHeartbeat, RunAttempt, SupervisedRun

pytestmark = [pytest.mark.postgres]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parent.parent.parent
SHOTS = ROOT / "test-artifacts" / "screenshots"
DOCS_IMG = ROOT / "docs" / "img"


def _install_chromium() -> str | None:
    """Install Debian's chromium package; returns why it failed, or None."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for cmd in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if done.returncode != 0:
            return f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        why = _install_chromium()
        if not os.path.exists(CHROMIUM):
            pytest.skip(f"Chromium is missing at {CHROMIUM} and could not be installed: {why}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium: str, django_db_setup: None, django_db_blocker: Any) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements.txt (playwright)")
    # Playwright's sync API keeps an event loop running in this thread for as long as the browser
    # lives; the ORM calls the tests (and pytest-django's flushes) make meanwhile are ordinary
    # blocking calls, so Django's async-safety guard is lifted until the browser is closed.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Any, live_server: Any, sent: list[Any]) -> Iterator[Any]:
    # ``sent`` captures publishes (retry now) instead of sending them to the broker.
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, base_url=live_server.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def shot(page: Any, name: str, docs: bool = False) -> None:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    # The README's pictures are refreshed on request only, so a test run leaves the checkout clean.
    if docs and os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / f"{name}.png")


def login(page: Any, username: str, password: str = "pw") -> None:
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")


def make_run(status: str, task_name: str = "project.tasks.slow_job", **fields: Any) -> SupervisedRun:
    values: dict[str, Any] = dict(
        task_name=task_name,
        status=status,
        lease_timeout=timedelta(seconds=60),
        start_timeout=timedelta(seconds=60),
    )
    values.update(fields)
    return SupervisedRun.objects.create(**values)


def scene() -> dict[str, Any]:
    """A day of a small installation: two schedules, runs of every kind, a lost attempt, processes."""
    now = timezone.now()
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.MINUTES)
    report = PeriodicTask.objects.create(name="nightly report", task="project.tasks.slow_job", interval=every)
    sync = PeriodicTask.objects.create(name="sync invoices", task="project.tasks.noop", interval=every)
    statuses = [RunStatus.SUCCEEDED] * 7 + [RunStatus.FAILED, RunStatus.SKIPPED, RunStatus.MISSED]
    for i in range(96):
        status = statuses[i % len(statuses)] if i > 2 else RunStatus.SUCCEEDED
        slot = now - timedelta(minutes=15 * i)
        run = make_run(
            status,
            task_name=["project.tasks.slow_job", "project.tasks.noop"][i % 2],
            periodic_task=[report, sync][i % 2],
            scheduled_for=slot,
            worker=f"celery@worker-{i % 3}",
            started_at=slot + timedelta(seconds=1),
            heartbeat_at=slot + timedelta(seconds=30),
            finished_at=slot + timedelta(seconds=40 + i % 50),
            last_error="ConnectionError: upstream timed out" if status == RunStatus.FAILED else "",
        )
        SupervisedRun.objects.filter(pk=run.pk).update(created_at=slot)
    failed = make_run(
        RunStatus.DEAD,
        periodic_task=report,
        scheduled_for=now - timedelta(minutes=7),
        attempt=2,
        max_attempts=2,
        worker="celery@worker-1",
        started_at=now - timedelta(minutes=5),
        heartbeat_at=now - timedelta(minutes=4),
        finished_at=now - timedelta(minutes=3),
        progress={"step": 3, "of": 10, "pid": 4242},
        checkpoint=3,
        kwargs={"steps": 10, "label": "nightly"},
        last_error="ValueError: invoice 1017 has no customer",
    )
    RunAttempt.objects.create(
        run=failed,
        number=1,
        outcome=AttemptOutcome.LOST,
        worker="celery@worker-0",
        started_at=now - timedelta(minutes=7),
        ended_at=now - timedelta(minutes=6),
        error="attempt 1 lost: lease expired (worker celery@worker-0)",
    )
    RunAttempt.objects.create(
        run=failed,
        number=2,
        outcome=AttemptOutcome.FAILED,
        worker="celery@worker-1",
        started_at=now - timedelta(minutes=5),
        ended_at=now - timedelta(minutes=3),
        error="ValueError: invoice 1017 has no customer",
        traceback=(
            "Traceback (most recent call last):\n"
            '  File "project/tasks.py", line 42, in slow_job\n'
            "    bill(invoice)\n"
            "ValueError: invoice 1017 has no customer"
        ),
    )
    running = make_run(
        RunStatus.RUNNING,
        worker="celery@worker-2",
        started_at=now - timedelta(seconds=40),
        heartbeat_at=now - timedelta(seconds=4),
        lease_expires_at=now + timedelta(seconds=56),
        progress={"step": 2, "of": 5},
    )
    queued = make_run(RunStatus.QUEUED, task_name="project.tasks.noop")
    stale = make_run(
        RunStatus.RUNNING,
        task_name="project.tasks.noop",
        worker="celery@worker-9",
        started_at=now - timedelta(minutes=3),
        heartbeat_at=now - timedelta(minutes=2),
        lease_expires_at=now - timedelta(minutes=1),
    )
    ProcessHeartbeat.objects.create(
        kind="supervisor", name="ops-1:311", started_at=now - timedelta(hours=5), last_seen=now
    )
    ProcessHeartbeat.objects.create(kind="beat", name="ops-1:298", started_at=now - timedelta(hours=5), last_seen=now)
    ProcessHeartbeat.objects.create(
        kind="supervisor", name="ops-2:77", started_at=now - timedelta(days=1), last_seen=now - timedelta(hours=3)
    )
    return {"report": report, "failed": failed, "running": running, "queued": queued, "stale": stale}


def test_operator_retries_and_cancels_runs_and_reads_the_dashboard(page: Any, sent: list[Any]) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "pw")
    data = scene()
    failed, running, queued = data["failed"], data["running"], data["queued"]
    login(page, "ops")

    page.goto("/admin/supervisor_app/supervisedrun/")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list .sv-badge").count() >= 50
    shot(page, "runs-list")

    # A dead run: its attempts, error, traceback, progress and checkpoint.
    page.goto(f"/admin/supervisor_app/supervisedrun/{failed.pk}/change/")
    page.wait_for_selector("#attempts-group")
    assert "attempt 1 lost: lease expired" in page.inner_text("#attempts-group")
    page.click(".sv-traceback summary")
    assert page.locator(".sv-traceback pre").is_visible()
    assert "invoice 1017" in page.inner_text(".sv-traceback pre")
    assert '"step": 3' in page.inner_text(".field-progress_pretty")
    shot(page, "run-detail", docs=True)

    # Retry it from its page: a third attempt is queued.
    page.click("#sv-action-retry_now")
    page.wait_for_selector(".messagelist")
    assert "1 run was queued for a new attempt." in page.inner_text(".messagelist")
    failed.refresh_from_db()
    assert (failed.status, failed.attempt) == (RunStatus.QUEUED, 3)
    assert page.locator("#attempts-group .sv-badge.sv-pending").count() == 1
    shot(page, "run-retried")

    # Cancel the running one: cooperative, the worker stops at its next heartbeat.
    page.goto(f"/admin/supervisor_app/supervisedrun/{running.pk}/change/")
    page.click("#sv-action-cancel")
    page.wait_for_selector(".messagelist")
    assert "stops it in one renewal" in page.inner_text(".messagelist")
    running.refresh_from_db()
    assert running.cancel_requested and running.status == RunStatus.RUNNING

    # Cancel the queued one from the list with the action menu.
    page.goto("/admin/supervisor_app/supervisedrun/?status__exact=queued")
    page.check(f"input[name=_selected_action][value='{queued.pk}']")
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    page.wait_for_selector(".messagelist")
    assert "1 run was cancelled." in page.inner_text(".messagelist")
    queued.refresh_from_db()
    assert queued.status == RunStatus.CANCELLED
    shot(page, "runs-cancelled")

    # The dashboard.
    page.goto("/admin/supervisor_app/supervisedrun/dashboard/")
    page.wait_for_selector("svg.sv-chart")
    assert page.inner_text("#sv-stale .sv-n") == "1"
    assert page.locator("svg.sv-chart rect[fill]").count() > 10
    liveness = page.inner_text("#sv-liveness")
    assert "ops-1:298" in liveness and "stale" in liveness and "alive" in liveness
    shot(page, "dashboard", docs=True)

    # Its links lead to the filtered list.
    page.click("#sv-stale a")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list tbody tr").count() == 1
    assert "celery@worker-9" in page.inner_text("#result_list")


def test_operator_edits_a_schedules_supervision_policy(page: Any) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "pw")
    data = scene()
    report = data["report"]
    login(page, "ops")
    page.goto(f"/admin/django_celery_beat/periodictask/{report.pk}/change/")
    page.wait_for_selector("#supervision-group")
    assert page.locator("#supervised_runs-group .sv-badge").count() == 20
    page.fill("#id_supervision-0-max_attempts", "5")
    page.fill("#id_supervision-0-lease_timeout", "00:02:00")
    shot(page, "schedule-policy")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    policy = type(report).objects.get(pk=report.pk).supervision  # type: ignore[attr-defined]
    assert policy.max_attempts == 5 and policy.lease_timeout == timedelta(minutes=2)


def test_view_only_staff_cannot_act(page: Any) -> None:
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(content_type__app_label="supervisor_app", codename="view_supervisedrun")
    )
    data = scene()
    login(page, "viewer")
    page.goto("/admin/supervisor_app/supervisedrun/")
    page.wait_for_selector("#result_list")
    assert page.locator("select[name=action]").count() == 0
    assert page.locator("input[name=_selected_action]").count() == 0
    page.goto(f"/admin/supervisor_app/supervisedrun/{data['failed'].pk}/change/")
    page.wait_for_selector("#attempts-group")
    assert page.locator("[id^=sv-action-]").count() == 0
    shot(page, "run-detail-read-only")
