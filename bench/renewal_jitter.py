"""How late do lease renewals come under load? Chooses the default heartbeat interval and lease.

A worker (prefork, 4 processes) runs quiet bodies that never call ``heartbeat()``, for ``--seconds``,
while the machine is made hostile: CPU burners on every core (the worker competes for the CPU with
them and with PostgreSQL), the worker processes' database connections terminated every 15 s (a
failover or restart: the keeper reconnects), and a pause of the whole worker (SIGSTOP, 2 s, as a
long GC pause or a VM steal would do). Every 0.1 s the runs' ``heartbeat_at`` (database clock) is
read; the gaps between successive renewals are the figure: the largest must stay well below the
lease, or a live worker's run would be recovered while it runs (a false recovery).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/supervisor_bench \\
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \\
        .venv/bin/python bench/renewal_jitter.py --heartbeat 5 --lease 20 --seconds 90
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")


def burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--bodies", type=int, default=4)
    parser.add_argument("--queue", default="supervisor-jitter")
    args = parser.parse_args()
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = args.queue
    os.environ["SUPERVISOR_HEARTBEAT_INTERVAL"] = str(args.heartbeat)
    os.environ["SUPERVISOR_LEASE_TIMEOUT"] = str(args.lease)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, check=True)

    import django

    django.setup()
    from django.db import connection

    from project.processes import spawn_supervisor, spawn_worker, wait_until
    from project.tasks import quiet_job
    from supervisor_app.models import SupervisedRun

    logs = ROOT / "var" / "bench-jitter"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ[k] for k in ("DATABASE_URL", "CELERY_BROKER_URL") if k in os.environ}
    env.update(CELERY_TASK_DEFAULT_QUEUE=args.queue, SUPERVISOR_HEARTBEAT_INTERVAL=str(args.heartbeat),
               SUPERVISOR_LEASE_TIMEOUT=str(args.lease))  # fmt: skip
    supervisor = spawn_supervisor("jitter-supervisor", logs, env)
    worker = spawn_worker("jitter", logs, env, concurrency=args.bodies, queues=args.queue)
    procs = []
    try:
        worker.wait_for_output("ready.", timeout=60)
        run_ids = [quiet_job.delay(args.seconds, f"jitter-{i}").run_id for i in range(args.bodies)]
        wait_until(
            lambda: SupervisedRun.objects.filter(pk__in=run_ids, status="running").count() == args.bodies,
            60,
            what="every body running",
        )
        stop_at = time.time() + args.seconds - 5
        procs = [multiprocessing.Process(target=burn, args=(stop_at,)) for _ in range(os.cpu_count() or 2)]
        for p in procs:
            p.start()
        last: dict[int, object] = {}
        gaps: list[float] = []
        next_cut, paused = time.time() + 15, False
        pause_at = time.time() + args.seconds / 2
        while time.time() < stop_at:
            for pk, beat in SupervisedRun.objects.filter(pk__in=run_ids).values_list("pk", "heartbeat_at"):
                prev = last.get(pk)
                if prev is not None and beat != prev:
                    gaps.append((beat - prev).total_seconds())  # type: ignore[operator]
                last[pk] = beat
            if time.time() > next_cut:  # a failover: the workers' sessions are cut
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = ''"
                    )
                next_cut += 15
            if not paused and time.time() > pause_at:  # a 2 s stop of the whole worker (GC, VM steal)
                worker.signal_group(signal.SIGSTOP)
                time.sleep(2)
                worker.signal_group(signal.SIGCONT)
                paused = True
            time.sleep(0.1)
        lost = SupervisedRun.objects.filter(pk__in=run_ids, attempt__gt=1).count()
        gaps.sort()
        print(f"heartbeat {args.heartbeat:g}s, lease {args.lease:g}s, {len(gaps)} renewals under load")
        if gaps:
            p99 = gaps[int(len(gaps) * 0.99) - 1] if len(gaps) >= 100 else gaps[-1]
            print(
                f"gap between renewals: median {statistics.median(gaps):.2f}s, p99 {p99:.2f}s, max {gaps[-1]:.2f}s "
                f"(lease {args.lease:g}s: margin {args.lease - gaps[-1]:.2f}s)"
            )
        print(f"false recoveries (a live body's run recovered): {lost}")
    finally:
        for p in procs:
            p.terminate()
        worker.stop()
        supervisor.stop()


if __name__ == "__main__":
    main()
