"""One prefork worker draining no-op tasks: throughput and CPU per task by process, for A/B runs.

    python bench/worker_cpu.py [--cases plain,supervised,strict] [-n 4000] [--rounds 2] [--by-log]

The overhead bench's measurement (``run.py``'s ``drain``: the queue filled first, then one worker,
concurrency 2, timed from its ``ready.`` line), one case at a time, the cases taking turns within each
round. Supervised cases are timed to the last run recorded ``succeeded``, or with ``--by-log`` to the
worker's last ``succeeded in`` line, for a patch that records nothing (bench/experiments). Run it from
the ``bench/`` folder of the tree under test, so the worker imports that tree's ``supervisor_app``.
BENCH_DB and BENCH_QUEUE keep it apart from another bench (``run.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import run  # bench/, next to this script: sets the project up on the bench database


def drain_case(case: str, n: int, by_log: bool) -> tuple[float, dict[str, float]]:
    from project.tasks import noop, plain_noop

    if case == "plain":
        rate, _, cpu = run.drain("plain", n, lambda: [plain_noop.apply_async() for _ in range(n)])
        return rate, cpu
    run.reset()
    env = {"SUPERVISOR_STRICT_FINISH": "1" if case == "strict" else "0"}
    recorded: Callable[[], float] | None = None if by_log else (lambda: run.runs_recorded(n))
    rate, _, cpu = run.drain(case, n, lambda: [noop.delay() for _ in range(n)], env, recorded)
    return rate, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="plain,supervised")
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--by-log", action="store_true", help="Time supervised cases to the last log line.")
    args = parser.parse_args()
    cases = args.cases.split(",")
    print(f"| case | round | tasks/s | {' | '.join(run.CPU_ROLES)} | total |")
    print("| --- | --- | --- |" + " --- |" * (len(run.CPU_ROLES) + 1))
    for i in range(args.rounds):
        for case in cases[i % len(cases) :] + cases[: i % len(cases)]:
            rate, cpu = drain_case(case, args.n, args.by_log)
            cells = " | ".join(f"{cpu[role]:.3f}" for role in run.CPU_ROLES)
            print(f"| {case} | {i + 1} | {rate:,.0f} | {cells} | {sum(cpu.values()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
