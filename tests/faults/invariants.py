"""What must hold in the database after any fault: checked after every scenario of the fault suite.

1. every recorded run ends in exactly one terminal state (once the scenario has settled);
2. no schedule slot has two runs;
3. no attempt is executed by two live agents: one ``RunAttempt`` per (run, number), at most one
   succeeded attempt per run (the last one, for a succeeded run), and every side effect of an attempt
   written by the agent that claimed it;
4. nothing stays ``running`` without a live lease (judged with the database clock);
5. side effects written through the idempotency helper happen exactly once per succeeded run (and
   at most once otherwise).

Body re-executions of tasks *without* the helper are allowed (at-least-once execution) and counted.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Count, Q
from django.db.models.functions import Now

from project.models import Execution
from supervisor_app.core.states import TERMINAL_STATUSES, RunStatus
from supervisor_app.models import Effect, RunAttempt, SupervisedRun

#: Tasks whose side effect (an ``Execution`` row) is written through ``self.effect(...)``.
EFFECT_TASKS = ("project.tasks.effect_job",)


@dataclass
class Verdict:
    runs: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    recovered: int = 0
    fenced: int = 0
    effects: int = 0
    #: Extra executions of bodies that do not use the helper (allowed: at-least-once).
    reexecutions: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        st = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        extra = f"; {self.recovered} attempts lost/timed out and retried" if self.recovered else ""
        extra += f"; {self.fenced} zombie writes fenced" if self.fenced else ""
        extra += f"; {self.reexecutions} body re-executions without the helper" if self.reexecutions else ""
        return f"{self.runs} runs: {st}{extra}"

    def assert_ok(self) -> None:
        assert self.ok, "invariants violated:\n  " + "\n  ".join(self.violations[:50])


def stale_running(run_ids: Iterable[int] | None = None, grace: float = 0.0) -> list[int]:
    """Runs ``running`` whose lease expired more than ``grace`` seconds ago (database clock)."""
    qs = SupervisedRun.objects.filter(status=RunStatus.RUNNING)
    if run_ids is not None:
        qs = qs.filter(pk__in=list(run_ids))
    cond = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=Now() - timedelta(seconds=grace))
    return list(qs.filter(cond).values_list("pk", flat=True))


def check(
    run_ids: Iterable[int] | None = None,
    *,
    settled: bool = True,
    expect: Iterable[str] | None = None,
    lease_grace: float = 0.0,
) -> Verdict:
    """Check every invariant over ``run_ids`` (default: every run in the database).

    ``settled``: the scenario is over, every run must be terminal. ``expect``: the terminal statuses
    allowed (default: any). ``lease_grace``: seconds a lease may be overdue before the supervisor
    must have acted on it.
    """
    ids = None if run_ids is None else sorted(set(run_ids))
    runs = SupervisedRun.objects.all() if ids is None else SupervisedRun.objects.filter(pk__in=ids)
    v = Verdict()
    rows = list(runs.values("pk", "status", "attempt", "task_name", "periodic_task_id", "scheduled_for"))
    v.runs = len(rows)
    v.statuses = Counter(r["status"] for r in rows)
    if ids is not None and len(rows) != len(ids):
        v.violations.append(f"{len(ids) - len(rows)} recorded runs disappeared")
    by_pk = {r["pk"]: r for r in rows}
    pks = list(by_pk)

    # 1. terminal
    allowed = set(expect) if expect is not None else set(TERMINAL_STATUSES)
    for r in rows:
        if settled and r["status"] not in TERMINAL_STATUSES:
            v.violations.append(f"run {r['pk']} not terminal: {r['status']} (attempt {r['attempt']})")
        elif settled and r["status"] not in allowed:
            v.violations.append(f"run {r['pk']} ended {r['status']}, expected one of {sorted(allowed)}")

    # 2. one run per slot (over the schedules involved)
    schedules = {r["periodic_task_id"] for r in rows if r["periodic_task_id"] is not None}
    if schedules:
        dup = (
            SupervisedRun.objects.filter(periodic_task_id__in=schedules)
            .values("periodic_task_id", "scheduled_for")
            .annotate(n=Count("id"))
            .filter(n__gt=1)
        )
        for d in dup:
            v.violations.append(f"slot {d['scheduled_for']} of schedule {d['periodic_task_id']} has {d['n']} runs")

    # 3. attempts
    attempts = list(RunAttempt.objects.filter(run_id__in=pks).values("run_id", "number", "outcome", "worker"))
    v.attempts = len(attempts)
    seen: Counter[tuple[int, int]] = Counter((a["run_id"], a["number"]) for a in attempts)
    for (run_id, number), n in seen.items():
        if n > 1:
            v.violations.append(f"run {run_id} attempt {number} recorded {n} times")
    succeeded: dict[int, list[int]] = {}
    claimed_by: dict[tuple[int, int], str] = {}
    for a in attempts:
        claimed_by[(a["run_id"], a["number"])] = a["worker"]
        if a["outcome"] == "succeeded":
            succeeded.setdefault(a["run_id"], []).append(a["number"])
        if a["outcome"] in ("lost", "timed_out"):
            v.recovered += 1
        if a["outcome"] == "fenced":
            v.fenced += 1
        run = by_pk[a["run_id"]]
        if a["number"] > run["attempt"]:
            v.violations.append(f"run {a['run_id']} has attempt {a['number']} beyond its current {run['attempt']}")
        if a["outcome"] == "running" and (run["status"] != RunStatus.RUNNING or a["number"] != run["attempt"]):
            v.violations.append(f"run {a['run_id']} attempt {a['number']} still running while the run is not")
    for run_id, numbers in succeeded.items():
        if len(numbers) > 1:
            v.violations.append(f"run {run_id} succeeded {len(numbers)} times (attempts {numbers})")
    for r in rows:
        if r["status"] == RunStatus.SUCCEEDED and succeeded.get(r["pk"]) != [r["attempt"]]:
            v.violations.append(f"run {r['pk']} succeeded but its attempts say {succeeded.get(r['pk'])}")

    executions = list(Execution.objects.filter(run_id__in=pks).values("run_id", "attempt", "worker"))
    per_attempt: dict[tuple[int, int], set[str]] = {}
    for e in executions:
        per_attempt.setdefault((e["run_id"], e["attempt"]), set()).add(e["worker"])
    for key, workers in per_attempt.items():
        if len(workers) > 1:
            v.violations.append(f"run {key[0]} attempt {key[1]} executed by {sorted(workers)}")
        claimer = claimed_by.get(key)
        if claimer is not None and workers != {claimer}:
            v.violations.append(f"run {key[0]} attempt {key[1]} claimed by {claimer} but executed by {sorted(workers)}")

    # 4. leases
    for pk in stale_running(pks, lease_grace):
        v.violations.append(f"run {pk} running without a live lease (grace {lease_grace}s)")

    # 5. effects
    effects = Counter(
        Effect.objects.filter(run_id__in=pks).values_list("run_id", flat=True)
    )  # one key per run in our tasks
    v.effects = sum(effects.values())
    dup_keys = Effect.objects.filter(run_id__in=pks).values("run_id", "key").annotate(n=Count("id")).filter(n__gt=1)
    for d in dup_keys:
        v.violations.append(f"run {d['run_id']} effect {d['key']!r} recorded {d['n']} times")
    per_run = Counter(e["run_id"] for e in executions)
    for r in rows:
        n = per_run.get(r["pk"], 0)
        if r["task_name"] in EFFECT_TASKS:
            want = 1 if r["status"] == RunStatus.SUCCEEDED else None
            if (want is not None and (n != 1 or effects.get(r["pk"], 0) != 1)) or n > 1:
                v.violations.append(
                    f"run {r['pk']} ({r['status']}) wrote its effect {n} times ({effects.get(r['pk'], 0)} recorded)"
                )
        elif n > 1:
            v.reexecutions += n - 1
    # An effect recorded by an attempt that did not claim the run would be a fencing failure.
    for e in Effect.objects.filter(run_id__in=pks).exclude(attempt=0).values("run_id", "attempt"):
        if (e["run_id"], e["attempt"]) not in claimed_by:
            v.violations.append(f"run {e['run_id']} effect recorded by unclaimed attempt {e['attempt']}")
    return v


def check_chains(chains: dict[str, int], verdict: Verdict) -> list[int]:
    """Workflow invariants over chains of supervised ``add`` steps (root task id -> expected final
    value): each step recorded once and at most as many as the chain has (3), in order of dispatch;
    no step after one that did not succeed; the last step's stored value right when it succeeded; no
    finished run left with its continuation undispatched. Adds violations to ``verdict``; returns the
    steps' run ids (for the other invariants)."""
    ids: list[int] = []
    for root, expected in chains.items():
        steps = list(SupervisedRun.objects.in_workflow(root).order_by("created_at", "id"))
        ids += [s.pk for s in steps]
        if not steps:
            verdict.violations.append(f"chain {root}: no step recorded")
            continue
        if len(steps) > 3:
            verdict.violations.append(f"chain {root}: {len(steps)} steps recorded for 3")
        for before, after in itertools.pairwise(steps):
            if before.status != RunStatus.SUCCEEDED:
                verdict.violations.append(f"chain {root}: step {after.pk} dispatched after {before.pk} {before.status}")
        last = steps[-1]
        if len(steps) == 3 and last.status == RunStatus.SUCCEEDED and last.result != expected:
            verdict.violations.append(f"chain {root}: ended with {last.result!r}, expected {expected}")
        if len(steps) < 3 and all(s.status == RunStatus.SUCCEEDED for s in steps):
            verdict.violations.append(f"chain {root}: stopped after {len(steps)} steps, all succeeded")
    for pk in SupervisedRun.objects.filter(
        pk__in=ids, follow_up=True, status__in=sorted(TERMINAL_STATUSES)
    ).values_list("pk", flat=True):
        verdict.violations.append(f"run {pk}: finished, its workflow continuation never dispatched")
    return ids


def assert_invariants(run_ids: Iterable[int] | None = None, **kwargs: object) -> Verdict:
    verdict = check(run_ids, **kwargs)  # type: ignore[arg-type]
    verdict.assert_ok()
    return verdict


__all__ = ["EFFECT_TASKS", "Verdict", "assert_invariants", "check", "check_chains", "stale_running"]
