"""``python manage.py demo``: a supervised run survives the SIGKILL of the worker executing it.

Starts a supervisor and two Celery workers, dispatches a long supervised batch, kills the worker
running it (its whole process group, as a machine crash would) half-way, and prints what happened,
read back from the database: the supervisor noticed the expired lease, queued attempt 2, the other
worker resumed from the last checkpoint and finished. Exits 1 if anything else happened.
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test.utils import override_settings

from project.models import Execution
from project.processes import Proc, spawn_supervisor, spawn_worker, wait_until
from supervisor_app.models import RunAttempt, SupervisedRun

# Short intervals so the demo takes seconds; production defaults are 10 s / 60 s / 5 s.
DEMO_SETTINGS = {
    "SUPERVISOR_HEARTBEAT_INTERVAL": 0.5,
    "SUPERVISOR_LEASE_TIMEOUT": 3.0,
    "SUPERVISOR_SWEEP_INTERVAL": 0.5,
}


class Command(BaseCommand):
    help = "Demonstrate recovery of a supervised run whose worker is killed mid-run."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--step-seconds", type=float, default=0.5)
        parser.add_argument("--logs", default=None, help="Folder for the processes' logs.")

    def handle(self, *args: Any, **opts: Any) -> None:
        log_dir = Path(opts["logs"] or tempfile.mkdtemp(prefix="supervisor-demo-"))
        env = {k: str(v) for k, v in DEMO_SETTINGS.items()}
        procs: dict[str, Proc] = {}
        t0 = time.monotonic()
        marks: list[tuple[float, str]] = []

        def say(msg: str) -> None:
            marks.append((time.monotonic() - t0, msg))
            self.stdout.write(f"  [{time.monotonic() - t0:6.2f}s] {msg}")
            self.stdout.flush()

        db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        broker = settings.CELERY_BROKER_URL.split("://", 1)[0]
        self.stdout.write(self.style.MIGRATE_HEADING(f"supervisor_app demo (database: {db}, broker: {broker})"))
        self.stdout.write(
            f"  lease {DEMO_SETTINGS['SUPERVISOR_LEASE_TIMEOUT']}s, heartbeat "
            f"{DEMO_SETTINGS['SUPERVISOR_HEARTBEAT_INTERVAL']}s, sweep "
            f"{DEMO_SETTINGS['SUPERVISOR_SWEEP_INTERVAL']}s; logs in {log_dir}"
        )
        try:
            procs["supervisor"] = spawn_supervisor("supervisor", log_dir, env)
            for name in ("worker-a", "worker-b"):
                procs[name] = spawn_worker(name, log_dir, env)
            for name in ("worker-a", "worker-b"):
                procs[name].wait_for_output("ready.", timeout=60)
            procs["supervisor"].wait_for_output("sweeping every", timeout=60)
            say("supervisor, worker-a and worker-b are up")

            from project.tasks import slow_job

            with override_settings(**DEMO_SETTINGS):
                result = slow_job.delay(opts["steps"], opts["step_seconds"], "demo")
            run_id = result.run_id
            say(f"dispatched slow_job as run {run_id} ({opts['steps']} steps of {opts['step_seconds']}s)")

            def running_half_way() -> SupervisedRun | None:
                run = SupervisedRun.objects.get(pk=run_id)
                if run.status == "running" and (run.checkpoint or 0) >= opts["steps"] // 3:
                    return run
                return None

            run = wait_until(running_half_way, 60, what="the run to be half-way")
            assert run is not None
            victim = next(n for n in ("worker-a", "worker-b") if run.worker.startswith(n + "@"))
            survivor = "worker-b" if victim == "worker-a" else "worker-a"
            say(f"attempt 1 is running on {run.worker}, checkpoint {run.checkpoint}/{opts['steps']}")
            killed_at = time.time()
            procs[victim].kill()
            say(f"SIGKILL {victim} (pid {procs[victim].pid} and its pool children)")

            def attempt2_started() -> RunAttempt | None:
                return RunAttempt.objects.filter(run_id=run_id, number=2, started_at__isnull=False).first()

            second = wait_until(attempt2_started, 60, what="attempt 2 to start")
            assert second is not None
            recovery = second.started_at.timestamp() - killed_at if second.started_at else float("nan")
            done = wait_until(
                lambda: SupervisedRun.objects.filter(pk=run_id, status__in=["succeeded", "failed", "dead"]).first(),
                120,
                what="the run to finish",
            )
            assert done is not None
            say(f"run {run_id} is {done.status}")
        except (TimeoutError, RuntimeError) as exc:
            for proc in procs.values():
                self.stderr.write(f"--- {proc.name} log tail\n{proc.output()[-2000:]}")
            raise CommandError(str(exc)) from exc
        finally:
            for proc in procs.values():
                proc.stop()

        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING("Timeline, read back from the database"))
        run = SupervisedRun.objects.get(pk=run_id)
        attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("number"))
        base = run.created_at

        def at(ts: datetime | float | None) -> str:
            if ts is None:
                return "      -"
            seconds = (ts if isinstance(ts, float) else ts.timestamp()) - base.timestamp()
            return f"+{seconds:6.2f}s"

        rows = [(run.created_at.timestamp(), f"dispatched run {run_id}: recorded as queued, then published")]
        for a in attempts:
            if a.started_at:
                rows.append((a.started_at.timestamp(), f"attempt {a.number} started on {a.worker}"))
            if a.number == 1:
                rows.append((killed_at, f"{victim} killed with SIGKILL (no goodbye, no ack, no error)"))
            if a.ended_at:
                note = {
                    "lost": "lease expired: the supervisor marked it lost and re-enqueued the run as "
                    f"attempt {a.number + 1}, resuming from the last checkpoint",
                }.get(a.outcome, a.outcome)
                rows.append((a.ended_at.timestamp(), f"attempt {a.number} {note}"))
        for ts, text in sorted(rows, key=lambda r: r[0]):
            self.stdout.write(f"  {at(ts)}  {text}")
        executions = Execution.objects.filter(run_id=run_id).count()
        lease = DEMO_SETTINGS["SUPERVISOR_LEASE_TIMEOUT"] + DEMO_SETTINGS["SUPERVISOR_SWEEP_INTERVAL"]
        self.stdout.write("")
        self.stdout.write(
            f"  recovery time (kill -> attempt 2 started on {survivor}): {recovery:.2f}s "
            f"(bound: lease timeout + sweep interval = {lease:.1f}s)"
        )
        self.stdout.write(
            f"  completed executions of the batch: {executions}; final status: {run.status}; attempts: {len(attempts)}"
        )
        ok = (
            run.status == "succeeded"
            and executions == 1
            and len(attempts) == 2
            and attempts[0].outcome == "lost"
            and attempts[1].worker.startswith(survivor + "@")
        )
        if not ok:
            raise CommandError("the demo did not end as expected (see the timeline above)")
        self.stdout.write(self.style.SUCCESS("OK: the run survived the crash, completed once, on the other worker."))
