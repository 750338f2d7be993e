"""``python manage.py supervisor_status``: a summary for humans; non-zero exit when unhealthy."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from supervisor_app.ops.health import check_health


class Command(BaseCommand):
    help = "Report supervisor and beat liveness and stuck runs; exit 1 when something is wrong."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        report = check_health()
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            for title, procs in (("supervisors", report.supervisors), ("beats", report.beats)):
                self.stdout.write(f"{title}:")
                if not procs:
                    self.stdout.write("  (none has ever reported)")
                for p in procs:
                    flag = "STALE" if p.stale else "ok"
                    self.stdout.write(f"  {p.name:40} last seen {p.age:7.1f}s ago  {flag}")
            active = ", ".join(f"{k} {v}" for k, v in sorted(report.active.items())) or "none"
            self.stdout.write(f"active runs: {active}")
            self.stdout.write(f"stuck runs: {report.stuck_running} running, {report.stuck_queued} queued")
            if report.ok:
                self.stdout.write(self.style.SUCCESS("OK"))
            for problem in report.problems:
                self.stdout.write(self.style.ERROR(f"PROBLEM: {problem}"))
        if not report.ok:
            raise SystemExit(1)
