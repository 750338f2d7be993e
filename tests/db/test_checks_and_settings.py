"""Settings are read lazily, accept seconds or timedeltas, and invalid ones fail system checks."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from supervisor_app.checks import check_celery, check_settings
from supervisor_app.conf import SETTINGS, supervisor_settings


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_defaults_are_documented_and_valid(settings: Any) -> None:
    for name in SETTINGS:
        if hasattr(settings, "SUPERVISOR_" + name):
            delattr(settings, "SUPERVISOR_" + name)
    assert check_settings() == []
    # Chosen from bench/renewal_jitter.py: a killed worker's run recovered within about 25 s.
    assert supervisor_settings.lease_timeout == 20.0
    assert supervisor_settings.heartbeat_interval == 5.0
    assert supervisor_settings.start_timeout == 20.0  # None means the lease timeout
    assert all(spec.doc for spec in SETTINGS.values())


def test_settings_are_read_again_whenever_one_changes(settings: Any) -> None:
    """Values are kept once read (the agent reads several a task), and dropped on Django's
    ``setting_changed``: ``override_settings``, pytest-django's ``settings``."""
    from django.test import override_settings

    settings.SUPERVISOR_LEASE_TIMEOUT = timedelta(minutes=2)
    assert supervisor_settings.lease_timeout == 120.0
    settings.SUPERVISOR_LEASE_TIMEOUT = 7.5
    assert supervisor_settings.lease_timeout == 7.5
    assert supervisor_settings.FINISH_DELAY == 0.05  # the default, now kept
    with override_settings(SUPERVISOR_FINISH_DELAY=0.2):
        assert supervisor_settings.FINISH_DELAY == 0.2
    assert supervisor_settings.FINISH_DELAY == 0.05
    del settings.SUPERVISOR_LEASE_TIMEOUT  # back to the default
    assert supervisor_settings.lease_timeout == SETTINGS["LEASE_TIMEOUT"].default


def test_lease_not_longer_than_heartbeat_is_an_error(settings: Any) -> None:
    settings.SUPERVISOR_LEASE_TIMEOUT = 5
    settings.SUPERVISOR_HEARTBEAT_INTERVAL = 5
    messages = check_settings()
    assert "supervisor_app.E004" in ids(messages)
    assert "SUPERVISOR_LEASE_TIMEOUT" in messages[0].msg


def test_tight_lease_is_a_warning(settings: Any) -> None:
    settings.SUPERVISOR_LEASE_TIMEOUT = 15
    settings.SUPERVISOR_HEARTBEAT_INTERVAL = 10
    assert ids(check_settings()) == ["supervisor_app.W001"]


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("SWEEP_INTERVAL", -1, "supervisor_app.E002"),
        ("LEASE_TIMEOUT", "sixty", "supervisor_app.E001"),
        ("MAX_ATTEMPTS", 0, "supervisor_app.E003"),
        ("RETRYABLE_EXCEPTIONS", ["no.such.Error"], "supervisor_app.E005"),
    ],
)
def test_invalid_values_are_errors(settings: Any, name: str, value: Any, error: str) -> None:
    setattr(settings, "SUPERVISOR_" + name, value)
    assert error in ids(check_settings())


def test_pickle_is_refused(settings: Any) -> None:
    settings.CELERY_TASK_SERIALIZER = "pickle"
    settings.CELERY_ACCEPT_CONTENT = ["json", "pickle"]
    assert ids(check_celery()) == ["supervisor_app.E010", "supervisor_app.E011"]


def test_attempts_are_published_as_json_whatever_the_task_serializer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check stops `manage.py` with pickle configured, but a worker or beat does not run checks:
    the publisher itself insists on JSON."""
    from unittest.mock import MagicMock

    from celery import current_app

    from supervisor_app import broker

    seen: list[Any] = []

    def capture(producer: Any, name: str, message: Any, **options: Any) -> None:
        seen.append(options.get("serializer"))

    monkeypatch.setitem(current_app.conf, "task_serializer", "pickle")
    monkeypatch.setattr(current_app.amqp, "send_task_message", capture)
    broker.send(broker.Message(7, 1, "project.tasks.noop", [], {}, {}, "7.1"), producer=MagicMock())
    assert seen == ["json"]


@pytest.mark.parametrize(
    ("heartbeat", "warned"), [(None, True), (0, True), (60.0, True), (20.0, False), ("absent", True)]
)
def test_a_broker_heartbeat_not_below_the_lease_is_warned_about_on_rabbitmq(
    settings: Any, heartbeat: Any, warned: bool
) -> None:
    settings.SUPERVISOR_LEASE_TIMEOUT = 60.0
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    if heartbeat == "absent":
        del settings.CELERY_BROKER_HEARTBEAT  # Celery's default, 120 s
    else:
        settings.CELERY_BROKER_HEARTBEAT = heartbeat
    assert ("supervisor_app.W002" in ids(check_celery())) is warned
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"  # no AMQP heartbeat to speak of
    assert "supervisor_app.W002" not in ids(check_celery())


def test_manage_py_check_fails_on_invalid_settings(settings: Any) -> None:
    from django.core.management.base import SystemCheckError

    settings.SUPERVISOR_LEASE_TIMEOUT = 1
    settings.SUPERVISOR_HEARTBEAT_INTERVAL = 2
    with pytest.raises(SystemCheckError, match="E004"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
def test_no_migration_is_missing() -> None:
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=StringIO())


@pytest.mark.parametrize(("name", "value"), [("OVERLAP", "Skip"), ("OVERLAP", "never"), ("CATCH_UP", "ALL")])
def test_an_invalid_policy_choice_in_settings_fails_manage_py_check(settings: Any, name: str, value: str) -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    setattr(settings, f"SUPERVISOR_{name}", value)
    errors = [e for e in check_settings() if e.id == "supervisor_app.E006"]
    assert len(errors) == 1 and f"SUPERVISOR_{name} must be one of" in errors[0].msg and repr(value) in errors[0].msg
    with pytest.raises(SystemCheckError, match=f"SUPERVISOR_{name}"):
        call_command("check")
