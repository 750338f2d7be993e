"""Database drivers and poolers, with real processes: the ways existing projects connect to PostgreSQL.

For each configuration, a supervisor and prefork workers are started with it (``DEMO_*`` knobs of
``project/settings.py``), and a dispatching process with the same configuration and
``ATOMIC_REQUESTS`` records the runs from inside a request (``tests/integration/dispatching.py``).
Every run must succeed on attempt 1 and execute once; each run reports from its worker which driver,
binding, pool and ``CONN_MAX_AGE`` it ran with, so a knob that did not reach the worker fails the test
instead of silently testing the default. Where marked, the worker running a longer run is SIGKILLed
mid-body and the run is recovered once on the other worker.

Before the agent's writes were single statements, psycopg2 never ran a body (``SET LOCAL …; UPDATE
…`` in one string: the claim committed, then ``nextset()`` raised) and server-side binding failed
every claim ("cannot insert multiple commands into a prepared statement").

PgBouncer runs in transaction pooling mode on a private port, started here from the Debian package
(``.ci/run`` installs it): each transaction may run on another server connection, so nothing may
rely on session state (``SET``, prepared statements, server-side cursors, advisory locks).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from project.processes import ROOT, Proc, spawn, wait_until
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import ARTIFACTS, Live
from tests.faults.invariants import check
from tests.faults.test_faults import settle
from tests.integration.test_recovery_integration import executions, running_on

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class Config:
    id: str
    env: dict[str, str] = field(default_factory=dict)
    #: What the worker must report (``project.tasks.connection_facts``).
    driver: str = "psycopg"
    cursor: str = "Cursor"  # Django's psycopg 3 cursor binding client-side (psycopg2: no such attribute)
    pool: bool = False
    #: psycopg 3 prepared statements on the worker's server session.
    prepared: bool = False
    conn_max_age: int | None = 600
    #: Workers, supervisor and dispatcher connect through a PgBouncer in transaction mode.
    pgbouncer: bool = False
    #: SIGKILL the worker running a longer run mid-body; the other worker recovers it.
    kill: bool = False


#: psycopg 3, client-side binding, persistent connections (Django's defaults, CONN_MAX_AGE 600) is
#: what every other integration test runs: not repeated here.
CONFIGS = [
    Config("psycopg3-conn-max-age-0", {"DEMO_CONN_MAX_AGE": "0"}, conn_max_age=0),
    # Django's default with server-side binding: the extended protocol, no named prepared statements.
    Config("psycopg3-server-side-binding", {"DEMO_PG_SERVER_SIDE_BINDING": "1"}, cursor="ServerBindingCursor"),
    # ... and with every statement prepared at its first execution (psycopg 3's prepare_threshold 0).
    Config(
        "psycopg3-server-side-binding-prepared",
        {"DEMO_PG_SERVER_SIDE_BINDING": "1", "DEMO_PG_PREPARE_THRESHOLD": "0"},
        cursor="ServerBindingCursor",
        prepared=True,
    ),
    Config("psycopg3-pool", {"DEMO_PG_POOL": "1", "DEMO_CONN_MAX_AGE": "0"}, pool=True, conn_max_age=0),
    Config("psycopg2", {"DEMO_PG_DRIVER": "psycopg2"}, driver="psycopg2", kill=True),
    Config("pgbouncer-transaction", {"DEMO_PG_DISABLE_SERVER_SIDE_CURSORS": "1"}, pgbouncer=True, kill=True),
    # Server-side binding through PgBouncer works with Django's default (no named prepared statements;
    # PgBouncer 1.18 can't carry those across transactions: system check W030).
    Config(
        "pgbouncer-server-side-binding",
        {"DEMO_PG_DISABLE_SERVER_SIDE_CURSORS": "1", "DEMO_PG_SERVER_SIDE_BINDING": "1"},
        cursor="ServerBindingCursor",
        pgbouncer=True,
    ),
]

#: Short runs: [steps, seconds per step, label].
SHORT = [[3, 0.05, f"short-{i}"] for i in range(4)]
#: The run whose worker is killed: long enough to be killed mid-body after the short ones are done.
LONG = [25, 0.2, "long"]


# ---------------------------------------------------------------- PgBouncer on a private port


@dataclass
class PgBouncer:
    port: int
    proc: Proc

    def url(self, direct: str) -> str:
        """``direct`` (postgres://user@host:port/name) pointed at this PgBouncer instead."""
        scheme, rest = direct.split("://", 1)
        userinfo, _, hostpath = rest.rpartition("@")
        _, _, path = hostpath.partition("/")
        return f"{scheme}://{userinfo}@127.0.0.1:{self.port}/{path}"

    def stats(self, database: str) -> dict[str, int]:
        """The row of ``SHOW STATS`` for ``database`` (PgBouncer's admin console)."""
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer", "-AF\t",
             "-c", "SHOW STATS"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()  # fmt: skip
        header = out[0].split("\t")
        for line in out[1:]:
            values = line.split("\t")
            if values[0] == database:
                return {k: int(v) for k, v in zip(header[1:], values[1:], strict=True)}
        return {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pgbouncers(request: pytest.FixtureRequest) -> Iterator[Callable[[], PgBouncer]]:
    """Start PgBouncers (transaction pooling, trust auth, every database to 127.0.0.1:5432) on
    private ports; stopped at teardown (requested before ``live``: after its processes stop)."""
    started: list[tuple[PgBouncer, str]] = []
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)[:80]

    def start() -> PgBouncer:
        if not os.path.exists(PGBOUNCER):
            pytest.fail("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
        # PgBouncer refuses to run as root: it then drops to the postgres user (-u), which must read
        # its files, hence a world-readable directory of its own.
        workdir = tempfile.mkdtemp(prefix="pgbouncer-")
        os.chmod(workdir, 0o755)
        port = free_port()
        ini = Path(workdir, "pgbouncer.ini")
        users = Path(workdir, "users.txt")
        users.write_text('"postgres" ""\n')
        ini.write_text(
            "[databases]\n"
            "* = host=127.0.0.1 port=5432\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\nadmin_users = postgres\n"
            "pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 20\n"
        )
        for path in (ini, users):
            path.chmod(0o644)
        argv = [PGBOUNCER]
        if os.geteuid() == 0:
            argv += ["-u", "postgres" if _user_exists("postgres") else "nobody"]
        proc = spawn(f"pgbouncer-{port}", [*argv, str(ini)], ARTIFACTS / "logs" / safe)
        bouncer = PgBouncer(port, proc)
        started.append((bouncer, workdir))
        proc.wait_for_output(f"listening on 127.0.0.1:{port}", timeout=10)
        return bouncer

    try:
        yield start
    finally:
        for bouncer, workdir in started:
            bouncer.proc.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------- the dispatching process


def start_dispatcher(live: Live, env: dict[str, str], runs: list[list[Any]]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.dispatching", json.dumps(runs)],
        cwd=ROOT,
        env={**os.environ, **live.env, **env, "DEMO_ATOMIC_REQUESTS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dispatcher_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"dispatcher failed:\n{err[-3000:]}"
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


# ---------------------------------------------------------------- the test


def attempts(run_id: int) -> list[tuple[int, str, str]]:
    return [
        (a.number, a.outcome, a.worker.partition("@")[0])
        for a in RunAttempt.objects.filter(run_id=run_id).order_by("number")
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_supervised_runs_succeed_once(
    config: Config, pgbouncers: Callable[[], PgBouncer], live: Live, capsys: Any
) -> None:
    began = time.monotonic()
    env = dict(config.env)
    bouncer = None
    if config.pgbouncer:
        bouncer = pgbouncers()
        env["DATABASE_URL"] = bouncer.url(live.env["DATABASE_URL"])
    runs = [LONG, *SHORT] if config.kill else SHORT
    # Everything starts at once (two cores): the runs wait in the queue until a worker is ready.
    dispatcher = start_dispatcher(live, env, runs)
    procs = [live.supervisor(wait=False, **env), live.worker(f"{config.id}-a", concurrency=2, wait=False, **env)]
    if config.kill:
        procs.append(live.worker(f"{config.id}-b", concurrency=2, wait=False, **env))
    for proc in procs:
        proc.wait_for_output("sweeping every" if proc.name == "supervisor" else "ready.", timeout=60)
    report = dispatcher_report(dispatcher)

    # The dispatching process: same driver, each request one transaction; the failed request's runs
    # were rolled back with it and never published.
    assert report["driver"] == config.driver
    assert report["atomic_requests"] is True and report["in_atomic_block"] is True
    assert report["failed_status"] == 500
    assert not SupervisedRun.objects.filter(pk__in=report["rolled_back"]).exists()
    run_ids: list[int] = report["run_ids"]
    long_id = run_ids[0] if config.kill else None
    short_ids = run_ids[1:] if config.kill else run_ids

    wait_until(
        lambda: SupervisedRun.objects.filter(pk__in=short_ids, status="succeeded").count() == len(short_ids),
        30,
        what="the short runs to succeed",
    )
    killed = ""
    if long_id is not None:
        # The short runs are done: only the long run is on a worker when its worker is killed.
        run = wait_until(
            lambda: SupervisedRun.objects.filter(pk=long_id, status="running", checkpoint__gte=2).first(),
            30,
            what="the long run to make progress",
        )
        assert int(run.checkpoint) < LONG[0], "the long run ended before its worker could be killed"
        killed = str(run.worker).partition("@")[0]
        victim = next(p for p in procs if p.name == killed)
        assert running_on([long_id], f"{killed}@") == [long_id]
        victim.kill()
    settle(run_ids, timeout=60)
    check(run_ids, expect=["succeeded"]).assert_ok()
    assert executions(run_ids) == {r: 1 for r in run_ids}

    runs_by_id = {r.pk: r for r in SupervisedRun.objects.filter(pk__in=run_ids)}
    for run_id in short_ids:
        assert runs_by_id[run_id].attempt == 1
        assert [(n, outcome) for n, outcome, _ in attempts(run_id)] == [(1, "succeeded")]
    if long_id is not None:
        survivor = f"{config.id}-b" if killed == f"{config.id}-a" else f"{config.id}-a"
        assert attempts(long_id) == [(1, "lost", killed), (2, "succeeded", survivor)]

    # What the workers ran with, as each run reported it at its last heartbeat.
    facts = [runs_by_id[r].progress for r in run_ids]
    for fact in facts:
        assert fact["driver"] == config.driver, fact
        assert fact["pool"] is config.pool, fact
        assert fact["conn_max_age"] == config.conn_max_age, fact
        if config.driver == "psycopg":
            assert fact["cursor"] == config.cursor, fact
        # Named prepared statements on the worker's session: exactly when configured.
        assert (fact["prepared"] > 0) is config.prepared, fact
    if bouncer is not None:
        stats = bouncer.stats(str(live.env["DATABASE_URL"]).rpartition("/")[2])
        assert stats.get("total_xact_count", 0) > 0, stats

    for proc in procs:
        if proc.name != killed:
            assert "Traceback" not in proc.output(), f"{proc.name}:\n{proc.output()[-3000:]}"
    with capsys.disabled():
        recovered = f", killed {killed} mid-run, recovered once on attempt 2" if killed else ""
        took = time.monotonic() - began
        print(f"\n  [drivers] {config.id}: {len(run_ids)} runs succeeded once{recovered} ({took:.1f}s)")
