"""Fault tools that touch only this test's own processes and connections.

PostgreSQL, RabbitMQ and Redis are shared with other test runs on the machine: nothing here restarts
a server or closes anybody else's connections. (Server restarts are left to ``make chaos``.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from django.db import connection

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


def close_rabbitmq_connections(pids: set[int]) -> int:
    """Close, on the RabbitMQ server, the AMQP connections of ``pids`` (no one else's)."""
    ports = local_ports(pids, 5672)
    if not ports:
        return 0
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "name"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    closed = 0
    for name in listed.splitlines():
        name = name.strip()
        m = re.match(r"[\d.]+:(\d+) -> ", name)
        if m and int(m.group(1)) in ports:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", name, "fault suite: connection dropped"],
                capture_output=True,
                timeout=60,
            )
            closed += 1
    return closed


def close_redis_connections(pids: set[int], url: str) -> int:
    """CLIENT KILL the Redis connections of ``pids`` (no one else's)."""
    import redis

    ports = local_ports(pids, 6379)
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
