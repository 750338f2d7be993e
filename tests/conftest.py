from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from project.processes import Proc, spawn_beat, spawn_supervisor, spawn_worker

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

#: Short supervision intervals for tests that start real processes (seconds).
FAST = {
    "SUPERVISOR_HEARTBEAT_INTERVAL": "0.3",
    "SUPERVISOR_LEASE_TIMEOUT": "2",
    "SUPERVISOR_SWEEP_INTERVAL": "0.3",
    "SUPERVISOR_BACKOFF": "0.2",
    # Below the lease, so RabbitMQ drops a hung worker's connection before its lease expires.
    "CELERY_BROKER_HEARTBEAT": "1",
}


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("FAULTS_SERVERS"):
        # Restarting a server drops everybody's connections: only on servers of our own.
        private = pytest.mark.skip(reason="restarts servers: run by `make test-restarts` on private servers")
        for item in items:
            if "restarts" in item.keywords:
                item.add_marker(private)
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL and a broker (run through `make test`)")
    for item in items:
        if "postgres" in item.keywords or "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def queues_not_inspected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweeps run in a test process don't ask the broker about queues (as on the filesystem transport):
    a test's queue has no consumer, which the sweep would take for a worker outage. Tests of the
    inspection set ``broker.inspect_queue`` themselves; processes a test starts always ask."""
    from supervisor_app import broker

    monkeypatch.setattr(broker, "inspect_queue", lambda name: None)


@pytest.fixture
def fast_settings(settings: Any) -> Any:
    for key, value in FAST.items():
        setattr(settings, key, float(value))
    return settings


@pytest.fixture
def live(transactional_db: None, settings: Any, request: pytest.FixtureRequest) -> Iterator[Live]:
    """Real processes sharing the test database and the broker; stopped at teardown.

    The queue comes from CELERY_TASK_DEFAULT_QUEUE (the Makefile gives the tests their own) and is
    purged first, so nothing left by an earlier test is delivered.
    """
    for key, value in FAST.items():
        setattr(settings, key, float(value))
    from celery import current_app

    queue = current_app.conf.task_default_queue
    with current_app.connection_for_write() as conn:
        bound = current_app.amqp.queues[queue](conn.default_channel)
        bound.declare()
        bound.purge()
    live = Live(request.node.name, queue)
    try:
        yield live
    finally:
        live.stop_all()


class Live:
    def __init__(self, test_name: str, queue: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in test_name)[:80]
        self.log_dir = ARTIFACTS / "logs" / safe
        self.queue = queue
        self.procs: list[Proc] = []
        db = connection.settings_dict
        url = os.environ["DATABASE_URL"]
        base, _, _name = url.rpartition("/")
        self.env = {
            **FAST,
            "DATABASE_URL": f"{base}/{db['NAME']}",
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "SUPERVISOR_LOG_LEVEL": "INFO",
        }

    def _track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def worker(self, name: str, concurrency: int = 1, wait: bool = True, pool: str = "prefork", **env: str) -> Proc:
        proc = self._track(
            spawn_worker(name, self.log_dir, {**self.env, **env}, concurrency=concurrency, pool=pool, queues=self.queue)
        )
        if wait:
            proc.wait_for_output("ready.", timeout=60)
        return proc

    def supervisor(self, name: str = "supervisor", wait: bool = True, **env: str) -> Proc:
        proc = self._track(spawn_supervisor(name, self.log_dir, {**self.env, **env}))
        if wait:
            proc.wait_for_output("sweeping every", timeout=60)
        return proc

    def beat(self, name: str = "beat", **env: str) -> Proc:
        return self._track(spawn_beat(name, self.log_dir, {**self.env, **env}))

    def stop_all(self) -> None:
        # 5 s for a warm shutdown, then SIGKILL: a gevent worker's warm shutdown takes the whole
        # default wait (10 s) for nothing, four times per pool run.
        for proc in self.procs:
            proc.stop(timeout=5.0)


def deliver(task: Any, message_id: str, *args: Any, **request: Any) -> Any:
    """Execute ``task`` in this process as a worker would on a message with this Celery id (and the
    given request attributes, e.g. the run headers; none: a message that carries no run)."""
    task.push_request(id=message_id, hostname="w@test", called_directly=False, is_eager=False, **request)
    try:
        return task(*args)
    finally:
        task.pop_request()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, str]]:
    """Capture publishes instead of sending them to a broker (service-level tests)."""
    calls: list[tuple[int, int, str]] = []
    from supervisor_app import broker

    def fake_send(message: Any, producer: Any = None) -> None:
        calls.append((message.run_id, message.attempt, message.task_name))

    monkeypatch.setattr(broker, "send", fake_send)
    return calls


@pytest.fixture
def expire() -> Callable[..., None]:
    """Push a run's lease (or other deadline) into the past, as if time had passed."""
    from datetime import timedelta

    from django.db.models import F

    from supervisor_app.models import SupervisedRun

    def _expire(run_id: int, field: str = "lease_expires_at", seconds: float = 3600) -> None:
        SupervisedRun.objects.filter(pk=run_id).update(**{field: F(field) - timedelta(seconds=seconds)})

    return _expire
