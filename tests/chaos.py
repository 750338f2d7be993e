"""The fault suite, long form (``make chaos``): hundreds of runs under randomised, seeded faults.

Not collected by ``make test`` (the file name does not start with ``test_``); ``make chaos`` runs it
once per seed (``CHAOS_SEEDS``, default three seeds; one seed with ``CHAOS_SEED``). The seed is printed
first: the same seed replays the same fault schedule (timings on a busy machine still vary).

Faults drawn at random, every 1-3 s while runs are flowing: SIGKILL of a worker (a replacement is
started), SIGKILL of a pool child, SIGSTOP of a worker past its lease then SIGCONT (a zombie), SIGKILL
of a supervisor (restarted), ``pg_terminate_backend`` of every client of the test database, and the
server closing this test's RabbitMQ connections. Only this test's processes and connections are
touched; server restarts are not part of it (the servers are shared).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from typing import Any

import pytest
from celery import current_app

from project.processes import Proc
from project.tasks import effect_job, slow_job
from supervisor_app.models import SupervisedRun
from tests.conftest import Live
from tests.faults import tools
from tests.faults.invariants import check
from tests.faults.report import record
from tests.test_faults import settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))
RUNS = int(os.environ.get("CHAOS_RUNS", "300"))
LEASE = 2.0


class Chaos:
    def __init__(self, live: Live, rng: random.Random) -> None:
        self.live, self.rng = live, rng
        self.workers: list[Proc] = []
        self.supervisors: list[Proc] = []
        self.log: list[str] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def add_worker(self, wait: bool = False) -> None:
        self.workers.append(self.live.worker(self._name("w"), concurrency=2, wait=wait))

    def add_supervisor(self, wait: bool = False) -> None:
        self.supervisors.append(self.live.supervisor(self._name("sup"), wait=wait))

    def alive(self, procs: list[Proc]) -> list[Proc]:
        return [p for p in procs if p.popen.poll() is None]

    def fault(self) -> None:
        kinds = ["kill_worker", "kill_child", "zombie", "kill_supervisor", "pg_terminate"]
        if current_app.conf.broker_url.startswith("amqp") and shutil.which("rabbitmqctl"):
            kinds.append("amqp_drop")
        kind = self.rng.choice(kinds)
        workers = self.alive(self.workers)
        if kind == "kill_worker" and len(workers) > 1:
            victim = self.rng.choice(workers)
            victim.kill()
            self.add_worker()
            self.log.append(f"SIGKILL {victim.name}")
        elif kind == "kill_child" and workers:
            victim = self.rng.choice(workers)
            children = victim.children()
            if children:
                os.kill(self.rng.choice(children), signal.SIGKILL)
                self.log.append(f"SIGKILL a pool child of {victim.name}")
        elif kind == "zombie" and len(workers) > 1:
            victim = self.rng.choice(workers)
            victim.signal_group(signal.SIGSTOP)
            time.sleep(LEASE + 1.0)
            victim.signal_group(signal.SIGCONT)
            self.log.append(f"SIGSTOP {victim.name} {LEASE + 1.0:.0f}s")
        elif kind == "kill_supervisor":
            sups = self.alive(self.supervisors)
            if sups:
                victim = self.rng.choice(sups)
                victim.kill()
                self.add_supervisor()
                self.log.append(f"SIGKILL {victim.name}")
        elif kind == "pg_terminate":
            self.log.append(f"pg_terminate_backend x{tools.terminate_backends()}")
        elif kind == "amqp_drop":
            pids = {os.getpid()}
            for p in self.alive(self.workers) + self.alive(self.supervisors):
                pids |= tools.group_pids(p.pid)
            self.log.append(f"close {tools.close_rabbitmq_connections(pids)} AMQP connections")


def test_chaos(live: Live, capsys: Any) -> None:
    with capsys.disabled():
        print(f"\n  chaos seed {SEED} ({RUNS} runs); replay with CHAOS_SEED={SEED} make chaos")
    rng = random.Random(SEED)
    chaos = Chaos(live, rng)
    for _ in range(3):
        chaos.add_worker(wait=False)
    for _ in range(2):
        chaos.add_supervisor(wait=False)
    for w in chaos.workers:
        w.wait_for_output("ready.", timeout=90)
    run_ids: list[int] = []
    next_fault = time.monotonic() + rng.uniform(1.0, 3.0)
    for i in range(RUNS):
        if rng.random() < 0.8:
            run_ids.append(effect_job.delay(rng.randint(1, 4), rng.uniform(0.05, 0.2), f"chaos-{i}").run_id)
        else:  # a body without the helper: may run more than once (at-least-once), completes once
            run_ids.append(slow_job.delay(rng.randint(1, 3), 0.1, f"chaos-{i}").run_id)
        time.sleep(rng.uniform(0.02, 0.1))
        if time.monotonic() >= next_fault:
            chaos.fault()
            next_fault = time.monotonic() + rng.uniform(1.0, 3.0)
    # Faults go on while the backlog drains, then the system settles.
    while SupervisedRun.objects.filter(pk__in=run_ids, status__in=["queued", "running"]).count() > RUNS // 5:
        chaos.fault()
        time.sleep(rng.uniform(1.0, 3.0))
    if not chaos.alive(chaos.supervisors):
        chaos.add_supervisor()
    if not chaos.alive(chaos.workers):
        chaos.add_worker()
    settle(run_ids, timeout=180, watch_leases=False)
    verdict = check(run_ids, expect=["succeeded", "dead"])
    with capsys.disabled():
        print(f"  faults: {'; '.join(chaos.log)}")
        print(f"  {verdict.summary()}; invariants {'held' if verdict.ok else 'VIOLATED'}")
    record(
        f"chaos, seed {SEED}",
        f"{len(chaos.log)} random faults ({', '.join(sorted({f.split()[0] for f in chaos.log}))})",
        verdict,
    )
    verdict.assert_ok()
