"""Bulk dispatch: ``SupervisedTask.dispatch_many`` next to ``.delay()`` one at a time, on this machine.

    python bench/bulk_dispatch.py [-n 10000] [--delay-n 1000] [--group-n 2000] [--rounds 3] [--json PATH]

Each round records ``n`` no-op runs with one ``dispatch_many`` call (one multi-row INSERT per 5,000
runs, in one transaction) and times it until the transaction has committed and every message has
been handed to the broker (the publish runs in ``on_commit``, through one producer); then the queue is
checked to hold ``n`` messages and the table ``n`` runs. For the per-run comparison, ``.delay()`` is
timed on ``--delay-n`` runs twice: one at a time as a caller outside any transaction would dispatch
them, and all inside one transaction (published together after its commit). A Celery ``group`` of
``--group-n`` members (frozen ids, one ``apply_async`` each, as Celery applies a group) is timed
inside a transaction and outside one.
Prints the figures (medians over the rounds) and a Markdown table; ``--json`` also writes the figures
to a file (``make bench`` runs this script so, section 7 of its results).

PostgreSQL and RabbitMQ on loopback, as ``make bench``. BENCH_DB (default ``supervisor_bench_bulk``,
dropped and created anew) and BENCH_QUEUE (default ``supervisor-bench-bulk``) keep it apart from
``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from harness import configure, queue_depth, start_django  # bench/, next to this script

BENCH_DB, QUEUE = configure("supervisor_bench_bulk", "supervisor-bench-bulk")


def queue(purge: bool = False) -> int:
    return queue_depth(QUEUE, purge)


def reset() -> None:
    from django.db import connection

    from supervisor_app.models import RunAttempt, SupervisedRun

    with connection.cursor() as cursor:
        for model in (RunAttempt, SupervisedRun):
            cursor.execute(f"DELETE FROM {model._meta.db_table}")
        cursor.execute(f"VACUUM ANALYZE {SupervisedRun._meta.db_table}")
    queue(purge=True)


def wait_for_depth(n: int, timeout: float = 60.0) -> int:
    """RabbitMQ counts a published message a moment after the client wrote it."""
    deadline = time.monotonic() + timeout
    depth = queue()
    while depth < n and time.monotonic() < deadline:
        time.sleep(0.05)
        depth = queue()
    return depth


def bulk_round(n: int) -> dict[str, float]:
    from django.db import transaction

    from project.tasks import slow_job
    from supervisor_app.models import SupervisedRun

    reset()
    calls = [([1], {"step_seconds": 0.0, "label": f"bulk-{i}"}) for i in range(n)]
    t = time.perf_counter()
    with transaction.atomic():
        handles = slow_job.dispatch_many(calls)
        recorded = time.perf_counter()
    done = time.perf_counter()  # committed, and every message handed to the broker (on_commit)
    assert len(handles) == n and len({h.run_id for h in handles}) == n
    assert SupervisedRun.objects.filter(status="queued", publish_count=1).count() == n
    depth = wait_for_depth(n)
    assert depth == n, f"{depth} messages in the queue, {n} expected"
    return {"total": done - t, "record": recorded - t, "publish": done - recorded}


def per_run(n: int, dispatch: Any) -> float:
    """Seconds per run of ``dispatch()`` (which dispatches ``n`` runs) until every message has been
    handed to the broker; the queue is then checked to hold ``n`` messages."""
    reset()
    t = time.perf_counter()
    dispatch()
    elapsed = time.perf_counter() - t
    depth = wait_for_depth(n)
    assert depth == n, f"{depth} messages in the queue, {n} expected"
    return elapsed / n


def delay_round(n: int) -> float:
    """``n`` ``.delay()`` calls one at a time, as a caller outside any transaction makes them."""
    from project.tasks import slow_job

    def dispatch() -> None:
        for i in range(n):
            slow_job.delay(1, step_seconds=0.0, label=f"one-{i}")

    return per_run(n, dispatch)


def delay_in_transaction_round(n: int) -> float:
    """``n`` ``.delay()`` calls inside one transaction (one INSERT each, published together after the
    commit)."""
    from django.db import transaction

    from project.tasks import slow_job

    def dispatch() -> None:
        with transaction.atomic():
            for i in range(n):
                slow_job.delay(1, step_seconds=0.0, label=f"tx-{i}")

    return per_run(n, dispatch)


def group_round(n: int, atomic: bool) -> float:
    """A Celery ``group`` of ``n`` supervised members, inside the caller's transaction (``atomic``) or
    not."""
    from celery import group
    from django.db import transaction

    from project.tasks import slow_job

    members = group(slow_job.s(1, step_seconds=0.0, label=f"group-{i}") for i in range(n))

    def dispatch() -> None:
        if atomic:
            with transaction.atomic():
                members.delay()
        else:
            members.delay()

    return per_run(n, dispatch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10_000, help="Runs per dispatch_many call.")
    parser.add_argument("--delay-n", type=int, default=1000, help="Runs dispatched one .delay() at a time.")
    parser.add_argument("--group-n", type=int, default=2000, help="Members of the group dispatched.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the figures to this file, as JSON.")
    args = parser.parse_args()

    start_django(BENCH_DB)
    queue(purge=True)
    bulk_round(100)  # warm: connections, the producer pool, the publish plan

    rounds = [bulk_round(args.n) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in ("total", "record", "publish")}
    per_delay = statistics.median(delay_round(args.delay_n) for _ in range(args.rounds))
    per_delay_tx = statistics.median(delay_in_transaction_round(args.delay_n) for _ in range(args.rounds))
    per_group = statistics.median(group_round(args.group_n, atomic=True) for _ in range(args.rounds))
    per_group_autocommit = statistics.median(group_round(args.group_n, atomic=False) for _ in range(args.rounds))
    reset()
    result: dict[str, Any] = {
        "n": args.n,
        "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
        "bulk_seconds": round(med["total"], 3),
        "record_seconds": round(med["record"], 3),
        "publish_seconds": round(med["publish"], 3),
        "delay_ms_each": round(per_delay * 1000, 3),
        "delay_in_transaction_ms_each": round(per_delay_tx * 1000, 3),
        "group_n": args.group_n,
        "group_ms_each": round(per_group * 1000, 3),
        "group_autocommit_ms_each": round(per_group_autocommit * 1000, 3),
    }
    print(result, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result))
    ok = "met" if med["total"] < 1.5 else "**missed**"
    print(
        "\n".join(
            [
                f"| runs | dispatch_many (recorded + published) | of which INSERT | of which publish "
                f"| per run | `.delay()` per run (x{args.delay_n}): one by one / in one transaction "
                f"| `group` of {args.group_n:,} per member, in a transaction / not |",
                "| --- | --- | --- | --- | --- | --- | --- |",
                f"| {args.n:,} | {med['total']:.2f} s | {med['record']:.2f} s | {med['publish']:.2f} s "
                f"| {med['total'] / args.n * 1000:.3f} ms | {per_delay * 1000:.2f} ms / {per_delay_tx * 1000:.2f} ms "
                f"| {per_group * 1000:.2f} ms / {per_group_autocommit * 1000:.2f} ms |",
                "",
                f"Target: {args.n:,} runs recorded and published in < 1.5 s: {ok} "
                f"(median of {args.rounds} rounds; each round checked: {args.n:,} queued runs, {args.n:,} messages).",
            ]
        )
    )


if __name__ == "__main__":
    main()
