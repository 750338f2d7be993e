"""Publishing cost: ``n`` attempts sent through one ``RunPublisher`` (as a sweep, a fan-out or the beat
sends them), process CPU and wall time per message, medians over rounds.

    python bench/publish_cost.py [-n 10000] [--rounds 5]

Each round purges the queue, publishes ``n`` no-op messages (``project.tasks.slow_job``, small
arguments, the run and attempt headers) with one ``publish_many`` call, and checks the queue holds
``n`` messages. No database writes: only the broker side of a publish. PostgreSQL (for Django's
start) and RabbitMQ on loopback; BENCH_DB (default ``supervisor_bench_publish``, dropped and created
anew) and BENCH_QUEUE (default ``supervisor-bench-publish``) keep it apart from ``make bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import configure, queue_depth, start_django  # bench/, next to this script

BENCH_DB, QUEUE = configure("supervisor_bench_publish", "supervisor-bench-publish")


def depth(purge: bool = False) -> int:
    return queue_depth(QUEUE, purge)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    start_django(BENCH_DB)

    from supervisor_app import broker
    from supervisor_app.runs.publishing import RunPublisher

    messages = [
        broker.Message(i, 1, "project.tasks.slow_job", [1], {"step_seconds": 0.0, "label": f"m-{i}"}, {}, f"{i}.1.t")
        for i in range(1, args.n + 1)
    ]
    with RunPublisher() as warm:  # connections, the producer pool, the publish plan
        warm.publish_many(messages[:100])
    cpu, wall = [], []
    for _ in range(args.rounds):
        depth(purge=True)
        c, t = time.process_time(), time.perf_counter()
        with RunPublisher() as publisher:
            sent = publisher.publish_many(messages)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
        assert sent == args.n, sent
        deadline = time.monotonic() + 60
        while (held := depth()) < args.n and time.monotonic() < deadline:
            time.sleep(0.05)  # RabbitMQ counts a message a moment after the client wrote it
        assert held == args.n, f"{held} messages in the queue, {args.n} expected"
    depth(purge=True)
    per = 1000 / args.n
    print(
        f"{args.n:,} messages, {args.rounds} rounds (medians): CPU {statistics.median(cpu) * per:.3f} ms a message "
        f"(min {min(cpu) * per:.3f}), wall {statistics.median(wall) * per:.3f} ms a message "
        f"(min {min(wall) * per:.3f})"
    )


if __name__ == "__main__":
    main()
