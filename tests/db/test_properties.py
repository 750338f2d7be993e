"""Random interleavings of everything that touches a run, against PostgreSQL (issue 13 item 6).

A Hypothesis state machine dispatches runs, records schedule slots, claims, renews, finishes (success,
retryable and non-retryable failure, stop on cancel), kills agents (their lease pushed into the
past, as ``expire`` does), lets time pass, sweeps, cancels, retries now, and creates, disables,
enables and deletes schedules, in any order. After every step it checks:

- **a way out**: every non-terminal run has the column its liveness entry names set
  (``core.states.LIVENESS``); after a sweep, nothing the sweep selects is still due and no held
  ``queue_one`` run is left without a schedule run to wait for;
- **one success per run** (``RunAttempt`` outcomes; an operator's retry of a succeeded run allows one
  more);
- **one run per slot**;
- **one active attempt per run**: an attempt row is ``running`` only as the current attempt of a
  running run, and a running run's current attempt row is ``running``;
- **terminal states stay terminal** unless an operator retried the run in that step;
- **fencing**: every agent write (claim, renewal, heartbeat, finish) succeeds exactly when the
  agent holds the run's current lease (status running, same attempt, same token), and is refused
  otherwise; a delivery of a superseded attempt never claims.

Each step is one action drawn by weight (Hypothesis' own choice among many rules made the run's life
cycle rare), and the agent or message it acts on is drawn by kind: a lease holder, a zombie whose run
is running under another claim, or one whose run moved on; a current delivery or a stale one. Without
that, a zombie writing over another agent's claim took a chain of four steps in the right order and
was seen a few times in a thousand steps (a fence broken on purpose went unnoticed); ``take_over``
(kill, sweep, claim by another worker) makes it common. A failure prints every step's outcome
(``note``).

Agent writes run outside any ``atomic`` block (``transaction=True``), so PostgreSQL's single-statement
paths are the ones exercised. Publishes are recorded, not sent; recorded messages, stale ones
included, are what agents claim (duplicate and late deliveries). Schedule slots are in 2030 and
recorded through ``firing.fire`` with explicit times, so the sweep's own catch-up never depends on the
wall clock. Tables are emptied before each example.

``make test`` runs the bounded profile (25 examples of 50 steps, derandomized: the same every run,
about 30 s); ``HYPOTHESIS_PROFILE=chaos`` (``make chaos``) runs 200 random examples of 100 steps.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import hypothesis
import pytest
from django.apps import apps
from django.db import connection
from django.db.models import F
from django_celery_beat.models import PeriodicTask
from hypothesis import HealthCheck, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from supervisor_app import broker, runs
from supervisor_app.core.errors import NonRetryable
from supervisor_app.core.policies import RunPolicy
from supervisor_app.core.retry import RetryPolicy, decide_failure
from supervisor_app.core.states import ACTIVE_STATUSES, LIVENESS, TERMINAL_STATUSES, AttemptOutcome, RunStatus
from supervisor_app.db import db_now, seconds
from supervisor_app.models import RunAttempt, SupervisedRun
from supervisor_app.scheduling import firing
from supervisor_app.supervisor import run_sweep
from tests.db.test_scheduler import at, define, make_schedule

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    database=None,  # nothing written into the work tree; a failure prints its steps (and a blob)
    print_blob=True,
)
hypothesis.settings.register_profile("supervisor", max_examples=20, stateful_step_count=40, derandomize=True, **_COMMON)
hypothesis.settings.register_profile("chaos", max_examples=200, stateful_step_count=100, **_COMMON)

WORKERS = ("w1", "w2", "w3")
TASK = "project.tasks.noop"
#: Every lease, start timeout, backoff and max runtime of the test is an hour or two: nothing comes due
#: while an example runs, only when a step says time passes, so an example replays the same however
#: slow the machine (Hypothesis refuses a test whose replay differs).
HOUR = 3600.0
#: How far "time passes" moves a deadline back: past every lease, start timeout and backoff of the test.
LONG_AGO = timedelta(days=1)
#: SUPERVISOR_MAX_PUBLISHES in the test: small, so "never started" is reached.
MAX_PUBLISHES = 3
OVERLAPS = ("allow", "skip", "queue_one", "replace")
MAX_RUNTIMES = (None, 2 * HOUR)
#: The columns the sweep acts on when their time has come.
DEADLINES = ("next_check_at", "deadline_at", "lease_expires_at")
#: Which item of a list a step acts on (see ``pick``).
INDEX = st.integers(0, 1000)
#: Each action of a step and its weight: what makes a run's life (claims, finishes, kills, sweeps)
#: comes often, what ends it early (cancel, retry now) and schedule edits less.
WEIGHTS = {
    "claim": 6,
    "sweep": 5,
    "dispatch": 3,
    "claim_again": 1,
    "renew": 2,
    "heartbeat": 2,
    "finish": 6,
    "kill": 3,
    "take_over": 2,
    "time_passes": 3,
    "cancel": 2,
    "retry_now": 2,
    "create_schedule": 1,
    "edit_schedule": 1,
    "record_slots": 3,
}
ACTIONS = tuple(name for name, weight in WEIGHTS.items() for _ in range(weight))

Draw = Callable[[st.SearchStrategy[Any], str], Any]


def profile() -> hypothesis.settings:
    return hypothesis.settings.get_profile("chaos" if os.environ.get("HYPOTHESIS_PROFILE") == "chaos" else "supervisor")


def clean_tables() -> None:
    """Empty every table the machine writes, in one statement (foreign keys are checked at its commit)."""
    models = [
        *apps.get_app_config("supervisor_app").get_models(),
        *apps.get_app_config("django_celery_beat").get_models(),
    ]
    *first, last = (connection.ops.quote_name(m._meta.db_table) for m in models)
    ctes = ", ".join(f"d{i} AS (DELETE FROM {table})" for i, table in enumerate(first))
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {ctes} DELETE FROM {last}")


@dataclass(frozen=True)
class Agent:
    """One claim an agent won: it writes with these for ever (after losing the lease, as a zombie)."""

    run_id: int
    attempt: int
    token: str
    worker: str
    max_attempts: int


@dataclass(frozen=True)
class Row:
    status: str
    attempt: int
    token: str | None
    cancel_requested: bool


def row(run_id: int) -> Row:
    status, attempt, token, cancel = SupervisedRun.objects.values_list(
        "status", "attempt", "lease_token", "cancel_requested"
    ).get(pk=run_id)
    return Row(status, attempt, None if token is None else str(token), cancel)


def holds(agent: Agent, now: Row) -> bool:
    """Whether ``agent`` holds the run's current lease: the only case an agent's write may succeed."""
    return now.status == RunStatus.RUNNING and now.attempt == agent.attempt and now.token == agent.token


def pick(items: list[Any], index: int) -> Any:
    """The ``index``-th item from the end (0: the latest, which Hypothesis draws most often), wrapping
    around; None when there is none (the step does nothing)."""
    return items[-1 - index % len(items)] if items else None


def way_out(watch_column: str, run: dict[str, Any]) -> bool:
    """Whether a run has the way out a liveness entry names: its column set, or for
    ``next_check_at IS NULL`` (the held ``queue_one`` run) no next check and a schedule's slot."""
    column, _, condition = watch_column.partition(" ")
    if condition == "IS NULL":
        return run[column] is None and run["scheduled_for"] is not None
    return run[column] is not None


#: The liveness entries' columns by status.
WATCHES: dict[str, list[str]] = {}
for _watch in LIVENESS:
    WATCHES.setdefault(_watch.status, []).append(_watch.column)

#: What the invariants read of each run: every column a liveness entry names, and more.
RUN_FIELDS = tuple(
    dict.fromkeys(
        [
            "pk",
            "status",
            "attempt",
            *DEADLINES,
            *(w.column.partition(" ")[0] for w in LIVENESS),
            "scheduled_for",
            "periodic_task_id",
        ]
    )
)


class Interleavings(RuleBasedStateMachine):
    #: The ``sent`` fixture's list: every message published, as (run id, attempt, task name).
    sent: ClassVar[list[tuple[int, int, str]]] = []

    def __init__(self) -> None:
        super().__init__()
        clean_tables()
        self.sent.clear()
        self.agents: list[Agent] = []
        self.schedules: list[int] = []
        #: Successes reported to agents, and operator retries of succeeded runs, per run.
        self.successes: Counter[int] = Counter()
        self.reopened_success: Counter[int] = Counter()
        #: The runs an operator retried in the current step (they may leave a terminal status).
        self.reopened: set[int] = set()
        self.terminal: dict[int, tuple[str, int]] = {}

    def agent(self, draw: Draw, role: str | None = None) -> Agent | None:
        """An agent, of the kind drawn: one that holds its run's lease (``holder``), a ``zombie`` whose
        run is running under another claim now (the case fencing is for), or one whose run moved on
        otherwise (``gone``: finished, queued again). Any agent when there is none of that kind."""
        role = role or draw(st.sampled_from(["holder", "zombie", "gone"]), "role")
        running = {
            pk: (attempt, str(token))
            for pk, attempt, token in SupervisedRun.objects.filter(status=RunStatus.RUNNING).values_list(
                "pk", "attempt", "lease_token"
            )
        }

        def kind(a: Agent) -> str:
            if a.run_id not in running:
                return "gone"
            return "holder" if running[a.run_id] == (a.attempt, a.token) else "zombie"

        chosen = [a for a in self.agents if kind(a) == role]
        return pick(chosen or self.agents, draw(INDEX, "agent"))

    def run_ids(self) -> list[int]:
        return list(SupervisedRun.objects.order_by("pk").values_list("pk", flat=True))

    def fenced_write(self, agent: Agent, what: str, write: Callable[[], bool], allowed: bool = True) -> bool:
        """Do an agent's write and check the fence: it succeeds exactly when the agent holds the lease
        (and ``allowed``: the write's own condition, e.g. a cancel was requested)."""
        before = row(agent.run_id)
        done = bool(write())
        note(f"{what} by {agent} on {before}: {'written' if done else 'refused'}")
        expected = holds(agent, before) and allowed
        assert done == expected, f"fence: {what} by {agent} on {before} returned {done}, expected {expected}"
        return done

    # ----------------------------------------------------------------- the steps

    @initialize(
        dispatched=st.integers(1, 3),
        max_runtime=st.sampled_from(MAX_RUNTIMES),
        overlap=st.sampled_from([None, *OVERLAPS]),
    )
    def start(self, dispatched: int, max_runtime: float | None, overlap: str | None) -> None:
        """Some runs and a schedule from the start, so that the first steps have something to act on."""
        for _ in range(dispatched):
            self.dispatch_run(max_attempts=2, countdown=None, max_runtime=max_runtime)
        if overlap is not None:
            pt = make_schedule(task=TASK, overlap=overlap, max_attempts=2, max_runtime=seconds(max_runtime))
            self.schedules.append(pt.pk)
            firing.fire(define(pt), at(0), at(1))

    @rule(action=st.sampled_from(ACTIONS), data=st.data())
    def step(self, action: str, data: st.DataObject) -> None:
        """One action, drawn by weight (Hypothesis' own choice of rules leaves the run's life cycle
        rare: most steps would act on nothing). Each action draws its own arguments, labelled."""

        def draw(strategy: st.SearchStrategy[Any], label: str) -> Any:
            return data.draw(strategy, label=f"{action} {label}")

        getattr(self, action)(draw)

    # ----------------------------------------------------------------- dispatch and schedules

    def dispatch_run(self, max_attempts: int, countdown: float | None, max_runtime: float | None) -> None:
        policy = RunPolicy(max_attempts=max_attempts, lease_timeout=HOUR, start_timeout=HOUR, max_runtime=max_runtime)
        assert runs.create_run(TASK, [], {}, policy, countdown=countdown) is not None

    def dispatch(self, draw: Draw) -> None:
        self.dispatch_run(
            max_attempts=draw(st.integers(1, 3), "max_attempts"),
            countdown=draw(st.sampled_from([None, HOUR]), "countdown"),
            max_runtime=draw(st.sampled_from(MAX_RUNTIMES), "max_runtime"),
        )

    def create_schedule(self, draw: Draw) -> None:
        pt = make_schedule(
            task=TASK,
            overlap=draw(st.sampled_from(OVERLAPS), "overlap"),
            catch_up=draw(st.sampled_from(["none", "latest", "all"]), "catch_up"),
            catch_up_window=timedelta(minutes=5),
            max_attempts=draw(st.integers(1, 3), "max_attempts"),
            max_runtime=seconds(draw(st.sampled_from(MAX_RUNTIMES), "max_runtime")),
        )
        self.schedules.append(pt.pk)

    def edit_schedule(self, draw: Draw) -> None:
        chosen = PeriodicTask.objects.filter(pk=pick(self.schedules, draw(INDEX, "schedule")))
        edit = draw(st.sampled_from(["disable", "enable", "delete"]), "edit")
        if edit == "delete":
            chosen.delete()
        else:
            # An update, as django-celery-beat's own admin actions do: the anchor (last edit) stays put.
            chosen.update(enabled=edit == "enable")

    def record_slots(self, draw: Draw) -> None:
        """A beat (or a stale one, that has not seen a disable yet) records the slots in (slot-1-late, slot]."""
        pt = PeriodicTask.objects.filter(pk=pick(self.schedules, draw(INDEX, "schedule"))).first()
        slot, late = draw(st.integers(0, 8), "slot"), draw(st.integers(0, 2), "late")
        if pt is not None:  # deleted: nobody fires it any more
            firing.fire(define(pt), at(slot - 1 - late), at(slot))

    # ----------------------------------------------------------------- agents

    def claim(self, draw: Draw) -> None:
        """A delivery of a message published: of the run's current attempt, or a stale one (a
        duplicate, a late delivery, a superseded attempt), as drawn."""
        current = not draw(st.booleans(), "stale")
        queued = set(SupervisedRun.objects.filter(status=RunStatus.QUEUED).values_list("pk", "attempt"))
        kind = [m for m in self.sent if (m[:2] in queued) == current]
        message = pick(kind or self.sent, draw(INDEX, "message"))
        worker = draw(st.sampled_from(WORKERS), "worker")
        if message is not None:
            self.deliver(message[0], message[1], worker)

    def deliver(self, run_id: int, attempt: int, worker: str) -> None:
        before = row(run_id)
        token = str(uuid.uuid4())
        got = runs.claim(run_id, attempt, worker, token=token)
        note(f"claim of ({run_id}, {attempt}) by {worker} on {before}: {'granted ' + token if got else 'refused'}")
        expected = before.status == RunStatus.QUEUED and before.attempt == attempt
        assert (got is not None) == expected, f"claim of ({run_id}, {attempt}) on {before}: {got}"
        if got is not None:
            assert got.token == token
            self.agents.append(Agent(run_id, attempt, token, worker, got.max_attempts))

    def claim_again(self, draw: Draw) -> None:
        """An agent retries its claim with its token (the reply was lost): granted again to that claim only."""
        agent = self.agent(draw)
        if agent is None:
            return
        before = row(agent.run_id)
        got = runs.claim(agent.run_id, agent.attempt, agent.worker, token=agent.token)
        fresh = before.status == RunStatus.QUEUED and before.attempt == agent.attempt
        assert (got is not None) == (holds(agent, before) or fresh), f"claim again by {agent} on {before}: {got}"

    def renew(self, draw: Draw) -> None:
        """One worker process renews every lease it thinks it holds, in one statement."""
        worker = draw(st.sampled_from(WORKERS), "worker")
        # The latest claim per attempt (a zombie and its successor can't share a key in one call).
        mine = {(a.run_id, a.attempt): a for a in self.agents if a.worker == worker}
        if not mine:
            return
        before = {key: row(key[0]) for key in mine}
        states = runs.renew_leases(list(mine), {key: a.token for key, a in mine.items()})
        for key, agent in mine.items():
            assert states[key].held == holds(agent, before[key]), f"renewal by {agent} on {before[key]}: {states[key]}"

    def heartbeat(self, draw: Draw) -> None:
        """Task code's heartbeat, saving progress and a checkpoint."""
        agent = self.agent(draw)
        step = draw(st.integers(0, 5), "checkpoint")
        if agent is not None:
            self.fenced_write(
                agent,
                "heartbeat",
                lambda: runs.heartbeat(agent.run_id, agent.attempt, {"step": step}, step, token=agent.token).held,
            )

    def finish(self, draw: Draw) -> None:
        """The body returned, raised (retryable or not), or stopped at a heartbeat that said "cancel"."""
        agent = self.agent(draw)
        end = draw(st.sampled_from(["success", "retryable", "fatal", "cancelled"]), "end")
        if agent is None:
            return
        if end == "success":
            if self.fenced_write(
                agent, end, lambda: runs.finish_success(agent.run_id, agent.attempt, agent.worker, token=agent.token)
            ):
                self.successes[agent.run_id] += 1
        elif end == "cancelled":
            self.fenced_write(
                agent,
                end,
                lambda: runs.finish_cancelled(agent.run_id, agent.attempt, agent.worker, token=agent.token),
                allowed=row(agent.run_id).cancel_requested,
            )
        else:
            policy = RetryPolicy(max_attempts=agent.max_attempts, backoff=HOUR, backoff_max=HOUR, jitter=False)
            exc: Exception = ValueError("temporary trouble") if end == "retryable" else NonRetryable("bad input")
            decision = decide_failure(policy, agent.attempt, exc)
            self.fenced_write(
                agent,
                f"{end} failure",
                lambda: runs.finish_failure(
                    agent.run_id, agent.attempt, decision, str(exc), "", agent.worker, token=agent.token
                ),
            )

    def kill(self, draw: Draw) -> None:
        """The agent vanishes (crash, hang, cut off): its lease runs out. It stays known, as a zombie
        that may wake up and write."""
        agent = self.agent(draw, "holder")
        if agent is not None and holds(agent, row(agent.run_id)):
            note(f"kill {agent}")
            SupervisedRun.objects.filter(pk=agent.run_id).update(lease_expires_at=F("lease_expires_at") - LONG_AGO)

    def take_over(self, draw: Draw) -> None:
        """A holder vanishes, a sweep hands its run on, and another worker takes the new attempt: the
        three steps (``kill``, ``sweep``, ``claim``) at once, so that zombies whose run is running under
        another claim are common, not a rare chain."""
        agent = self.agent(draw, "holder")
        if agent is None or not holds(agent, row(agent.run_id)):
            return
        SupervisedRun.objects.filter(pk=agent.run_id).update(lease_expires_at=F("lease_expires_at") - LONG_AGO)
        self.sweep(draw)
        after = row(agent.run_id)
        if after.status == RunStatus.QUEUED and (agent.run_id, after.attempt) in {m[:2] for m in self.sent}:
            self.deliver(agent.run_id, after.attempt, draw(st.sampled_from(WORKERS), "worker"))

    # ----------------------------------------------------------------- time, supervisor, operator

    def time_passes(self, draw: Draw) -> None:
        """A deadline of one active run that has one comes due (a backoff over, a start timeout or max
        runtime passed), or (``all``) a day passes for every active run at once (the supervisor was down)."""
        column = draw(st.sampled_from(["all", *DEADLINES]), "column")
        index = draw(INDEX, "run")
        active = SupervisedRun.objects.filter(status__in=ACTIVE_STATUSES)
        if column == "all":
            active.update(**{c: F(c) - LONG_AGO for c in DEADLINES})
            return
        waiting = list(active.filter(**{f"{column}__isnull": False}).order_by("pk").values_list("pk", flat=True))
        SupervisedRun.objects.filter(pk=pick(waiting, index)).update(**{column: F(column) - LONG_AGO})

    def sweep(self, draw: Draw) -> None:
        started = db_now()
        report = run_sweep("properties")
        note(f"sweep: {report.as_dict()}")
        assert report.errors.count == 0, f"the sweep failed: {report.errors}"
        assert not report.truncated
        # Everything the sweep selects was acted on: nothing due when it started is left behind.
        for name, due in (
            ("stale", SupervisedRun.objects.stale().filter(lease_expires_at__lt=started)),
            ("overdue", SupervisedRun.objects.overdue().filter(deadline_at__lt=started)),
            ("due retries", SupervisedRun.objects.due_retries().filter(next_check_at__lte=started)),
            ("unstarted", SupervisedRun.objects.unstarted().filter(next_check_at__lte=started)),
        ):
            assert not due.exists(), f"after a sweep, still {name}: {list(due.values(*RUN_FIELDS))}"
        # A held queue_one run waits only for another active run of its live, enabled schedule.
        for held in SupervisedRun.objects.filter(status=RunStatus.QUEUED, next_check_at__isnull=True):
            pt = held.periodic_task
            assert pt is not None and pt.enabled, f"held run {held.pk} of a deleted or disabled schedule"
            others = SupervisedRun.objects.filter(periodic_task=pt, status__in=ACTIVE_STATUSES).exclude(pk=held.pk)
            assert others.exists(), f"held run {held.pk} waits for nothing"

    def cancel(self, draw: Draw) -> None:
        run_id = pick(self.run_ids(), draw(INDEX, "run"))
        if run_id is not None:
            note(f"cancel {run_id}: {runs.request_cancel(run_id)}")

    def retry_now(self, draw: Draw) -> None:
        run_id = pick(self.run_ids(), draw(INDEX, "run"))
        if run_id is None:
            return
        before = row(run_id)
        done = runs.retry_now(run_id)
        note(f"retry now of {run_id} on {before}: {done}")
        assert done == (before.status != RunStatus.RUNNING), f"retry now of {run_id} on {before}: {done}"
        if done:
            self.reopened.add(run_id)
            if before.status == RunStatus.SUCCEEDED:
                self.reopened_success[run_id] += 1

    # ----------------------------------------------------------------- invariants

    @invariant()
    def invariants(self) -> None:
        """Every property, from one read of the runs and one of the attempts."""
        runs_now = {r["pk"]: r for r in SupervisedRun.objects.values(*RUN_FIELDS)}
        attempts = list(RunAttempt.objects.values_list("run_id", "number", "outcome"))
        # No run without a way out.
        for run in runs_now.values():
            if run["status"] in ACTIVE_STATUSES:
                assert any(way_out(c, run) for c in WATCHES[run["status"]]), f"run without a way out: {run}"
        # One success per run (one more per operator retry of a succeeded run).
        succeeded = Counter(run_id for run_id, _, outcome in attempts if outcome == AttemptOutcome.SUCCEEDED)
        assert succeeded == self.successes, f"succeeded attempts {succeeded} != successes reported {self.successes}"
        for run_id, n in succeeded.items():
            assert n <= 1 + self.reopened_success[run_id], f"run {run_id} succeeded {n} times"
        outcomes = {(run_id, number): outcome for run_id, number, outcome in attempts}
        for run in runs_now.values():
            if run["status"] == RunStatus.SUCCEEDED:
                outcome = outcomes.get((run["pk"], run["attempt"]))
                assert outcome == AttemptOutcome.SUCCEEDED, f"succeeded run {run}, its attempt: {outcome}"
        # One run per slot.
        slots = Counter((r["periodic_task_id"], r["scheduled_for"]) for r in runs_now.values() if r["periodic_task_id"])
        assert all(n == 1 for n in slots.values()), f"slots recorded twice: {+slots}"
        # One active attempt per run: the current attempt of a running run, and only it.
        active = sorted((run_id, number) for run_id, number, outcome in attempts if outcome == AttemptOutcome.RUNNING)
        current = sorted((r["pk"], r["attempt"]) for r in runs_now.values() if r["status"] == RunStatus.RUNNING)
        assert active == current, f"running attempt rows {active} != running runs' current attempts {current}"
        # Terminal states stay terminal, unless an operator retried the run.
        for run_id, was in self.terminal.items():
            if run_id in self.reopened or run_id not in runs_now:
                continue
            now = (runs_now[run_id]["status"], runs_now[run_id]["attempt"])
            assert now == was, f"terminal run {run_id} moved from {was} to {now}"
        self.terminal = {
            pk: (r["status"], r["attempt"]) for pk, r in runs_now.items() if r["status"] in TERMINAL_STATUSES
        }
        self.reopened.clear()


def test_random_interleavings_keep_every_invariant(
    sent: list[tuple[int, int, str]], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.SUPERVISOR_MAX_PUBLISHES = MAX_PUBLISHES
    settings.SUPERVISOR_ALERT_RECIPIENTS = []
    # Schedules' runs take the task's policy from the settings: long, as above.
    settings.SUPERVISOR_LEASE_TIMEOUT = HOUR
    settings.SUPERVISOR_START_TIMEOUT = HOUR
    # The sweep asks the broker about an unstarted attempt's queue (core.backlog): external state that
    # would change between replays. Here the broker can't be asked, so a lost message is published
    # again as it always was (the backlog verdicts have tests of their own).
    monkeypatch.setattr(broker, "inspect_queue", lambda name: None)
    Interleavings.sent = sent
    run_state_machine_as_test(Interleavings, settings=profile())
