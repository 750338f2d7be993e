"""What a unique run costs at dispatch, next to a plain supervised dispatch, on PostgreSQL.

    python bench/unique_dispatch.py [--n 300] [--rounds 7] [--broker amqp://guest:guest@127.0.0.1:5672//]

Times ``.delay()`` in this process, in rounds that alternate the kinds (so that a busy machine slows
them alike), and prints the median over rounds of the mean per call, with the statements each sends:

- plain: a supervised task without ``unique_by`` (one INSERT, then the publish);
- unique, new key: ``unique_by=("customer",)``, a customer not seen before (one INSERT … ON CONFLICT
  DO NOTHING RETURNING, then the publish);
- unique, key held: the same customer again while its run is queued (the INSERT conflicts, one SELECT
  reads the holder; nothing is recorded or published).

It also times the claim and the finish of plain runs with and without the unique-key index, since
every index on the runs table is weighed when planning each of them. BENCH_DB (default
``supervisor_bench_unique``) is dropped and created anew; the broker's queue BENCH_QUEUE is purged.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
BENCH_DB = os.environ.get("BENCH_DB", "supervisor_bench_unique")
QUEUE = os.environ.get("BENCH_QUEUE", "supervisor-bench-unique")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="dispatches per kind per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    opts = parser.parse_args()

    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    os.environ.update(
        DATABASE_URL=f"{PG}/{BENCH_DB}",
        CELERY_BROKER_URL=opts.broker,
        CELERY_TASK_DEFAULT_QUEUE=QUEUE,
        DJANGO_SETTINGS_MODULE="project.settings",
        SUPERVISOR_LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from celery import current_app, shared_task
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from supervisor_app import SupervisedTask, runs
    from supervisor_app.models import SupervisedRun

    call_command("migrate", verbosity=0)

    @shared_task(base=SupervisedTask, name="bench.unique.plain")
    def plain(customer: int) -> None:
        return None

    @shared_task(base=SupervisedTask, name="bench.unique.report", unique_by=("customer",))
    def report(customer: int) -> None:
        return None

    def purge() -> None:
        with current_app.connection_for_write() as conn:
            bound = current_app.amqp.queues[QUEUE](conn.default_channel)
            bound.declare()
            bound.purge()

    counter = iter(range(10**9))
    held = report.delay(-1)  # its key stays held (queued) for the whole bench

    kinds: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain.delay(next(counter)),
        "unique, new key": lambda: report.delay(next(counter)),
        "unique, key held": lambda: report.delay(-1),
    }
    statements = {}
    for name, call in kinds.items():
        with CaptureQueriesContext(connection) as ctx:
            call()
        statements[name] = [q["sql"].split(" ", 1)[0] for q in ctx.captured_queries]
    assert report.delay(-1).run_id == held.run_id

    def per_call(call: Callable[[], Any], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - start) / n * 1000

    purge()
    for call in kinds.values():  # warm up
        per_call(call, 50)
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(opts.rounds):
        for name, call in kinds.items():
            samples[name].append(per_call(call, opts.n))
        purge()

    # The claim and finish of plain runs, with and without the unique-key index.
    index_sql = _index_sql(connection)

    def claim_finish(n: int) -> float:
        ids = [plain.delay(0).run_id for _ in range(n)]
        start = time.perf_counter()
        for pk in ids:
            runs.claim(pk, 1, "bench")
            runs.finish_success(pk, 1, "bench")
        return (time.perf_counter() - start) / n * 1000

    agent: dict[str, list[float]] = {"with the index": [], "without it": []}
    claim_finish(50)
    for _ in range(opts.rounds):
        agent["with the index"].append(claim_finish(opts.n))
        with connection.cursor() as cursor:
            cursor.execute('DROP INDEX "supervisor_run_unique_key"')
        agent["without it"].append(claim_finish(opts.n))
        with connection.cursor() as cursor:
            cursor.execute(index_sql)
        purge()

    runs_recorded = SupervisedRun.objects.count()
    print(f"PostgreSQL {connection.pg_version}, broker {opts.broker.split(':')[0]}, {opts.rounds} rounds x {opts.n}")
    print("| dispatch | ms per .delay() (median of rounds) | / plain (median of the rounds' ratios) | statements |")
    print("| --- | --- | --- | --- |")
    for name, values in samples.items():
        ratio = statistics.median(v / p for v, p in zip(values, samples["plain"], strict=True))
        print(f"| {name} | {statistics.median(values):.3f} | {ratio:.2f} | {', '.join(statements[name])} |")
    print()
    print("| claim + finish of a plain run | ms (median of rounds) |")
    print("| --- | --- |")
    for name, values in agent.items():
        print(f"| {name} | {statistics.median(values):.3f} |")
    without = statistics.median(w / i for w, i in zip(agent["with the index"], agent["without it"], strict=True))
    print(f"(with / without, median of the rounds' ratios: {without:.2f})")
    print(f"\n{runs_recorded} runs recorded in all")
    purge()


def _index_sql(connection: Any) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'supervisor_run_unique_key'")
        (sql,) = cursor.fetchone()
    return str(sql)


if __name__ == "__main__":
    main()
