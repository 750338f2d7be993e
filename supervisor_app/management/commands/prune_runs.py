"""``python manage.py prune_runs --older-than 30d``: delete finished runs in batches."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from supervisor_app.runs.retention import prune_runs

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise CommandError(f"--older-than: expected a number and a unit (s, m, h, d, w), e.g. 30d; got {text!r}")
    return timedelta(seconds=float(match.group(1)) * UNITS[match.group(2)])


class Command(BaseCommand):
    help = "Delete terminal runs older than an age, in batches, keeping the last N runs of each schedule."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", required=True, help="Age, e.g. 30d, 12h.")
        parser.add_argument("--keep-last", type=int, default=10, help="Runs kept per schedule whatever their age.")
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["keep_last"] < 0 or options["batch_size"] < 1:
            raise CommandError("--keep-last must be >= 0 and --batch-size >= 1")
        deleted = prune_runs(
            parse_age(options["older_than"]),
            keep_last=options["keep_last"],
            batch_size=options["batch_size"],
            dry_run=options["dry_run"],
        )
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"{verb} {deleted} run(s)")
