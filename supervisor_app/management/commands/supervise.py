"""``python manage.py supervise``: sweep every SUPERVISOR_SWEEP_INTERVAL until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from supervisor_app.conf import supervisor_settings
from supervisor_app.models import ProcessHeartbeat
from supervisor_app.ops.liveness import forget_process, process_name
from supervisor_app.supervisor import loop, run_sweep


class Command(BaseCommand):
    help = "Run the supervisor: recover lost runs, dispatch retries, republish unstarted runs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Run one sweep and exit.")
        parser.add_argument("--interval", type=float, default=None, help="Seconds between sweeps.")
        parser.add_argument("--name", default=None, help="Name recorded in the liveness table.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not logging.getLogger("supervisor_app").handlers and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        name = options["name"] or process_name()
        if options["once"]:
            report = run_sweep(name)
            self.stdout.write(str(report.as_dict()))
            return
        interval = options["interval"] if options["interval"] is not None else supervisor_settings.sweep_interval
        stop = threading.Event()

        def _stop(signum: int, _frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        self.stdout.write(f"supervisor {name} sweeping every {interval}s")
        self.stdout.flush()
        sweeps = loop(stop, interval, name)
        try:  # a clean stop: no stale row left behind in health/ and supervisor_status
            forget_process(ProcessHeartbeat.Kind.SUPERVISOR, name)
        except Exception as exc:
            self.stderr.write(f"supervisor {name} could not remove its liveness row ({type(exc).__name__})")
        self.stdout.write(f"supervisor {name} stopped after {sweeps} sweeps")
