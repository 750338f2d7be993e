"""One prefork worker draining no-op tasks: throughput and CPU per task by process, for A/B runs.

    python bench/worker_cpu.py [--cases plain,supervised,strict] [-n 4000] [--rounds 2] [--by-log]
                               [--body-ms MS]

The overhead bench's measurement (``run.py``'s ``drain``: the queue filled first, then one worker,
concurrency 2, timed from its ``ready.`` line), one case at a time, the cases taking turns within each
round. Supervised cases are timed to the last run recorded ``succeeded``, or with ``--by-log`` to the
worker's last ``succeeded in`` line, for a patch that records nothing (bench/experiments). With
``--body-ms``, the tasks are not no-ops: each sleeps that long, then inserts one row with the ORM
(``project.tasks.plain_sleep`` and its supervised twin ``quiet_job``), the shape of a short real task,
so the overhead can be read against a body's length. Run it from
the ``bench/`` folder of the tree under test, so the worker imports that tree's ``supervisor_app``.
BENCH_DB and BENCH_QUEUE keep it apart from another bench (``run.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import run  # bench/, next to this script: sets the project up on the bench database


def drain_case(case: str, n: int, by_log: bool, body_ms: float | None) -> tuple[float, dict[str, float]]:
    from project.tasks import noop, plain_noop, plain_sleep, quiet_job

    supervised = case != "plain"
    args: tuple[object, ...] = () if body_ms is None else (body_ms / 1000, "")
    if body_ms is None:
        task = noop if supervised else plain_noop
    else:
        task = quiet_job if supervised else plain_sleep

    def fill() -> None:
        for _ in range(n):
            task.apply_async(args)

    if not supervised:
        rate, _, cpu = run.drain("plain", n, fill)
        return rate, cpu
    run.reset()
    env = {"SUPERVISOR_STRICT_FINISH": "1" if case == "strict" else "0"}
    recorded: Callable[[], float] | None = None if by_log else (lambda: run.runs_recorded(n))
    rate, _, cpu = run.drain(case, n, fill, env, recorded)
    return rate, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="plain,supervised")
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--by-log", action="store_true", help="Time supervised cases to the last log line.")
    parser.add_argument("--body-ms", type=float, help="Bodies that sleep this long and insert a row (default: no-ops).")
    args = parser.parse_args()
    cases = args.cases.split(",")
    print(f"| case | round | tasks/s | {' | '.join(run.CPU_ROLES)} | total |")
    print("| --- | --- | --- |" + " --- |" * (len(run.CPU_ROLES) + 1))
    for i in range(args.rounds):
        for case in cases[i % len(cases) :] + cases[: i % len(cases)]:
            rate, cpu = drain_case(case, args.n, args.by_log, args.body_ms)
            cells = " | ".join(f"{cpu[role]:.3f}" for role in run.CPU_ROLES)
            print(f"| {case} | {i + 1} | {rate:,.1f} | {cells} | {sum(cpu.values()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
