"""``python manage.py supervisor_backfill NAME --start ISO --end ISO``: one run per slot of a schedule
in a range (both ends inclusive), each slot recorded at most once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from supervisor_app.scheduling.operator import BACKFILL_LIMIT, backfill


def _instant(value: str, name: str) -> datetime:
    try:
        parsed = parse_datetime(value)
        if parsed is None and (day := parse_date(value)) is not None:
            parsed = datetime(day.year, day.month, day.day)
    except ValueError:
        parsed = None
    if parsed is None:
        raise CommandError(f"--{name}: not an ISO 8601 date and time: {value!r}")
    # A time without an offset is in the project's TIME_ZONE, as the admin reads it.
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


class Command(BaseCommand):
    help = (
        "Record one run per slot of a periodic task between --start and --end (inclusive). Slots recorded "
        "already are left alone, so running it twice records nothing the second time."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Name of the periodic task (django-celery-beat's PeriodicTask.name).")
        parser.add_argument("--start", required=True, help="First instant, ISO 8601 (2026-03-01T00:00+00:00).")
        parser.add_argument("--end", required=True, help="Last instant, ISO 8601, inclusive.")
        parser.add_argument(
            "--limit", type=int, default=BACKFILL_LIMIT, help=f"Refuse ranges of more slots (default {BACKFILL_LIMIT})."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from django_celery_beat.models import PeriodicTask

        name = options["name"]
        found = (
            PeriodicTask.objects.select_related("interval", "crontab", "solar", "clocked", "supervision")
            .filter(name=name)
            .first()
        )
        if found is None:
            raise CommandError(f"no periodic task named {name!r}")
        start, end = _instant(options["start"], "start"), _instant(options["end"], "end")
        try:
            result = backfill(found, start, end, limit=options["limit"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{name}: {result.slots} slot(s) from {start.isoformat()} to {end.isoformat()}: "
            f"{result.recorded} recorded, {result.existing} already recorded"
        )
