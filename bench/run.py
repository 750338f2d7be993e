"""`make bench`: supervised runs measured next to plain Celery, in the same run, on this machine.

Writes bench/results.md and PNG plots in bench/. Needs PostgreSQL, RabbitMQ and Redis on loopback
(the same servers as `make test`). Every figure is measured here; nothing is copied from elsewhere.

    python bench/run.py [--quick] [--only overhead,recovery,plain,sweep,heartbeat,beat,beat-load,bulk]
    python bench/run.py --only beat --beat-size 1000 --beat-supervised-only --out /tmp/bench-beat
    python bench/run.py --only beat-load --out /tmp/bench-beat-load
    python bench/run.py --only overhead --overhead-rounds 3 --overhead-n 2000 --out /tmp/bench-overhead
    python bench/run.py --render    # results.md written again from results.json, nothing measured

BENCH_DB, BENCH_QUEUE and BENCH_LOGS (environment) name the database (dropped and created anew), the
queue and the log folder under var/, so a second bench can run beside `make bench` without touching
its data; the overhead bench's Procrastinate peer gets a database of its own, BENCH_DB + "_procrastinate".
Its peers (django-celery-results, Procrastinate) come from bench/requirements.txt, which `make bench`
installs; a peer that is not installed is skipped with a note in results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = os.environ.get("BENCH_DB", "supervisor_bench")
PG = "postgres://postgres@127.0.0.1:5432"
RABBIT = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379/14"
QUEUE = os.environ.get("BENCH_QUEUE", "supervisor-bench")
SUPERVISION = {
    "SUPERVISOR_HEARTBEAT_INTERVAL": "0.5",
    "SUPERVISOR_LEASE_TIMEOUT": "2",
    "SUPERVISOR_SWEEP_INTERVAL": "0.5",
}

os.environ.update(
    DATABASE_URL=f"{PG}/{BENCH_DB}",
    CELERY_BROKER_URL=RABBIT,
    CELERY_TASK_DEFAULT_QUEUE=QUEUE,
    DJANGO_SETTINGS_MODULE="project.settings",
    SUPERVISOR_LOG_LEVEL="WARNING",
    **SUPERVISION,
)


def fresh_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


fresh_database()
import django  # noqa: E402

django.setup()
from django.core.management import call_command  # noqa: E402
from django.db import connection, models, transaction  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from project.models import Execution  # noqa: E402
from project.processes import Proc, spawn_supervisor, spawn_worker, wait_until  # noqa: E402
from supervisor_app import runs  # noqa: E402
from supervisor_app.models import RunAttempt, SupervisedRun  # noqa: E402

call_command("migrate", verbosity=0)
LOGS = ROOT / "var" / os.environ.get("BENCH_LOGS", "bench-logs")
OUT = ROOT / "bench"
LINE_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


def purge(queue: str = QUEUE, broker: str | None = None) -> None:
    from celery import current_app

    with current_app.connection_for_write(broker) as conn:
        bound = current_app.amqp.queues[queue](conn.default_channel)
        bound.declare()
        bound.purge()


def reset() -> None:
    """Empty the run tables with plain DELETEs: ``QuerySet.delete()`` collects every related row in
    Python first (minutes after the beat case's 10,000 runs)."""
    from supervisor_app.models import AdoptedMessage, Effect

    with connection.cursor() as cursor:
        for model in (AdoptedMessage, Effect, RunAttempt, SupervisedRun, Execution):
            cursor.execute(f"DELETE FROM {model._meta.db_table}")
    purge()


def log_times(proc: Proc, marker: str) -> list[float]:
    times = []
    for line in proc.output().splitlines():
        if marker in line and (m := LINE_TS.match(line)):
            times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ------------------------------------------------------------------ 2. per-task overhead

#: The cases of the per-task overhead bench, in the order of the table: key -> label.
OVERHEAD_CASES = {
    "plain": "plain Celery",
    "dcr": "Celery + django-celery-results, `track_started`",
    "supervised": "supervised (default: completions deferred, batched)",
    "strict": "supervised, strict (`SUPERVISOR_STRICT_FINISH`)",
    "procrastinate": "Procrastinate, deferred one by one",
    "procrastinate_batch": "Procrastinate, `batch_defer`",
}
#: (case, reference, at least): the targets of issue 15, ratios of the same run.
OVERHEAD_TARGETS = [("supervised", "plain", 0.8), ("supervised", "dcr", 2.0), ("strict", "plain", 0.5)]
PROCRASTINATE_DB = f"{BENCH_DB}_procrastinate"
DCR_TABLE = "django_celery_results_taskresult"


#: Process roles whose CPU time the overhead bench accounts per task (see :func:`cpu_seconds`).
CPU_ROLES = ("worker main", "pool processes", "PostgreSQL", "RabbitMQ")


def cpu_seconds(worker_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes, from ``/proc``: the worker's
    main process, its pool processes, every PostgreSQL and RabbitMQ server process. Throughput on a
    shared 2-core machine moves with what else runs; CPU time per task moves much less, and tells
    where a task's cost goes. Processes that exited in between are not counted (none do here)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(CPU_ROLES, 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        pid, ppid, used = int(stat.parent.name), int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
        role = (
            "worker main"
            if pid == worker_pid
            else "pool processes"
            if ppid == worker_pid
            else "PostgreSQL"
            if comm == "postgres" or comm.startswith("postgres:")
            else "RabbitMQ"
            if comm == "beam.smp"
            else None
        )
        if role is not None:
            out[role] += used
    return out


def drain(
    name: str,
    n: int,
    fill: Callable[[], None],
    env: dict[str, str] | None = None,
    recorded: Callable[[], float] | None = None,
) -> tuple[float, float, dict[str, float]]:
    """Fill the queue with ``n`` messages, then start a worker and time it from ready to the last task:
    its last "succeeded in" line, or ``recorded()`` (when the last one is in the database) if given.
    Returns tasks/s, dispatch seconds per task, and CPU milliseconds per task by role (ready to done)."""
    purge()
    t = time.perf_counter()
    fill()
    dispatch = (time.perf_counter() - t) / n
    worker = spawn_worker(name, LOGS, {"SUPERVISOR_LOG_LEVEL": "WARNING", **(env or {})}, concurrency=2)
    try:
        worker.wait_for_output("ready.", 60)
        before = cpu_seconds(worker.pid)
        wait_until(lambda: len(log_times(worker, "succeeded in")) >= n, 600, 0.2, f"{name} to drain {n} tasks")
        ready = log_times(worker, "ready.")[0]
        last = log_times(worker, "succeeded in")[-1] if recorded is None else recorded()
        after = cpu_seconds(worker.pid)
    finally:
        worker.stop()
    cpu = {role: (after[role] - before[role]) * 1000 / n for role in CPU_ROLES}
    return n / (last - ready), dispatch, cpu


def runs_recorded(n: int) -> float:
    """When the last of ``n`` supervised runs was recorded ``succeeded``: the deferred path writes
    completions after the task's log line, so the throughput counts up to that write."""

    def all_succeeded() -> bool:
        return SupervisedRun.objects.filter(status="succeeded").count() >= n

    wait_until(all_succeeded, 60, 0.05, f"{n} runs recorded succeeded")
    assert SupervisedRun.objects.count() == n and SupervisedRun.objects.filter(status="succeeded").count() == n
    last = SupervisedRun.objects.aggregate(last=models.Max("finished_at"))["last"]
    return float(last.timestamp())


def dcr_recorded(n: int) -> None:
    """Check that django-celery-results holds ``n`` successes (started, then succeeded)."""

    def count() -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {DCR_TABLE} WHERE status = 'SUCCESS'")
            return int(cursor.fetchone()[0])

    wait_until(lambda: count() >= n, 60, 0.05, f"{n} results stored")


def prepare_dcr() -> str | None:
    """Migrate django-celery-results' tables into the bench database (only there); None, or why not."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("django_celery_results") is None:
        return "django-celery-results is not installed (`pip install -r bench/requirements.txt`)"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "django_celery_results", "-v0"],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS": "1"},
        check=True,
    )
    return None


def prepare_procrastinate() -> tuple[Any, str | None, str | None]:
    """The peer module and its database's DSN, or why the case is skipped."""
    try:
        import procrastinate_peer  # bench/, next to this script
    except ImportError as exc:
        return None, None, f"Procrastinate is not importable ({exc}; `pip install -r bench/requirements.txt`)"
    return procrastinate_peer, procrastinate_peer.fresh_database(PG, PROCRASTINATE_DB), None


def overhead_round(
    case: str, n: int, peer: Any, peer_dsn: str | None
) -> dict[str, tuple[float, float, dict[str, float]]]:
    """One case once: {case key: (tasks/s, dispatch seconds per task, CPU ms per task by role)}; the
    Procrastinate peer's CPU is not accounted (empty)."""
    from project.tasks import noop, plain_noop, results_noop

    if case == "plain":
        return {case: drain("plain", n, lambda: [plain_noop.apply_async() for _ in range(n)])}
    if case == "dcr":
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {DCR_TABLE}")
        sample = drain("dcr", n, lambda: [results_noop.apply_async() for _ in range(n)], {"BENCH_RESULTS": "1"})
        dcr_recorded(n)
        return {case: sample}
    if case in ("supervised", "strict"):
        reset()
        env = {"SUPERVISOR_STRICT_FINISH": "1" if case == "strict" else "0"}
        return {case: drain(case, n, lambda: [noop.delay() for _ in range(n)], env, lambda: runs_recorded(n))}
    if case == "procrastinate":
        m = peer.measure(peer_dsn, n, LOGS)
        return {
            "procrastinate": (m["one_rate"], m["one_dispatch_ms"] / 1000, {}),
            "procrastinate_batch": (m["batch_rate"], m["batch_dispatch_ms"] / 1000, {}),
        }
    raise ValueError(f"unknown overhead case {case!r}")


def machine_facts() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from celery import current_app

    facts: dict[str, Any] = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        facts["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        facts["cpu"] = "?"
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        facts["postgresql"] = cursor.fetchone()[0].split()[0]
    with current_app.connection_for_write() as conn:
        conn.ensure_connection()
        facts["rabbitmq"] = conn.connection.server_properties.get("version", "?")
    for dist in ("celery", "django-celery-results", "procrastinate"):
        try:
            facts[dist] = dist_version(dist)
        except PackageNotFoundError:
            facts[dist] = None
    return facts


def bench_overhead(n: int, rounds: int, cases: list[str]) -> dict[str, Any]:
    """``rounds`` rounds of ``n`` no-op tasks per case, the cases taking turns within each round (the
    order rotated from one round to the next); medians, and ratios paired round by round."""
    from project.tasks import noop

    skipped: dict[str, str] = {}
    peer, peer_dsn = None, None
    if "dcr" in cases and (why := prepare_dcr()):
        skipped["dcr"] = why
    if "procrastinate" in cases:
        peer, peer_dsn, why = prepare_procrastinate()
        if why:
            skipped["procrastinate"] = skipped["procrastinate_batch"] = why
    steps = [c for c in cases if c not in skipped]
    samples: dict[str, list[tuple[float, float, dict[str, float]]]] = {}
    for r in range(rounds):
        order = steps[r % len(steps) :] + steps[: r % len(steps)]
        for case in order:
            for key, sample in overhead_round(case, n, peer, peer_dsn).items():
                samples.setdefault(key, []).append(sample)
                print(
                    f"overhead round {r + 1}/{rounds} {key}: {sample[0]:.0f}/s, {sample[1] * 1000:.3f} ms", flush=True
                )
    table: dict[str, dict[str, Any]] = {}
    for key in OVERHEAD_CASES:
        if key not in samples:
            continue
        rates = [s[0] for s in samples[key]]
        row: dict[str, Any] = {
            "label": OVERHEAD_CASES[key],
            "rates": rates,
            "rate": statistics.median(rates),
            "dispatch_ms": statistics.median(s[1] * 1000 for s in samples[key]),
            "cpu_ms": {
                role: statistics.median(s[2][role] for s in samples[key]) for role in CPU_ROLES if samples[key][0][2]
            },
        }
        for ref in ("plain", "dcr"):
            if ref in samples:
                row[f"vs_{ref}"] = statistics.median(
                    a / b for a, b in zip(rates, [s[0] for s in samples[ref]], strict=True)
                )
        table[key] = row
    targets = [
        {"case": case, "reference": ref, "at_least": at_least, "ratio": table[case][f"vs_{ref}"]}
        for case, ref, at_least in OVERHEAD_TARGETS
        if case in table and f"vs_{ref}" in table[case]
    ]
    # Statements per run, outside the timed rounds.
    reset()
    connection.queries_log.clear()
    with CaptureQueriesContext(connection) as ctx:
        run_id = noop.delay().run_id
    dispatch_statements = len(ctx.captured_queries)
    claim_ctx = CaptureQueriesContext(connection)
    with claim_ctx:
        runs.claim(run_id, 1, "bench")
        runs.finish_success(run_id, 1, "bench")
    reset()
    return {
        "n": n,
        "rounds": rounds,
        "cases": table,
        "skipped": skipped,
        "targets": targets,
        "machine": machine_facts(),
        "dispatch_statements": dispatch_statements,
        "claim_finish_statements": [q["sql"].split()[0] for q in claim_ctx.captured_queries],
    }


# ------------------------------------------------------------------ 1. recovery after a crash


def bench_recovery(trials: int, broker: str = RABBIT) -> dict[str, Any]:
    from project.tasks import slow_job

    reset()
    env = {"CELERY_BROKER_URL": broker}
    sup = spawn_supervisor("bench-supervisor", LOGS, env)
    workers = [spawn_worker(f"rw{i}", LOGS, env) for i in range(2)]
    latencies: list[float] = []
    executions_ok = True
    try:
        for w in workers:
            w.wait_for_output("ready.", 60)
        for trial in range(trials):
            run_id = slow_job.delay(6, 0.4, f"trial{trial}").run_id
            run = wait_until(
                lambda run_id=run_id: SupervisedRun.objects.filter(
                    pk=run_id, status="running", checkpoint__gte=1
                ).first(),
                60,
                what="the run to start",
            )
            assert run is not None
            victim = next(w for w in workers if run.worker.startswith(w.name + "@"))
            killed = time.time()
            victim.kill()
            second = wait_until(
                lambda run_id=run_id: RunAttempt.objects.filter(
                    run_id=run_id, number=2, started_at__isnull=False
                ).first(),
                60,
                what="attempt 2",
            )
            assert second is not None and second.started_at is not None
            latencies.append(second.started_at.timestamp() - killed)
            wait_until(lambda run_id=run_id: SupervisedRun.objects.filter(pk=run_id, status="succeeded").exists(), 60)
            executions_ok &= Execution.objects.filter(run_id=run_id).count() == 1
            replacement = spawn_worker(f"rw{trial + 2}", LOGS, env)
            workers[workers.index(victim)] = replacement
            replacement.wait_for_output("ready.", 60)
    finally:
        for w in [sup, *workers]:
            w.stop()
    bound = float(SUPERVISION["SUPERVISOR_LEASE_TIMEOUT"]) + float(SUPERVISION["SUPERVISOR_SWEEP_INTERVAL"])
    return {
        "trials": trials,
        "latencies": latencies,
        "p50": statistics.median(latencies),
        "p99": pct(latencies, 99),
        "max": max(latencies),
        "bound": bound,
        "ratio_p99": pct(latencies, 99) / bound,
        "lost": 0,
        "duplicates": 0 if executions_ok else "yes",
    }


# ------------------------------------------------------------------ 1b. plain Celery in the same harness


def plain_case(label: str, task_name: str, broker: str, fault: str, observe: float) -> dict[str, Any]:
    """Run one 6 s plain task, inflict ``fault`` mid-run, and watch for ``observe`` seconds.

    The second worker starts only once the victim holds the message, so the broker cannot hand it
    to the second one first; it is ready before the fault.
    """
    from celery import current_app

    Execution.objects.all().delete()
    env = {"CELERY_BROKER_URL": broker}
    purge(broker=broker)
    victim = spawn_worker("pv", LOGS, env, concurrency=1)
    other: Proc | None = None
    try:
        victim.wait_for_output("ready.", 60)
        with current_app.connection_for_write(broker) as conn:
            current_app.send_task(task_name, args=[6.0, label], connection=conn)
        wait_until(lambda: "received" in victim.output(), 30, what="the victim to receive")
        other = spawn_worker("po", LOGS, env, concurrency=1)
        other.wait_for_output("ready.", 60)
        faulted = time.time()
        if fault == "kill":
            victim.kill()
        elif fault == "child":
            for pid in victim.children():
                os.kill(pid, 9)
        elif fault == "stop":
            victim.signal_group(19)
        deadline = time.monotonic() + observe
        first: float | None = None
        while time.monotonic() < deadline:
            rows = list(Execution.objects.filter(label=label).values_list("created_at", flat=True))
            if rows and first is None:
                first = rows[0].timestamp() - faulted
            time.sleep(0.2)
        during = Execution.objects.filter(label=label).count()
        if fault == "stop":
            victim.signal_group(18)  # wake the hung worker: does it run the task a second time?
            time.sleep(8.0)
        total = Execution.objects.filter(label=label).count()
    finally:
        victim.stop()
        if other is not None:
            other.stop()
    return {
        "case": label,
        "executions_in_window": during,
        "executions_total": total,
        "lost": total == 0,
        "duplicated": total > 1,
        "completed_after": first,
        "window": observe,
    }


def bench_plain(observe: float) -> list[dict[str, Any]]:
    reset()
    cases = [
        ("defaults, RabbitMQ, worker SIGKILL", "project.tasks.plain_sleep", RABBIT, "kill"),
        ("acks_late+reject_on_worker_lost, RabbitMQ, worker SIGKILL", "project.tasks.plain_sleep_late", RABBIT, "kill"),
        ("acks_late+reject_on_worker_lost, Redis, worker SIGKILL", "project.tasks.plain_sleep_late", REDIS, "kill"),
        ("defaults, RabbitMQ, pool child SIGKILL (OOM)", "project.tasks.plain_sleep", RABBIT, "child"),
        (
            "acks_late+reject_on_worker_lost, RabbitMQ, pool child SIGKILL",
            "project.tasks.plain_sleep_late",
            RABBIT,
            "child",
        ),
        ("acks_late, RabbitMQ, worker SIGSTOP then SIGCONT", "project.tasks.plain_sleep_late", RABBIT, "stop"),
    ]
    return [plain_case(label, task, broker, fault, observe) for label, task, broker, fault in cases]


# ------------------------------------------------------------------ 3. sweep scaling


def clone_rows(template_id: int, n: int, overrides: dict[str, str]) -> None:
    """INSERT … SELECT n copies of a template row (fast; follows the model's columns as they are). Each
    copy gets a Celery id of its own, as every run has (the column is unique)."""
    cols = [f.column for f in SupervisedRun._meta.concrete_fields if f.column != "id"]
    overrides = {"task_id": "gen_random_uuid()::text", **overrides}
    select = [overrides.get(c, c) for c in cols]
    table = SupervisedRun._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(select)} "
            f"FROM {table}, generate_series(1, %s) AS g WHERE id = %s",
            [n, template_id],
        )


def template_run(status: str) -> int:
    policy = runs.RunPolicy(max_attempts=3, lease_timeout=2, start_timeout=2, max_runtime=None)
    run = runs.create_run("project.tasks.noop", [], {}, policy, countdown=3600)
    assert run is not None
    SupervisedRun.objects.filter(pk=run.pk).update(status=status, next_check_at=None)
    return run.pk


def bench_sweep(sizes: list[int], stale: int) -> list[dict[str, Any]]:
    """One sweep over ``stale`` expired leases among ``size`` finished runs, timed from the sweep's
    start until every lost attempt is recovered *and* its new attempt published (the sweep publishes
    each batch when it commits, through one producer); the queue is then checked to hold them all."""
    from supervisor_app.supervisor import run_sweep

    results = []
    for size in sizes:
        reset()
        done = template_run("succeeded")
        clone_rows(done, size - 1, {"finished_at": "now() - (g || ' seconds')::interval"})
        run_sweep("bench-warm-up")  # a supervisor sweeps every interval: connections and pools are warm
        running = template_run("running")
        clone_rows(
            running,
            stale - 1,
            {"lease_expires_at": "now() - interval '1 minute'", "worker": "'ghost'", "started_at": "now()"},
        )
        SupervisedRun.objects.filter(pk=running).update(lease_expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc))
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {SupervisedRun._meta.db_table}")
        qs = SupervisedRun.objects.stale().select_for_update(skip_locked=True, of=("self",)).order_by()[:500]
        with transaction.atomic(), connection.cursor() as cursor:
            sql, params = qs.query.sql_with_params()
            cursor.execute("EXPLAIN " + sql, params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        purge()
        t = time.perf_counter()
        report = run_sweep("bench")
        elapsed = time.perf_counter() - t
        in_queue = queue_depth()
        assert report.recovered == report.published == in_queue == stale, (report, in_queue)
        results.append(
            {
                "history": size,
                "stale": stale,
                "recovered": report.recovered,
                "published": report.published,
                "in_queue": in_queue,
                "seconds": elapsed,
                "plan": plan,
                "uses_partial_index": "supervisor_run_lease_active" in plan,
            }
        )
        purge()
    return results


# ------------------------------------------------------------------ 4. heartbeat cost


def bench_heartbeat(counts: list[int]) -> list[dict[str, Any]]:
    results = []
    for n in counts:
        reset()
        first = template_run("running")
        clone_rows(first, n - 1, {"lease_expires_at": "now() + interval '1 minute'"})
        leases = [(pk, 1) for pk in SupervisedRun.objects.values_list("pk", flat=True)]
        connection.queries_log.clear()  # a full log (9,000 entries) would make the capture empty
        with CaptureQueriesContext(connection) as ctx:
            t = time.perf_counter()
            repeats = 5
            for _ in range(repeats):
                states = runs.renew_leases(leases)
            batched = (time.perf_counter() - t) / repeats
        assert all(s.held for s in states.values())
        per_run = None
        if n <= 1000:
            t = time.perf_counter()
            for run_id, attempt in leases:
                runs.heartbeat(run_id, attempt)
            per_run = time.perf_counter() - t
        results.append(
            {
                "leases": n,
                "statements": len(ctx.captured_queries) // repeats,
                "batched_ms": batched * 1000,
                "per_run_ms": None if per_run is None else per_run * 1000,
            }
        )
    return results


# ------------------------------------------------------------------ 5. beat at scale


def queue_depth(queue: str = QUEUE) -> int:
    from celery import current_app

    with current_app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def bench_beat(n: int, beats: int, scheduler: str, task: str) -> dict[str, Any]:
    """``n`` schedules due at the same minute boundary; time until all are recorded and published."""
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    from project.processes import spawn_beat

    reset()
    clear_schedules()
    # Start the beats early enough to load everything before the minute boundary; the schedules
    # start at that boundary, so it is their first slot for both schedulers.
    now = time.time()
    boundary = (int(now // 60) + 1) * 60
    if boundary - now < 25:
        boundary += 60
    # django-celery-beat's own scheduler never catches up (and mishandles start_time here), so it
    # gets none; ours would otherwise record the minute before the boundary too.
    first_slot = datetime.fromtimestamp(boundary, tz=timezone.utc) if scheduler.startswith("supervisor_app") else None
    every_minute = CrontabSchedule.objects.create(minute="*", hour="*", timezone="UTC")
    PeriodicTask.objects.bulk_create(
        [
            PeriodicTask(name=f"bench-{i}", task=task, crontab=every_minute, enabled=True, start_time=first_slot)
            for i in range(n)
        ],
        batch_size=2000,
    )
    tag = "sup" if scheduler.startswith("supervisor_app") else "dcb"
    procs = [spawn_beat(f"beat-{tag}{i}", LOGS, {}, scheduler=scheduler) for i in range(beats)]
    supervised = scheduler.startswith("supervisor_app")
    slot = datetime.fromtimestamp(boundary, tz=timezone.utc)

    def done() -> int:
        if supervised:  # recorded and published
            return min(SupervisedRun.objects.filter(scheduled_for=slot).count(), queue_depth())
        return queue_depth()

    try:
        wait_until(lambda: time.time() >= boundary, 200, 0.2, "the minute boundary")
        finished_at = None
        while time.time() < boundary + 60:
            if done() >= n:
                finished_at = time.time()
                break
            time.sleep(0.2)
        recorded = done()
        published = queue_depth()
        duplicates = None
        if supervised:
            per_slot = SupervisedRun.objects.filter(scheduled_for=slot).values("periodic_task_id")
            duplicates = per_slot.annotate(c=models.Count("id")).filter(c__gt=1).count()
    finally:
        for p in procs:
            p.stop()
    clear_schedules()
    purge()
    return {
        "scheduler": scheduler.split(":")[-1],
        "schedules": n,
        "beats": beats,
        "recorded_within_minute": recorded,
        "published": published,
        "seconds_to_all": None if finished_at is None else finished_at - boundary,
        "duplicates": duplicates,
    }


# ------------------------------------------------------------------ 6. beat schedule load

BEAT_LOAD_ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]
SCHEDULERS = {
    "ours": "supervisor_app.schedulers:SupervisedScheduler",
    "theirs": "django_celery_beat.schedulers:DatabaseScheduler",
}


def clear_schedules() -> None:
    """Delete every schedule and crontab in two statements: ``QuerySet.delete()`` sends a signal per
    row, each a write of django-celery-beat's change marker (minutes for 10,000 rows here)."""
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    from supervisor_app.models import SupervisionPolicy

    with connection.cursor() as cursor:
        # What Django would do row by row: runs keep their history without the schedule (SET_NULL),
        # policies go with it (CASCADE).
        cursor.execute(
            f"UPDATE {SupervisedRun._meta.db_table} SET periodic_task_id = NULL WHERE periodic_task_id IS NOT NULL"
        )
        cursor.execute(f"DELETE FROM {SupervisionPolicy._meta.db_table}")
        cursor.execute(f"DELETE FROM {PeriodicTask._meta.db_table}")
        cursor.execute(f"DELETE FROM {CrontabSchedule._meta.db_table}")


def beat_load_rows(n: int, crontabs: int) -> None:
    """``n`` enabled schedules of a supervised task over ``crontabs`` crontabs (one: every minute, UTC;
    more: a mix as admins write them, over four time zones)."""
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    clear_schedules()
    if crontabs == 1:
        rows = [CrontabSchedule(minute="*", hour="*", timezone="UTC")]
    else:
        rows = [
            CrontabSchedule(
                minute=str(i % 60),
                hour=["*", "*/2", "8-18", str(i % 24)][i // 4 % 4],
                day_of_week="1-5" if i % 5 == 0 else "*",
                day_of_month="1" if i % 7 == 0 else "*",
                timezone=BEAT_LOAD_ZONES[i % 4],
            )
            for i in range(crontabs)
        ]
    crons = CrontabSchedule.objects.bulk_create(rows)
    PeriodicTask.objects.bulk_create(
        [
            PeriodicTask(name=f"load-{i}", task="project.tasks.noop", crontab=crons[i % len(crons)], enabled=True)
            for i in range(n)
        ],
        batch_size=2000,
    )


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_beat_load(cases: list[tuple[int, int]], processes: int, reloads: int) -> list[dict[str, Any]]:
    """Schedule load (the full read and the heap) of our scheduler and django-celery-beat's, on the
    same rows: per case and scheduler, ``processes`` fresh processes (the two schedulers taking
    turns), each timing a start and then ``reloads`` reloads."""
    import subprocess

    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    reset()
    results = []
    for n, crontabs in cases:
        started = time.perf_counter()
        beat_load_rows(n, crontabs)
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {PeriodicTask._meta.db_table}, {CrontabSchedule._meta.db_table}")
        setup = time.perf_counter() - started
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SCHEDULERS}
        for _ in range(processes):
            for side, scheduler in SCHEDULERS.items():
                child = subprocess.run(
                    [sys.executable, str(ROOT / "bench" / "beat_load.py"), scheduler, str(reloads)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if child.returncode:
                    raise RuntimeError(f"bench/beat_load.py {scheduler} failed:\n{child.stderr}")
                runs[side].append(json.loads(child.stdout.splitlines()[-1]))
        case: dict[str, Any] = {
            "schedules": n,
            "crontabs": crontabs,
            "zones": len(BEAT_LOAD_ZONES) if crontabs > 1 else 1,
            "processes": processes,
            "reloads": reloads,
            "setup_seconds": setup,
            "case_seconds": time.perf_counter() - started,
        }
        for side, scheduler in SCHEDULERS.items():
            case[side] = {
                "scheduler": scheduler.split(":")[-1],
                "entries": runs[side][-1]["entries"],
                "start": spread([r["seconds"][0] for r in runs[side]]),
                "seconds": [r["seconds"] for r in runs[side]],
            }
            if reloads:
                case[side]["reload"] = spread([s for r in runs[side] for s in r["seconds"][1:]])
        for kind in ("start", "reload") if reloads else ("start",):
            case[f"ratio_{kind}"] = case["ours"][kind]["median"] / case["theirs"][kind]["median"]
        results.append(case)
        print("beat-load", {k: v for k, v in case.items() if k not in SCHEDULERS}, flush=True)
    clear_schedules()
    return results


# ------------------------------------------------------------------ report


def plots(results: dict[str, Any], out: Path = OUT) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "overhead" in results:
        rows = list(results["overhead"]["cases"].items())
        fig, ax = plt.subplots(figsize=(8, 4.4))
        y = range(len(rows))
        rates = [r["rate"] for _, r in rows]
        low = [r["rate"] - min(r["rates"]) for _, r in rows]
        high = [max(r["rates"]) - r["rate"] for _, r in rows]
        colours = ["#1565c0" if key in ("supervised", "strict") else "#9e9e9e" for key, _ in rows]
        ax.barh(y, rates, xerr=[low, high], color=colours, capsize=3)
        ax.set_yticks(list(y), [r["label"].replace("`", "") for _, r in rows], fontsize=8)
        ax.invert_yaxis()
        for i, (_, r) in enumerate(rows):
            if "vs_plain" in r:
                ax.text(max(r["rates"]), i, f"  {r['vs_plain']:.2f}× plain", va="center", fontsize=8)
        table = results["overhead"]["cases"]
        for (case, ref, at_least), colour in zip(OVERHEAD_TARGETS, ["#c62828", "#ef6c00", "#6a1b9a"], strict=True):
            if case in table and ref in table:
                label = f"target: {at_least:g}× {'plain' if ref == 'plain' else 'dcr'} ({case})"
                ax.axvline(at_least * table[ref]["rate"], color=colour, linestyle="--", lw=1, label=label)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.2), ncol=3, frameon=False)
        ax.set_xlim(right=max(max(r["rates"]) for _, r in rows) * 1.35)
        ax.set_xlabel(f"no-op tasks per second, median of {results['overhead']['rounds']} rounds (min–max)")
        fig.tight_layout()
        fig.savefig(out / "overhead.png", dpi=110)
        files.append("overhead.png")
    if "recovery" in results:
        rec = results["recovery"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(rec["latencies"], bins=15, color="#1565c0")
        ax.axvline(rec["bound"], color="#c62828", linestyle="--", label="lease timeout + sweep interval")
        ax.set_xlabel("seconds from SIGKILL to the next attempt starting elsewhere")
        ax.set_ylabel("trials")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=110)
        files.append("recovery.png")
    if "sweep" in results:
        rows = results["sweep"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["history"] for r in rows], [r["seconds"] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("finished runs in history")
        ax.set_ylabel(f"sweep seconds ({rows[0]['stale']} expired leases)")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=110)
        files.append("sweep.png")
    if "heartbeat" in results:
        rows = results["heartbeat"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["leases"] for r in rows], [r["batched_ms"] for r in rows], marker="o", label="one statement (ours)")
        per = [r for r in rows if r["per_run_ms"] is not None]
        ax.plot([r["leases"] for r in per], [r["per_run_ms"] for r in per], marker="x", label="one statement per run")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leases held by one worker process")
        ax.set_ylabel("ms per heartbeat interval")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "heartbeat.png", dpi=110)
        files.append("heartbeat.png")
    plt.close("all")
    return files


def markdown(results: dict[str, Any]) -> str:
    generated = results["generated"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {generated['at']} UTC in {generated['seconds']:.0f} s, on this "
        f"machine ({os.cpu_count()} cores), PostgreSQL + RabbitMQ (+ Redis where named) on loopback. "
        f"Supervision: heartbeat {SUPERVISION['SUPERVISOR_HEARTBEAT_INTERVAL']} s, lease "
        f"{SUPERVISION['SUPERVISOR_LEASE_TIMEOUT']} s, sweep {SUPERVISION['SUPERVISOR_SWEEP_INTERVAL']} s. "
        "Workers: prefork, prefetch multiplier 1.",
        "",
    ]
    if "recovery" in results:
        r = results["recovery"]
        ok = "met" if r["p99"] <= r["bound"] + 0.5 else "**missed**"
        lines += [
            "## 1. Recovery after a worker is SIGKILLed mid-run (supervised)",
            "",
            f"{r['trials']} trials, RabbitMQ: kill → next attempt started on another worker.",
            "",
            "| p50 | p99 | max | lease + sweep | p99 / (lease + sweep) | runs lost | duplicated completions |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {r['p50']:.2f} s | {r['p99']:.2f} s | {r['max']:.2f} s | {r['bound']:.1f} s | {r['ratio_p99']:.2f} | "
            f"{r['lost']} | {r['duplicates']} |",
            "",
            f"Target p99 ≤ lease + sweep + 0.5 s: {ok}. ![recovery](recovery.png)",
            "",
        ]
    if "plain" in results:
        lines += [
            "### Plain Celery in the same harness (one 6 s task; the fault comes once a second worker is ready)",
            "",
            "| case | executions within the window | total (after SIGCONT for the hang) | outcome |",
            "| --- | --- | --- | --- |",
        ]
        for c in results["plain"]:
            if c["lost"]:
                outcome = f"**lost** (not run again within {c['window']:.0f} s)"
            elif c["duplicated"]:
                outcome = "**ran twice**"
            elif c["executions_in_window"] == 0:
                outcome = f"not recovered within {c['window']:.0f} s"
            else:
                outcome = f"completed {c['completed_after']:.1f} s after the fault"
            lines.append(f"| {c['case']} | {c['executions_in_window']} | {c['executions_total']} | {outcome} |")
        lines.append("")
    if "overhead" in results:
        lines += overhead_markdown(results["overhead"])
    if "sweep" in results:
        lines += [
            "## 3. Sweep scaling",
            "",
            "| finished runs in history | expired leases | recovered | sweep time | partial index used |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in results["sweep"]:
            lines.append(
                f"| {r['history']:,} | {r['stale']:,} | {r['recovered']:,} | {r['seconds']:.2f} s | "
                f"{'yes' if r['uses_partial_index'] else 'no'} |"
            )
        if max(r["seconds"] for r in results["sweep"]) >= 0.5:
            lines += [
                "",
                "1,000 recovered and re-enqueued in < 0.5 s (issue 15): **missed** when the time includes "
                "publishing them. A batch of 500 is a handful of statements (the locked rows read, one "
                "conditional UPDATE per outcome, one INSERT of the new attempts from arrays); its messages are "
                "written in one batch on commit (`supervisor_app/amqp_batch.py`, about 0.1-0.2 ms a message "
                "here); then the recovered runs are read back for the `run_recovered` signal (alerts). Each "
                "is about a third of the time here, most of it Python (the ORM's model instances, the "
                "messages). Flat in history size: met.",
            ]
        else:
            lines += [
                "",
                "1,000 recovered and re-enqueued (recorded and published) in < 0.5 s: met. Flat in history size: met.",
            ]
        lines += [
            "",
            "Plan of the batch query at the largest size:",
            "",
            "```",
            results["sweep"][-1]["plan"],
            "```",
            "",
        ]
        lines += ["![sweep](sweep.png)", ""]
    if "heartbeat" in results:
        lines += [
            "## 4. Heartbeat cost per interval (one worker process)",
            "",
            "| leases held | statements | batched renewal | one statement per run |",
            "| --- | --- | --- | --- |",
        ]
        for r in results["heartbeat"]:
            per = "-" if r["per_run_ms"] is None else f"{r['per_run_ms']:.1f} ms"
            lines.append(f"| {r['leases']:,} | {r['statements']} | {r['batched_ms']:.2f} ms | {per} |")
        lines += ["", "![heartbeat](heartbeat.png)", ""]
    if "beat" in results:
        lines += [
            "## 5. Beat at scale: schedules due at the same minute boundary",
            "",
            "| scheduler | schedules | beats | recorded/sent within 60 s | messages published | time to all | duplicate runs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in results["beat"]:
            took = "not within 60 s" if r["seconds_to_all"] is None else f"{r['seconds_to_all']:.1f} s"
            dup = "-" if r["duplicates"] is None else str(r["duplicates"])
            lines.append(
                f"| {r['scheduler']} | {r['schedules']:,} | {r['beats']} | {r['recorded_within_minute']:,} | "
                f"{r['published']:,} | {took} | {dup} |"
            )
        lines += [
            "",
            "Time to all: until every slot is recorded *and* its message is in the queue (supervised), or every "
            "message is in the queue (DatabaseScheduler), counted from the minute boundary.",
            "",
            "Target: 10,000 supervised schedules, two beats, all recorded and published in < 10 s.",
            "",
        ]
        ours = results["beat"][0]
        how = (
            "Each beat takes every supervised entry due at a tick off its heap (up to 1,000 a tick) and records "
            "their slots with one `INSERT … SELECT FROM unnest(…) ON CONFLICT (periodic_task, scheduled_for) DO "
            "NOTHING RETURNING` per 500 rows (one array per column), then publishes only the rows it inserted, "
            "through one producer. The beats share the work without talking: while one publishes a chunk it "
            "won, the other inserts the next; a slot the other beat took costs an index lookup in its insert, "
            "not a transaction. Schedules with an overlap policy (skip, queue_one, replace) and missed slots keep the "
            "one-by-one path. The messages go out in batches of 1,000 (`supervisor_app/amqp_batch.py`: the first "
            "of each kind through Celery and kombu, the others encoded into the same frames and written "
            "together), about 0.1-0.2 ms a message here, split between the two beats, on two cores shared "
            "with PostgreSQL and RabbitMQ."
        )
        if ours["seconds_to_all"] is None or ours["seconds_to_all"] >= 10:
            lines += [f"**Missed.** {how}", ""]
        else:
            lines += [f"**Met.** {how}", ""]
    if "beat_load" in results:
        lines += beat_load_markdown(results["beat_load"])
    if "bulk" in results:
        lines += bulk_markdown(results["bulk"])
    return "\n".join(lines) + "\n"


def cpu_budget_lines(o: dict[str, Any]) -> list[str]:
    """What each worker target allows in CPU per task, next to what the case spends.

    Every Celery case keeps about the same share of the two cores busy (the "cores busy" column:
    throughput times CPU per task), so a case's throughput relative to plain Celery is close to the
    inverse of its CPU relative to plain's: a ratio target is a CPU budget."""
    table = o["cases"]
    lines = []
    for t in o["targets"]:
        case, ref = table.get(t["case"], {}), table.get(t["reference"], {})
        if not case.get("cpu_ms") or not ref.get("cpu_ms"):
            continue
        spent, base = sum(case["cpu_ms"].values()), sum(ref["cpu_ms"].values())
        allowed = base / t["at_least"]
        extra_pg = case["cpu_ms"]["PostgreSQL"] - ref["cpu_ms"]["PostgreSQL"]
        worker = ("worker main", "pool processes")
        extra_worker = sum(case["cpu_ms"][role] - ref["cpu_ms"][role] for role in worker)
        lines.append(
            f"- {case['label']} ≥ {t['at_least']}× {ref['label']}: measured {t['ratio']:.2f}×, and "
            f"{base / spent:.2f}× by CPU ({spent:.3f} ms a task against {base:.3f}). The target allows "
            f"{allowed:.3f} ms a task"
            + (
                f", {allowed - base:.3f} more than {ref['label']}; PostgreSQL alone spends {extra_pg:.3f} more, "
                f"and the worker's own processes {extra_worker:.3f} more"
                if allowed > base
                else ""
            )
            + "."
        )
    if lines:
        lines = ["CPU budget of each target (its ratio, read as CPU per task):", "", *lines, ""]
    return lines


def overhead_markdown(o: dict[str, Any]) -> list[str]:
    m = o["machine"]
    table = o["cases"]
    lines = [
        "## 2. Per-task overhead: no-op tasks, side by side with the peers",
        "",
        f"{o['rounds']} round(s) of {o['n']:,} no-op tasks per case, the cases taking turns within each round "
        "(the order rotated from round to round); medians. Celery cases: the queue is filled first, then one "
        "prefork worker (concurrency 2, prefetch multiplier 1, RabbitMQ) is timed from its `ready.` line to the "
        "last task: its last `succeeded in` line, or for supervised runs the moment the last run is recorded "
        "`succeeded` (max `finished_at`; every run checked). Procrastinate: the jobs are deferred first, then "
        "one worker (concurrency 2, sync no-op task) from the first job's `started` event to the last one's "
        "`succeeded` event, in its own database on the same server. Ratios: the median of the per-round ratios.",
        "",
        "| | throughput (per s) | min–max | vs plain | vs dcr + track_started | dispatch per task |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.values():
        vs = [f"{row[k]:.2f}×" if k in row else "-" for k in ("vs_plain", "vs_dcr")]
        lines.append(
            f"| {row['label']} | {row['rate']:,.0f} | {min(row['rates']):,.0f}–{max(row['rates']):,.0f} | "
            f"{vs[0]} | {vs[1]} | {row['dispatch_ms']:.3f} ms |"
        )
    lines.append("")
    measured = {key: row for key, row in table.items() if row.get("cpu_ms")}
    if measured:
        lines += [
            "CPU time per task, by process, from the worker's `ready.` to its last task (milliseconds of user + "
            "system time per task, medians; `/proc`): steadier than throughput on a shared machine, and where "
            "each case's cost goes.",
            "",
            "| | " + " | ".join(CPU_ROLES) + " | total | cores busy |",
            "| --- |" + " --- |" * (len(CPU_ROLES) + 2),
        ]
        for row in measured.values():
            cells = [f"{row['cpu_ms'][role]:.3f}" for role in CPU_ROLES]
            total = sum(row["cpu_ms"].values())
            busy = row["rate"] * total / 1000
            lines.append(f"| {row['label']} | {' | '.join(cells)} | {total:.3f} | {busy:.2f} |")
        lines += ["", *cpu_budget_lines(o)]
    reasons: dict[str, list[str]] = {}
    for key, why in o["skipped"].items():
        reasons.setdefault(why, []).append(OVERHEAD_CASES[key])
    for why, labels in reasons.items():
        lines.append(f"- Skipped: {'; '.join(labels)} ({why}).")
    if reasons:
        lines.append("")
    lines += ["Targets (issue 15, ratios of this run):", ""]
    if not o["targets"]:
        lines.append("- none measured: a case they compare was not run.")
    for t in o["targets"]:
        verdict = "PASS" if t["ratio"] >= t["at_least"] else "**FAIL**"
        lines.append(
            f"- {OVERHEAD_CASES[t['case']]} ≥ {t['at_least']}× {OVERHEAD_CASES[t['reference']]}: "
            f"{t['ratio']:.2f}× — {verdict}"
        )
    lines += [
        "",
        f"Statements per supervised run: dispatch {o['dispatch_statements']}; claim + finish (strict) "
        f"{len(o['claim_finish_statements'])} ({', '.join(o['claim_finish_statements'])}).",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), PostgreSQL {m['postgresql']}, RabbitMQ {m['rabbitmq']}, "
        f"Python {m['python']}, Celery {m['celery']}, django-celery-results {m['django-celery-results'] or '-'}, "
        f"Procrastinate {m['procrastinate'] or '-'}; the servers share the cores with the workers.",
        "",
        f"Command: `{o['command']}`",
        "",
        "What bounds each figure (the two cores run the workers, PostgreSQL and RabbitMQ alike, so every "
        "statement's server CPU comes out of the workers' time; the CPU table above says how much). Plain "
        "Celery: the consumer process (broker frames, Celery's strategy) and the broker round trip. "
        "django-celery-results with `track_started`: two writes per task (STARTED, then SUCCESS), each a "
        "commit that waits for the WAL flush. Supervised (default): one synchronous round trip per task, the "
        "claim (a call of `supervisor_claim_v1`, planned once per session, sent through the driver's own "
        "cursor; it updates the run and inserts its attempt row, one transaction), plus the task's share of "
        "the batched success (one statement per batch, still an update of the run and of its attempt row per "
        "task); both with asynchronous commit. The pool process waits for the claim's reply before the body "
        "(the claim is what keeps a duplicate delivery from running the body twice). Strict: the claim and the "
        "success, two round trips per task. Procrastinate: a fetch and a finish per job, each a function call "
        "whose commit waits for the WAL flush. Every Celery case keeps about the same share of the two cores "
        "busy (the CPU table's last column), so each ratio to plain Celery is close to the inverse of its CPU "
        "ratio, and a ratio target is a CPU budget (above): on this machine the claim's write transaction costs "
        "PostgreSQL alone more than 0.8x leaves for all of supervision, wherever the claim is sent from. "
        "Claiming in the worker's consumer instead of the pool process, in batches, was tried and measured "
        "slower (bench/experiments/README.md).",
        "",
        "![per-task overhead](overhead.png)",
        "",
    ]
    return lines


def beat_load_markdown(cases: list[dict[str, Any]]) -> list[str]:
    def cell(stats: dict[str, float]) -> str:
        return f"{stats['median']:.2f} s ({stats['min']:.2f}–{stats['max']:.2f})"

    kinds = ["start"] + (["reload"] if "ratio_reload" in cases[0] else [])
    head = "| schedules | crontabs | entries loaded (ours / theirs) |"
    for kind in kinds:
        head += f" {kind}: SupervisedScheduler | {kind}: DatabaseScheduler | {kind}: ours / theirs |"
    lines = [
        "## 6. Beat schedule load: SupervisedScheduler and DatabaseScheduler on the same rows",
        "",
        head,
        "|" + " --- |" * (3 + 3 * len(kinds)),
    ]
    for c in cases:
        crontabs = "1, every minute (UTC)" if c["crontabs"] == 1 else f"{c['crontabs']} in {c['zones']} time zones"
        row = f"| {c['schedules']:,} | {crontabs} | {c['ours']['entries']:,} / {c['theirs']['entries']:,} |"
        for kind in kinds:
            row += f" {cell(c['ours'][kind])} | {cell(c['theirs'][kind])} | {c[f'ratio_{kind}']:.2f} |"
        lines.append(row)
    first = cases[0]
    reloads = (
        f", then {first['reloads']} reload(s) in the same process (caches warm, as after a PeriodicTask change)"
        if first["reloads"]
        else ""
    )
    lines += [
        "",
        "Load: `scheduler.schedule` with the initial read forced (`all_as_schedule()`, as at start, after any "
        "PeriodicTask change and at the 5-minute full sync), then `populate_heap()`. Median (min–max) of "
        f"{first['processes']} fresh processes per scheduler and case (start: nothing cached, the two schedulers "
        f"taking turns){reloads}. The same enabled crontab schedules of a supervised task "
        "(`project.tasks.noop`), no run history; each scheduler reads them its own way.",
        "",
        "Where the entries loaded differ: DatabaseScheduler leaves out crontabs with a single hour more than 2 h "
        "from the current hour (a quarter of the mixed crontabs have one), so it depends on the time of day; "
        "SupervisedScheduler keeps every supervised schedule, so a restarted beat can apply its catch-up "
        "policy. Ours also reads each schedule's last recorded slot (one index probe) and its policy, and its "
        "start includes finding the supervised tasks (`app.loader.import_default_modules()`).",
        "",
    ]
    return lines


# ------------------------------------------------------------------ 7. bulk dispatch


def bench_bulk(n: int, rounds: int) -> dict[str, Any]:
    """``bench/bulk_dispatch.py`` in a process of its own (a database and a queue of its own)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bulk.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "bulk_dispatch.py"),
                "-n",
                str(n),
                "--rounds",
                str(rounds),
                "--group-n",
                str(min(2000, n)),
                "--json",
                str(path),
            ],
            check=True,
            env={**os.environ, "BENCH_DB": f"{BENCH_DB}_bulk", "BENCH_QUEUE": f"{QUEUE}-bulk"},
        )
        return dict(json.loads(path.read_text()))


def bulk_markdown(bulk: dict[str, Any]) -> list[str]:
    n = bulk["n"]
    total = bulk["bulk_seconds"]
    return [
        "## 7. Bulk dispatch: `dispatch_many`",
        "",
        f"{n:,} no-op runs recorded with one `dispatch_many` call in a transaction, timed until it has committed "
        "and every message has been handed to the broker (the publish runs on commit); the queue is then "
        f"checked to hold {n:,} messages and the table {n:,} queued runs. `bench/bulk_dispatch.py`, "
        f"medians of {len(bulk['rounds'])} rounds.",
        "",
        "| runs | recorded + published | of which INSERT | of which commit + publish | per run "
        "| `.delay()` per run: one by one / 1,000 in one transaction "
        f"| `group` of {bulk.get('group_n', 0):,}, per member: in a transaction / not |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {n:,} | {total:.2f} s | {bulk['record_seconds']:.2f} s | {bulk['publish_seconds']:.2f} s "
        f"| {total / n * 1000:.3f} ms | {bulk['delay_ms_each']:.2f} ms / "
        f"{bulk.get('delay_in_transaction_ms_each', float('nan')):.2f} ms "
        f"| {bulk.get('group_ms_each', float('nan')):.2f} ms / {bulk.get('group_autocommit_ms_each', float('nan')):.2f} ms |",
        "",
        f"Target: 10,000 runs recorded and published in < 1.5 s: {'met' if n >= 10_000 and total < 1.5 else '**missed**'}. "
        "The INSERT is one statement per 5,000 runs (`INSERT … SELECT FROM ROWS FROM (unnest(…), "
        "jsonb_array_elements(…))`: one array, or one JSON document, per column). The messages go out in "
        "batches of 1,000 (`supervisor_app/amqp_batch.py`): the first message of each kind through "
        "Celery and kombu, the others encoded into the same AMQP frames directly and written together, "
        "about 0.1-0.2 ms a message here in Python (building Celery's message, its JSON body and its "
        "header table). `.delay()` one at a time waits for its own commit (the WAL flush) each time. A "
        "Celery `group` applies its members one by one (Celery gives a member's task no way to know the "
        "group's end): each member is one `INSERT … ON CONFLICT (task_id) DO NOTHING` (its frozen id; no "
        "savepoint), and in the caller's transaction the whole group's messages are published together "
        "after the commit; outside one, each member commits (and is published) on its own. For a large "
        "fan-out, `dispatch_many`.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="Small sizes, to check the harness.")
    parser.add_argument("--only", default="overhead,recovery,plain,sweep,heartbeat,beat,beat-load,bulk")
    parser.add_argument("--beat-size", type=int, help="Schedules due at the boundary (default 10,000; 1,000 quick).")
    parser.add_argument("--beat-supervised-only", action="store_true", help="Skip DatabaseScheduler's beat case.")
    parser.add_argument(
        "--beat-load-reloads",
        type=int,
        default=0,
        help="beat-load: reloads timed after the start in each process (caches warm); 0 keeps the case < 90 s.",
    )
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=int(os.environ.get("BENCH_OVERHEAD_ROUNDS", "0")) or None,
        help="overhead: rounds, each case once per round (default 3; 2 quick; env BENCH_OVERHEAD_ROUNDS).",
    )
    parser.add_argument(
        "--overhead-n",
        type=int,
        default=int(os.environ.get("BENCH_OVERHEAD_N", "0")) or None,
        help="overhead: no-op tasks per case and round (default 2,000; 300 quick; env BENCH_OVERHEAD_N).",
    )
    parser.add_argument(
        "--overhead-cases",
        default=os.environ.get("BENCH_OVERHEAD_CASES", "plain,dcr,supervised,strict,procrastinate"),
        help="overhead: the cases, comma-separated, from plain,dcr,supervised,strict,procrastinate.",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="Where results.md, results.json and plots go.")
    parser.add_argument(
        "--render",
        action="store_true",
        help="Measure nothing: write results.md again from the results.json in --out (after a change of its text).",
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        (out / "results.md").write_text(markdown(json.loads((out / "results.json").read_text())))
        return
    only = set(args.only.split(","))
    knobs = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    command = f"{knobs} python bench/run.py {' '.join(sys.argv[1:])}".strip()
    started = time.monotonic()
    results: dict[str, Any] = {}
    if "overhead" in only:
        rounds = args.overhead_rounds or (2 if args.quick else 3)
        n = args.overhead_n or (300 if args.quick else 2000)
        results["overhead"] = bench_overhead(n, rounds, args.overhead_cases.split(","))
        results["overhead"]["command"] = command
        print("overhead", json.dumps(results["overhead"]["cases"], indent=1), flush=True)
    if "recovery" in only:
        results["recovery"] = bench_recovery(3 if args.quick else 20)
        print("recovery p50/p99", results["recovery"]["p50"], results["recovery"]["p99"], flush=True)
    if "plain" in only:
        results["plain"] = bench_plain(8.0 if args.quick else 20.0)
        print("plain", results["plain"], flush=True)
    if "sweep" in only:
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        results["sweep"] = bench_sweep(sizes, 1000)
        print("sweep", [(r["history"], r["seconds"]) for r in results["sweep"]], flush=True)
    if "heartbeat" in only:
        results["heartbeat"] = bench_heartbeat([1, 100, 1000, 10_000])
        print("heartbeat", results["heartbeat"], flush=True)
    if "beat" in only:
        n = args.beat_size or (1000 if args.quick else 10_000)
        results["beat"] = [bench_beat(n, 2, "supervisor_app.schedulers:SupervisedScheduler", "project.tasks.noop")]
        if not args.beat_supervised_only:
            results["beat"].append(
                bench_beat(n, 1, "django_celery_beat.schedulers:DatabaseScheduler", "project.tasks.plain_noop")
            )
        print("beat", results["beat"], flush=True)
    if "beat-load" in only:
        sizes = [(1000, 200)] if args.quick else [(1000, 200), (10_000, 200), (10_000, 1)]
        results["beat_load"] = bench_beat_load(sizes, 2 if args.quick else 3, args.beat_load_reloads)
    if "bulk" in only:
        results["bulk"] = bench_bulk(1000 if args.quick else 10_000, 2 if args.quick else 3)
        print("bulk", results["bulk"], flush=True)
    plots(results, out)
    results["generated"] = {
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "seconds": time.monotonic() - started,
    }
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
