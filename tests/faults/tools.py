"""Fault tools that touch only this test's own processes and connections.

PostgreSQL, RabbitMQ and Redis on their usual ports are shared with other test runs on the machine:
nothing here restarts a server or closes anybody else's connections. Restarts and crashes use the
private servers of ``tests.faults.servers``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.db import connection
from django.db.models import F
from django.utils import timezone

from supervisor_app import runs
from supervisor_app.models import RunAttempt, SupervisedRun

if TYPE_CHECKING:
    from django_celery_beat.models import PeriodicTask

SKEW_DIR = Path(__file__).resolve().parent / "skew"


def group_pids(pgid: int) -> set[int]:
    """Every process of a process group (a worker's main process and its pool children)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.add(int(entry.name))
    return pids


def local_ports(pids: set[int], remote_port: int) -> set[int]:
    """Local ports of the TCP connections that ``pids`` hold to 127.0.0.1:``remote_port``."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{remote_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports: set[int] = set()
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[2] if line.split()[0].isdigit() else line.split()[3]
            ports.add(int(local.rsplit(":", 1)[1]))
    return ports


def terminate_backends(exclude_self: bool = True) -> int:
    """pg_terminate_backend for every client of this test's database (workers, supervisors)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def rabbitmqctl_available() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    probe = subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60)
    return probe.returncode == 0


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def close_rabbitmq_connections(pids: set[int], port: int = 5672, ctl: Callable[..., str] = _rabbitmqctl) -> int:
    """Close, on the RabbitMQ server, the AMQP connections of ``pids`` (no one else's).

    ``ctl`` runs rabbitmqctl against the node listening on ``port`` (a private node has its own).
    """
    ports = local_ports(pids, port)
    if not ports:
        return 0
    closed = 0
    # close_connection takes the connection's Erlang pid; the name gives the client's port.
    for line in ctl("-q", "list_connections", "pid", "name").splitlines():
        pid, _, name = line.strip().partition("\t")
        m = re.match(r"[\d.]+:(\d+) -> ", name)
        if m and int(m.group(1)) in ports:
            try:
                ctl("-q", "close_connection", pid, "fault suite: connection dropped")
            except (subprocess.CalledProcessError, RuntimeError):
                continue  # gone already
            closed += 1
    return closed


def close_redis_connections(pids: set[int], url: str) -> int:
    """CLIENT KILL the Redis connections of ``pids`` (no one else's)."""
    import redis

    ports = local_ports(pids, int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
    client = redis.Redis.from_url(url)
    killed = 0
    for info in client.client_list():
        addr = str(info.get("addr", ""))
        if addr and int(addr.rsplit(":", 1)[1]) in ports:
            try:
                client.client_kill(addr)
                killed += 1
            except redis.ResponseError:
                pass
    client.close()
    return killed


def skewed_env(seconds: float) -> dict[str, str]:
    """Environment for a process whose wall clock is ``seconds`` off (see ``skew/sitecustomize.py``)."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{SKEW_DIR}{os.pathsep}{path}" if path else str(SKEW_DIR), "FAULTS_CLOCK_SKEW": str(seconds)}


def ghost_runs(n: int, lease: float, task: str = "project.tasks.noop") -> list[int]:
    """``n`` runs `running` on attempt 1 for an agent that died 5 minutes ago (leases long expired).

    Built in bulk, as the supervisor would find them after a whole fleet of workers vanished.
    """
    policy = runs.RunPolicy(max_attempts=3, lease_timeout=lease, start_timeout=lease, max_runtime=None)
    template = runs.create_run(task, [], {}, policy, countdown=3600)
    assert template is not None
    fields = {
        f.attname: getattr(SupervisedRun.objects.get(pk=template.pk), f.attname)
        for f in SupervisedRun._meta.concrete_fields
        if not f.primary_key
    }
    fields.update(status="running", worker="ghost@dead-host", publish_count=1, next_check_at=None, task_id="")
    ghosts = SupervisedRun.objects.bulk_create([SupervisedRun(**fields) for _ in range(n)])
    SupervisedRun.objects.filter(pk=template.pk).delete()
    run_ids = [r.pk for r in ghosts]
    RunAttempt.objects.bulk_create(
        [RunAttempt(run_id=pk, number=1, outcome="running", worker="ghost@dead-host") for pk in run_ids]
    )
    SupervisedRun.objects.filter(pk__in=run_ids).update(
        lease_expires_at=timezone.now() - timedelta(minutes=5), task_id=F("id")
    )
    return run_ids


def every_second_schedule(name: str, grace: float) -> PeriodicTask:
    """A supervised schedule firing ``effect_job`` every second (no catch-up), for racing beats."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from supervisor_app.models import SupervisionPolicy

    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    pt = PeriodicTask.objects.create(
        name=name,
        task="project.tasks.effect_job",
        interval=interval,
        kwargs='{"steps": 1, "step_seconds": 0.05, "label": "beat"}',
    )
    SupervisionPolicy.objects.create(periodic_task=pt, alert_grace=timedelta(seconds=grace), catch_up="none")
    return pt
