"""System checks on the database of supervisor_app's tables (E030-E032, W030): configurations the
agent's writes can't work on are refused at start-up with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from project.processes import ROOT
from supervisor_app.checks import check_database, database_messages


def fake(vendor: str, engine: str = "", sqlite: tuple[int, int, int] = (3, 45, 1), **settings: Any) -> Any:
    """A Django connection as the check sees it: vendor, settings, driver module."""
    return SimpleNamespace(
        vendor=vendor,
        settings_dict={"ENGINE": engine or f"django.db.backends.{vendor}", **settings},
        Database=SimpleNamespace(sqlite_version_info=sqlite),
    )


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_the_test_settings_pass() -> None:
    assert check_database() == []


@pytest.mark.parametrize("vendor", ["mysql", "oracle", "microsoft", "cockroachdb"])
def test_a_database_other_than_postgresql_or_sqlite_is_refused(vendor: str) -> None:
    messages = database_messages("runs", fake(vendor, AUTOCOMMIT=False))
    assert ids(messages) == ["supervisor_app.E030"]  # nothing else said about a database refused outright
    assert "DATABASES['runs']" in messages[0].msg and repr(vendor) in messages[0].msg
    assert "router" in messages[0].hint


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"])
def test_postgresql_and_sqlite_with_django_defaults_pass(vendor: str) -> None:
    assert database_messages("default", fake(vendor, OPTIONS={})) == []


def test_autocommit_off_is_refused() -> None:
    messages = database_messages("default", fake("postgresql", AUTOCOMMIT=False))
    assert ids(messages) == ["supervisor_app.E031"]
    assert "AUTOCOMMIT" in messages[0].msg


def test_sqlite_without_update_returning_is_refused() -> None:
    assert ids(database_messages("default", fake("sqlite", sqlite=(3, 34, 1)))) == ["supervisor_app.E032"]
    assert database_messages("default", fake("sqlite", sqlite=(3, 35, 0))) == []


def test_named_prepared_statements_behind_a_transaction_pooler_are_warned() -> None:
    pooled = {"DISABLE_SERVER_SIDE_CURSORS": True}
    prepared = {"server_side_binding": True, "prepare_threshold": 5}
    messages = database_messages("default", fake("postgresql", OPTIONS=prepared, **pooled))
    assert ids(messages) == ["supervisor_app.W030"]
    assert "PgBouncer" in messages[0].msg
    # Each alone is fine: no pooler marker, no named statements, or client-side binding (never prepares).
    assert database_messages("default", fake("postgresql", OPTIONS=prepared)) == []
    assert database_messages("default", fake("postgresql", OPTIONS={"server_side_binding": True}, **pooled)) == []
    assert database_messages("default", fake("postgresql", OPTIONS={"prepare_threshold": 5}, **pooled)) == []


def test_the_check_follows_the_routers(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """supervisor_app's tables routed to another database: that one is checked."""
    settings.DATABASE_ROUTERS = ["tests.db.test_database_checks.RunsElsewhere"]
    seen: list[str] = []

    def record(alias: str, conn: Any) -> list[Any]:
        seen.append(alias)
        return []

    monkeypatch.setattr("supervisor_app.checks.database_messages", record)
    from django.db import connections

    monkeypatch.setitem(connections.settings, "runs", connections.settings["default"])
    try:
        check_database()
    finally:
        del connections["runs"]  # the (never connected) wrapper the check created
    assert seen == ["runs"]


class RunsElsewhere:
    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "runs" if model._meta.app_label == "supervisor_app" else None

    db_for_write = db_for_read


@pytest.mark.postgres
def test_manage_py_check_reports_it() -> None:
    """Registered: ``manage.py check`` (and so every command) shows it, from the settings alone."""
    env = {
        **os.environ,
        "DEMO_PG_DISABLE_SERVER_SIDE_CURSORS": "1",
        "DEMO_PG_SERVER_SIDE_BINDING": "1",
        "DEMO_PG_PREPARE_THRESHOLD": "5",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert "supervisor_app.W030" in done.stderr + done.stdout
