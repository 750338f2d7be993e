"""Tasks of the unique-run tests (``test_unique_runs.py``), importable by its dispatching processes."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from supervisor_app import SupervisedTask


@shared_task(base=SupervisedTask, name="tests.unique.report", unique_by=("customer",))
def send_report(customer: int, kind: str = "daily") -> None:
    return None


@shared_task(base=SupervisedTask, bind=True, name="tests.unique.sync", unique_by="args")
def sync(self: SupervisedTask, source: str, *, full: bool = False, **options: Any) -> None:
    return None


@shared_task(base=SupervisedTask, name="tests.unique.plain")
def plain(x: int = 0) -> None:
    return None


@shared_task(base=SupervisedTask, name="tests.unique.hourly", unique_by=("customer",), unique_for=3600)
def hourly(customer: int) -> None:
    return None
