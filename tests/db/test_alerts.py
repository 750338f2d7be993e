"""Alert channels: e-mail (Django's locmem backend), a webhook (a real HTTP server on 127.0.0.1),
routing per schedule, the database rate limit and its digest, redaction of webhook URLs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from supervisor_app import alerts, broker, checks, signals
from supervisor_app.core.states import RunStatus
from supervisor_app.models import AlertWindow, SupervisedRun, SupervisionPolicy
from tests.conftest import deliver

TOKEN = "s3cr3t-T0KEN"


# --------------------------------------------------------------------------- a local webhook


class Hook:
    """A webhook endpoint on 127.0.0.1 that answers from a script: an int status, or "sleep"."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.paths.append(self.path)
                hook.received.append(json.loads(body))
                action = hook.script.pop(0) if hook.script else 200
                if action == "sleep":
                    time.sleep(0.6)
                    action = 200
                try:
                    self.send_response(action)
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # the client timed out and went away

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}/hooks/{TOKEN}?key={TOKEN}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def eager() -> Iterator[None]:
    """Run the webhook task in-process (a worker's job in production)."""
    from celery import current_app

    before = current_app.conf.task_always_eager
    current_app.conf.task_always_eager = True
    yield
    current_app.conf.task_always_eager = before


@pytest.fixture
def quick(settings: Any) -> Any:
    settings.SUPERVISOR_ALERT_WEBHOOK_TIMEOUT = 0.2
    settings.SUPERVISOR_ALERT_WEBHOOK_BACKOFF = 0.01
    settings.SUPERVISOR_ALERT_WEBHOOK_RETRIES = 2
    return settings


def make_run(status: str = RunStatus.DEAD, periodic_task: Any = None, **fields: Any) -> SupervisedRun:
    values: dict[str, Any] = {
        "task_name": "project.tasks.noop",
        "status": status,
        "attempt": 3,
        "max_attempts": 3,
        "lease_timeout": timedelta(seconds=60),
        "start_timeout": timedelta(seconds=60),
        "last_error": "ValueError: boom",
        "periodic_task": periodic_task,
    }
    values.update(fields)
    return SupervisedRun.objects.create(**values)


def make_schedule(name: str = "nightly", **policy: Any) -> Any:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(name=name, task="project.tasks.noop", interval=every)
    if policy:
        SupervisionPolicy.objects.create(periodic_task=pt, **policy)
    return pt


# --------------------------------------------------------------------------- pure helpers


def test_parse_events() -> None:
    assert alerts.parse_events("dead, Failed") == {"dead", "failed"}
    assert alerts.parse_events(["missed"]) == {"missed"}
    assert alerts.parse_events("none") == frozenset()
    with pytest.raises(ValueError, match="exploded"):
        alerts.parse_events("dead,exploded")


def test_redact_url_keeps_only_scheme_and_host() -> None:
    assert alerts.redact_url(f"https://hooks.example.com/services/{TOKEN}") == "https://hooks.example.com/…"
    assert alerts.redact_url(f"https://user:{TOKEN}@example.com:8443/") == "https://example.com:8443/…"
    assert alerts.redact_url("http://example.com") == "http://example.com"
    assert TOKEN not in alerts.redact_url(f"http://h/?token={TOKEN}")


def test_windows_are_aligned() -> None:
    now = datetime(2026, 1, 1, 10, 59, 59, tzinfo=dt_timezone.utc)
    assert alerts.window_start(now, 3600) == datetime(2026, 1, 1, 10, tzinfo=dt_timezone.utc)
    assert alerts.window_start(now, 60) == datetime(2026, 1, 1, 10, 59, tzinfo=dt_timezone.utc)


def test_only_http_webhooks() -> None:
    with pytest.raises(ValueError, match="http or https"):
        alerts.post_json("file:///etc/passwd", {}, timeout=1, retries=0, backoff=0)


# --------------------------------------------------------------------------- webhook delivery


def test_webhook_posts_json(hook: Hook) -> None:
    assert alerts.post_json(hook.url, {"event": "dead"}, timeout=2, retries=0, backoff=0) == 200
    assert hook.received == [{"event": "dead"}]


def test_webhook_retries_server_errors_then_succeeds(hook: Hook) -> None:
    hook.script = [500, 503]
    delays: list[float] = []
    status = alerts.post_json(hook.url, {"n": 1}, timeout=2, retries=3, backoff=0.5, sleep=delays.append)
    assert status == 200 and len(hook.received) == 3
    assert delays == [0.5, 1.0]  # exponential backoff


def test_webhook_timeout_is_retried_and_gives_up_without_leaking_the_url(hook: Hook) -> None:
    hook.script = ["sleep", "sleep", "sleep"]
    started = time.monotonic()
    with pytest.raises(alerts.WebhookError) as info:
        alerts.post_json(hook.url, {"n": 1}, timeout=0.2, retries=2, backoff=0.01)
    assert time.monotonic() - started < 1.5  # three tries of 0.2 s, not three of 0.6 s
    assert len(hook.received) == 3
    assert "3 tries" in str(info.value) and TOKEN not in str(info.value)


def test_webhook_client_errors_are_not_retried(hook: Hook) -> None:
    hook.script = [404]
    with pytest.raises(alerts.WebhookError, match="HTTP 404"):
        alerts.post_json(hook.url, {}, timeout=2, retries=3, backoff=0)
    assert len(hook.received) == 1


def test_webhook_connection_refused_is_retried() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    delays: list[float] = []
    with pytest.raises(alerts.WebhookError, match="2 tries"):
        alerts.post_json(f"http://127.0.0.1:{port}/x", {}, timeout=1, retries=1, backoff=0.1, sleep=delays.append)
    assert delays == [0.1]


# --------------------------------------------------------------------------- events to channels


@pytest.mark.django_db
def test_dead_run_alerts_by_mail_and_webhook(
    hook: Hook, eager: None, quick: Any, mailoutbox: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    quick.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    quick.SUPERVISOR_ALERT_WEBHOOK_URL = hook.url
    hook.script = [500]  # the task retries once
    run = make_run()
    with caplog.at_level(logging.DEBUG, logger="supervisor_app"):
        signals.run_dead.send_robust(sender=SupervisedRun, run=run, attempt=3, reason="lost")
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ops@example.com"]
    assert f"run {run.pk} dead" in mailoutbox[0].subject and "worker was lost" in mailoutbox[0].body
    assert len(hook.received) == 2
    payload = hook.received[-1]
    assert payload["event"] == "dead" and payload["runs"][0]["id"] == run.pk and payload["runs"][0]["error"]
    assert "text" in payload
    assert any("delivered" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_failed_alerts_but_recovered_only_when_asked(settings: Any, mailoutbox: list[Any]) -> None:
    settings.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    run = make_run(status=RunStatus.FAILED, attempt=1)
    signals.run_failed.send_robust(sender=SupervisedRun, run=run, attempt=1, error="NonRetryable: x")
    signals.run_recovered.send_robust(sender=SupervisedRun, run=run, lost_attempt=1)
    assert [m.subject for m in mailoutbox] == [f"[supervisor] project.tasks.noop: run {run.pk} failed"]
    settings.SUPERVISOR_ALERT_ON = ["recovered"]
    signals.run_recovered.send_robust(sender=SupervisedRun, run=run, lost_attempt=1)
    assert len(mailoutbox) == 2 and "recovered" in mailoutbox[1].subject


@pytest.mark.django_db
def test_no_channel_configured_sends_nothing(mailoutbox: list[Any], django_assert_max_num_queries: Any) -> None:
    run = make_run()
    with django_assert_max_num_queries(0):  # an ad-hoc run, no recipients, no webhook: not even a query
        signals.run_dead.send_robust(sender=SupervisedRun, run=run, attempt=3, reason="error")
    assert mailoutbox == []
    assert not AlertWindow.objects.exists()


@pytest.mark.django_db
def test_schedule_policy_chooses_its_channels(
    hook: Hook, eager: None, quick: Any, mailoutbox: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    quick.SUPERVISOR_ALERT_RECIPIENTS = ["everyone@example.com"]
    quick.SUPERVISOR_ALERT_WEBHOOK_URL = "http://127.0.0.1:9/never-used"
    quiet = make_schedule("quiet", alert_on="none")
    loud = make_schedule("loud", alert_recipients="team@example.com", alert_webhook_url=hook.url, alert_on="failed")
    plain = make_schedule("plain")
    signals.run_dead.send_robust(sender=SupervisedRun, run=make_run(periodic_task=quiet), reason="error")
    signals.run_dead.send_robust(sender=SupervisedRun, run=make_run(periodic_task=loud), reason="error")
    assert mailoutbox == [] and hook.received == []  # quiet: none; loud: only `failed`
    with caplog.at_level(logging.INFO, logger="supervisor_app"):
        failed = make_run(status=RunStatus.FAILED, periodic_task=loud)
        signals.run_failed.send_robust(sender=SupervisedRun, run=failed, error="x")
    assert [m.to for m in mailoutbox] == [["team@example.com"]] and "loud" in mailoutbox[0].subject
    assert len(hook.received) == 1 and hook.received[0]["schedule"] == "loud"
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    quick.SUPERVISOR_ALERT_WEBHOOK_URL = None
    signals.run_dead.send_robust(sender=SupervisedRun, run=make_run(periodic_task=plain), reason="error")
    assert mailoutbox[-1].to == ["everyone@example.com"] and "plain" in mailoutbox[-1].subject


@pytest.mark.django_db
def test_missed_slots_of_one_batch_make_one_alert(settings: Any, mailoutbox: list[Any]) -> None:
    settings.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    pt = make_schedule("hourly")
    base = datetime(2026, 1, 1, tzinfo=dt_timezone.utc)
    runs = [make_run(RunStatus.MISSED, pt, scheduled_for=base + timedelta(hours=i), attempt=1) for i in range(3)]
    for run in runs:
        signals.run_missed.send_robust(sender=SupervisedRun, run=run, reason="beat down", batch=runs)
    assert len(mailoutbox) == 1 and "hourly: 3 missed slot(s)" in mailoutbox[0].subject
    assert "beat down" in mailoutbox[0].body


@pytest.mark.django_db
def test_broker_down_does_not_break_the_sender(
    settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from supervisor_app.tasks import deliver_webhook

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(deliver_webhook, "apply_async", refuse)
    settings.SUPERVISOR_ALERT_WEBHOOK_URL = f"https://hooks.example.com/{TOKEN}"
    run = make_run()
    with caplog.at_level(logging.ERROR, logger="supervisor_app"):
        assert alerts.notify("dead", [run]) == {"webhook": "error"}
    assert "could not queue" in caplog.text and TOKEN not in caplog.text


# --------------------------------------------------------------------------- supervised delivery


def run_attempt(task: Any, run_id: int, number: int, *args: Any) -> Any:
    """Execute attempt ``number`` of a run in this process, as a worker would on its message."""

    headers = {broker.HEADER_RUN: run_id, broker.HEADER_ATTEMPT: number}
    return deliver(task, f"{run_id}.{number}", *args, **headers)


@pytest.mark.django_db(transaction=True)
def test_a_webhook_alert_is_a_supervised_run_retried_until_delivered(
    hook: Hook, quick: Any, sent: list[Any], mailoutbox: list[Any]
) -> None:
    """The endpoint is down: the delivery is not dropped, the supervisor retries it from the database."""
    from supervisor_app.supervisor import run_sweep
    from supervisor_app.tasks import deliver_webhook

    quick.SUPERVISOR_ALERT_WEBHOOK_URL = hook.url
    assert alerts.notify("dead", [make_run()]) == {"webhook": "queued"}
    delivery = SupervisedRun.objects.get(task_name=alerts.WEBHOOK_TASK)
    assert sent == [(delivery.pk, 1, alerts.WEBHOOK_TASK)]
    assert TOKEN not in json.dumps([delivery.args, delivery.kwargs, delivery.options])  # looked up by the task
    hook.script = [500, 502, 503]  # every quick retry of attempt 1 fails
    from celery.exceptions import Retry

    with pytest.raises(Retry) as retried:  # to Celery, an attempt that will be retried is a retry
        run_attempt(deliver_webhook, delivery.pk, 1, *delivery.args)
    assert isinstance(retried.value.exc, alerts.WebhookError)
    delivery.refresh_from_db()
    assert delivery.status == RunStatus.RETRYING and delivery.max_attempts == 5
    assert "failed after 3 tries: HTTP 503" in delivery.last_error and TOKEN not in delivery.last_error
    SupervisedRun.objects.filter(pk=delivery.pk).update(next_check_at=datetime(2020, 1, 1, tzinfo=dt_timezone.utc))
    run_sweep("t")
    assert sent[-1] == (delivery.pk, 2, alerts.WEBHOOK_TASK)
    assert run_attempt(deliver_webhook, delivery.pk, 2, *delivery.args) == 200  # the endpoint is back
    delivery.refresh_from_db()
    assert delivery.status == RunStatus.SUCCEEDED
    assert [p["event"] for p in hook.received] == ["dead"] * 4
    assert mailoutbox == []


@pytest.mark.django_db(transaction=True)
def test_a_refused_webhook_alert_fails_at_once_and_is_alerted_by_mail_only(
    hook: Hook, quick: Any, sent: list[Any], mailoutbox: list[Any]
) -> None:
    from supervisor_app.tasks import deliver_webhook

    quick.SUPERVISOR_ALERT_WEBHOOK_URL = hook.url
    quick.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    alerts.notify("dead", [make_run()])
    delivery = SupervisedRun.objects.get(task_name=alerts.WEBHOOK_TASK)
    hook.script = [401]
    with pytest.raises(alerts.WebhookRefused):
        run_attempt(deliver_webhook, delivery.pk, 1, *delivery.args)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempt, len(hook.received)) == (RunStatus.FAILED, 1, 1)
    # Alerted like any failed run, but not through the failing webhook (that would loop).
    assert len(mailoutbox) == 2 and f"run {delivery.pk} failed" in mailoutbox[1].subject
    assert SupervisedRun.objects.filter(task_name=alerts.WEBHOOK_TASK).count() == 1
    assert TOKEN not in mailoutbox[1].body


# --------------------------------------------------------------------------- rate limit and digest


@pytest.mark.django_db
def test_rate_limit_then_one_digest_per_channel(
    hook: Hook, eager: None, quick: Any, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    quick.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    quick.SUPERVISOR_ALERT_WEBHOOK_URL = hook.url
    quick.SUPERVISOR_ALERT_RATE_LIMIT = 3
    quick.SUPERVISOR_ALERT_RATE_WINDOW = 3600
    outcomes = []
    for _ in range(10):
        outcomes.append(alerts.notify("dead", [make_run()]))
    assert [o["email"] for o in outcomes] == ["sent"] * 3 + ["suppressed"] * 7
    assert [o["webhook"] for o in outcomes] == ["queued"] * 3 + ["suppressed"] * 7
    assert len(mailoutbox) == 3 and len(hook.received) == 3
    rows = list(AlertWindow.objects.order_by("channel"))
    assert [(r.sent, r.suppressed) for r in rows] == [(3, 7), (3, 7)]
    assert all(TOKEN not in json.dumps(r.route) and TOKEN not in r.channel for r in rows)

    assert alerts.send_digests() == 0  # the window is not over yet
    AlertWindow.objects.update(window_start=rows[0].window_start - timedelta(hours=1))
    assert alerts.send_digests() == 2
    assert len(mailoutbox) == 4 and "7 alert(s) held back" in mailoutbox[-1].subject
    assert hook.received[-1]["event"] == "digest" and hook.received[-1]["suppressed"] == 7
    assert alerts.send_digests() == 0  # claimed once
    # A new window has a fresh budget.
    assert alerts.notify("dead", [make_run()]) == {"email": "sent", "webhook": "queued"}


@pytest.mark.django_db
def test_no_limit(settings: Any, mailoutbox: list[Any]) -> None:
    settings.SUPERVISOR_ALERT_RECIPIENTS = ["ops@example.com"]
    settings.SUPERVISOR_ALERT_RATE_LIMIT = None
    for _ in range(5):
        alerts.notify("failed", [make_run(RunStatus.FAILED)])
    assert len(mailoutbox) == 5


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_rate_limit_holds_across_racing_processes(settings: Any) -> None:
    """Eight threads (own connections) take from one budget of 10: exactly 10 get through."""
    settings.SUPERVISOR_ALERT_RATE_LIMIT = 10
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                ok = alerts.acquire("email:race", {"kind": "email", "to": []})
                with lock:
                    results.append(ok)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(True) == 10 and len(results) == 40
    row = AlertWindow.objects.get(channel="email:race")
    assert (row.sent, row.suppressed) == (10, 30)


@pytest.mark.django_db
def test_the_sweep_phases_are_one_static_list_with_the_digests_last() -> None:
    from supervisor_app import supervisor

    assert [p.name for p in supervisor.PHASES] == [
        "lost", "overdue", "retries", "unstarted", "workflows", "slots", "schedules", "process rows",
        "alert digests",
    ]  # fmt: skip
    assert isinstance(supervisor.PHASES, tuple)  # nothing can append itself to it
    last = supervisor.PHASES[-1]
    assert isinstance(last, supervisor.Phase) and last.run is alerts.digest_phase


# --------------------------------------------------------------------------- validation


@pytest.mark.django_db
def test_policy_validates_alert_fields() -> None:
    from django.core.exceptions import ValidationError

    pt = make_schedule("validated")
    policy = SupervisionPolicy(periodic_task=pt, alert_on="dead, boom", alert_webhook_url="not a url")
    with pytest.raises(ValidationError) as info:
        policy.full_clean()
    assert set(info.value.message_dict) >= {"alert_on", "alert_webhook_url"}


def test_settings_checks(settings: Any) -> None:
    settings.SUPERVISOR_ALERT_ON = ["dead", "bogus"]
    settings.SUPERVISOR_ALERT_WEBHOOK_URL = "ftp://example.com/x"
    settings.SUPERVISOR_ALERT_RATE_LIMIT = 0
    settings.SUPERVISOR_ALERT_WEBHOOK_RETRIES = -1
    ids = sorted(e.id for e in checks.check_alert_settings())
    assert ids == ["supervisor_app.E101", "supervisor_app.E102", "supervisor_app.E103", "supervisor_app.E104"]


# --------------------------------------------------------------------------- retention task


@pytest.mark.django_db
def test_prune_task_is_registered_and_prunes() -> None:
    from celery import current_app

    import supervisor_app.tasks  # noqa: F401
    from supervisor_app.tasks import prune_runs

    assert "supervisor_app.prune_runs" in current_app.tasks
    assert "supervisor_app.deliver_webhook" in current_app.tasks
    old = make_run(RunStatus.SUCCEEDED)
    SupervisedRun.objects.filter(pk=old.pk).update(finished_at=datetime(2020, 1, 1, tzinfo=dt_timezone.utc))
    fresh = make_run(RunStatus.SUCCEEDED)
    assert prune_runs(older_than=86400.0) == 1
    assert list(SupervisedRun.objects.values_list("pk", flat=True)) == [fresh.pk]


@pytest.mark.django_db
def test_status_command_reports_a_stale_beat(settings: Any) -> None:
    from supervisor_app.models import ProcessHeartbeat

    settings.SUPERVISOR_REQUIRE_BEAT = True
    long_ago = datetime(2020, 1, 1, tzinfo=dt_timezone.utc)
    now = datetime.now(dt_timezone.utc)
    ProcessHeartbeat.objects.create(kind="supervisor", name="s:1", started_at=now, last_seen=now)
    ProcessHeartbeat.objects.create(kind="beat", name="b:1", started_at=long_ago, last_seen=long_ago)
    out = StringIO()
    with pytest.raises(SystemExit) as info:
        call_command("supervisor_status", stdout=out)
    assert info.value.code == 1 and "beat stale" in out.getvalue()
