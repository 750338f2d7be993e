"""What one claim costs, and what it is made of: the agent's per-task statement next to its variants.

    python bench/claim_cost.py [-n 1000] [--rounds 3]

In one process, on runs dispatched (and their messages purged) beforehand, each variant runs ``n``
times in a loop, the variants taking turns within each round; for each, the client's CPU per
statement (``time.process_time``) and the wall time per statement (client + round trip + server),
medians over the rounds:

- ``runs.claim``: what a pool process calls (the function through the driver's cursor when nothing
  observes Django's, :func:`supervisor_app.db.driver_cursor`);
- the same function call on a bare driver cursor, then with server-side binding and a prepared
  statement (psycopg 3; not what the agent sends: PgBouncer in transaction mode refuses prepared
  statements unless configured for them);
- the claim without its attempt row (a temporary function: the run's UPDATE alone);
- ``SELECT 1`` (the round trip) and a one-row ``UPDATE`` with asynchronous commit (a write
  transaction, however small);
- ``runs.finish_successes`` per run, in batches of 25 and 100 (the deferred completions).

It answers where a claim's time goes: the client's share, the round trip, and the write transaction
PostgreSQL commits for it. PostgreSQL on loopback, as ``make bench``; BENCH_DB (default
``supervisor_bench_claim``, dropped and created anew) and BENCH_QUEUE keep it apart (``harness.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from harness import configure, start_django  # bench/, next to this script

BENCH_DB, QUEUE = configure("supervisor_bench_claim", "supervisor-bench-claim")

#: The claim's UPDATE alone, as migration 0013's function has it, without the attempt row.
RUN_ONLY = """
CREATE OR REPLACE FUNCTION pg_temp.claim_run_only(p_run bigint, p_attempt integer, p_worker text, p_token uuid)
RETURNS TABLE (o_max_attempts integer, o_lease_timeout interval, o_checkpoint text) LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY UPDATE {run} AS r SET status = 'running', worker = p_worker, started_at = now(),
        heartbeat_at = now(), lease_expires_at = now() + r.lease_timeout,
        deadline_at = CASE WHEN r.max_runtime IS NULL THEN NULL ELSE now() + r.max_runtime END,
        next_check_at = NULL, finished_at = NULL, lease_token = p_token
    WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'queued'
    RETURNING r.max_attempts::integer, r.lease_timeout, r.checkpoint::text;
END
$fn$
"""
CALL = (
    "SELECT * FROM supervisor_claim_v1(%s::bigint, %s::integer, %s::text, %s::text, %s::uuid, "
    "'queued', 'running', 'running', true)"
)


def queued(n: int) -> list[int]:
    """``n`` new queued runs of a no-op task, their messages purged (nothing consumes them)."""
    from celery import current_app

    from project.tasks import noop

    handles = noop.dispatch_many([((), {})] * n)
    with current_app.connection_for_write() as conn:
        bound = current_app.amqp.queues[QUEUE](conn.default_channel)
        bound.declare()
        bound.purge()
    return [int(h.run_id) for h in handles]


def timed(statement: Callable[[int], Any], ids: list[int]) -> tuple[float, float]:
    """Client CPU and wall milliseconds per call of ``statement`` over ``ids``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for run_id in ids:
        statement(run_id)
    return (time.process_time() - cpu) * 1000 / len(ids), (time.perf_counter() - wall) * 1000 / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000, help="Statements per variant and round.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_django(BENCH_DB)
    import psycopg
    from django.db import connection

    from supervisor_app import runs
    from supervisor_app.models import SupervisedRun

    connection.ensure_connection()
    raw = connection.connection
    table = connection.ops.quote_name(SupervisedRun._meta.db_table)
    with raw.cursor() as cursor:
        cursor.execute(RUN_ONLY.replace("{run}", table))
    bare = raw.cursor()
    binding = psycopg.Cursor(raw)

    def fetch(cursor: Any, sql: str, params: tuple[Any, ...], **kw: Any) -> None:
        cursor.execute(sql, params, **kw)
        cursor.fetchall()

    def write(cursor: Any, sql: str, params: tuple[Any, ...]) -> None:
        cursor.execute(sql, params)

    tokens: dict[int, str] = {}

    def finish(batch: int) -> Callable[[list[int]], tuple[float, float]]:
        def run(ids: list[int]) -> tuple[float, float]:
            for run_id in ids:
                tokens[run_id] = str(uuid.uuid4())
                runs.claim(run_id, 1, "bench", token=tokens[run_id])
            cpu, wall = time.process_time(), time.perf_counter()
            for start in range(0, len(ids), batch):
                runs.finish_successes([(r, 1, tokens[r], "bench", None) for r in ids[start : start + batch]])
            return (time.process_time() - cpu) * 1000 / len(ids), (time.perf_counter() - wall) * 1000 / len(ids)

        return run

    update = f"UPDATE {table} SET heartbeat_at = now() WHERE id = %s AND set_config('synchronous_commit', 'off', true) IS NOT NULL"
    variants: dict[str, Callable[[list[int]], tuple[float, float]]] = {
        "runs.claim (what a pool process calls)": lambda ids: timed(lambda r: runs.claim(r, 1, "bench"), ids),
        "the same call, bare driver cursor": lambda ids: timed(
            lambda r: fetch(bare, CALL, (r, 1, "bench", "", str(uuid.uuid4()))), ids
        ),
        "the same call, prepared (server-side binding)": lambda ids: timed(
            lambda r: fetch(binding, CALL, (r, 1, "bench", "", uuid.uuid4()), prepare=True), ids
        ),
        "the claim without its attempt row": lambda ids: timed(
            lambda r: fetch(bare, "SELECT * FROM pg_temp.claim_run_only(%s, 1, 'bench', %s::uuid)", (r, uuid.uuid4())),
            ids,
        ),
        "SELECT 1 (the round trip)": lambda ids: timed(lambda r: fetch(bare, "SELECT %s::bigint", (r,)), ids),
        "one-row UPDATE, asynchronous commit": lambda ids: timed(lambda r: write(bare, update, (r,)), ids),
        "finish_successes, per run, batches of 25": finish(25),
        "finish_successes, per run, batches of 100": finish(100),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, variant in variants.items():
            samples[name].append(variant(queued(args.n)))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"| {args.n:,} statements a round, {args.rounds} rounds, medians | client CPU | wall |")
    print("| --- | --- | --- |")
    for name, values in samples.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"| {name} | {cpu:.3f} ms | {wall:.3f} ms |")


if __name__ == "__main__":
    main()
