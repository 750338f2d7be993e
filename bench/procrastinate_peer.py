"""The bench's Procrastinate peer: jobs kept as PostgreSQL rows, no broker (bench/requirements.txt pins 3.10).

Imported by bench/run.py, which calls :func:`measure` once a round; run as a script, it is the worker
(``python bench/procrastinate_peer.py worker DSN``): concurrency 2, a sync no-op task, and it exits once it has
caught up with the queue (``wait=False``), so the bench starts it after the jobs are deferred, as it starts the
Celery workers after filling their queue. Throughput is counted from the first job's ``started`` event to the
last job's ``succeeded`` event (``procrastinate_events``, written by the database's own triggers).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procrastinate

QUEUE = "bench"
CONCURRENCY = 2


def make_app(dsn: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="bench_noop", queue=QUEUE)
    def bench_noop() -> None:
        return None

    return app


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("procrastinate")


def fresh_database(server: str, name: str) -> str:
    """Drop and create the peer's own database, apply Procrastinate's schema; return its DSN."""
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{server}/{name}"
    app = make_app(dsn)
    with app.open():
        app.schema_manager.apply_schema()
    return dsn


def _empty(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE procrastinate_events, procrastinate_jobs, procrastinate_workers CASCADE")


def _drain(dsn: str, n: int, log: Path, timeout: float = 600.0) -> float:
    """Run a worker until it has caught up; return jobs/s from the first start to the last success."""
    import psycopg

    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, __file__, "worker", dsn], stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent
        )
        try:
            code = worker.wait(timeout)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    if code:
        raise RuntimeError(f"the Procrastinate worker exited with {code}:\n{log.read_text()[-3000:]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        succeeded = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'").fetchone()
        first, last = conn.execute(
            "SELECT min(at) FILTER (WHERE type = 'started'), max(at) FILTER (WHERE type = 'succeeded') "
            "FROM procrastinate_events"
        ).fetchone()  # type: ignore[misc]
    assert succeeded is not None and succeeded[0] == n, f"Procrastinate: {succeeded} of {n} jobs succeeded"
    return n / (last - first).total_seconds()


def measure(dsn: str, n: int, log_dir: Path) -> dict[str, Any]:
    """One round: ``n`` jobs deferred one by one, drained; then ``n`` in one ``batch_defer``, drained."""
    log_dir.mkdir(parents=True, exist_ok=True)
    app = make_app(dsn)
    task = app.tasks["bench_noop"]
    result: dict[str, Any] = {}
    with app.open():
        _empty(dsn)
        t = time.perf_counter()
        for _ in range(n):
            task.defer()
        result["one_dispatch_ms"] = (time.perf_counter() - t) / n * 1000
        result["one_rate"] = _drain(dsn, n, log_dir / "procrastinate-one.log")
        _empty(dsn)
        t = time.perf_counter()
        task.batch_defer(*({} for _ in range(n)))
        result["batch_dispatch_ms"] = (time.perf_counter() - t) / n * 1000
        result["batch_rate"] = _drain(dsn, n, log_dir / "procrastinate-batch.log")
    return result


def _worker(dsn: str) -> None:
    app = make_app(dsn)
    app.run_worker(queues=[QUEUE], concurrency=CONCURRENCY, wait=False, delete_jobs="never")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        # Through the module's own name, not __main__ (Procrastinate warns about an app built in __main__).
        import procrastinate_peer

        procrastinate_peer._worker(sys.argv[2])
    else:
        sys.exit("usage: python bench/procrastinate_peer.py worker DSN")
