"""The fault suite, server part: PostgreSQL, RabbitMQ and Redis restarted, crashed and starved.

These run against private servers (``tests.faults.servers``) that ``make test-restarts`` starts on
other loopback ports, because a restart drops every client of a server: the machine's shared servers
are never touched. Outside that wrapper they are skipped (``FAULTS_SERVERS`` unset).

Each scenario drives real workers and supervisors through a real outage, then checks every
invariant of ``tests.faults.invariants`` in the database and records the outcome in the README's
table (``tests.faults.report``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from django.db import connection

from project.processes import wait_until
from project.tasks import effect_job
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live
from tests.faults import servers as private
from tests.faults import tools
from tests.faults.test_faults import LEASE, running_count, settle, verify

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.restarts]


@pytest.fixture
def servers() -> Iterator[private.Servers]:
    found = private.from_env()
    if found is None:
        pytest.skip("needs the private servers: run through `make test-restarts`")
    yield found
    # Whatever a scenario did, the next one starts with every server up.
    for port, start in (
        (found.postgres.port, found.postgres.start),
        (found.rabbit.port, found.rabbit.start),
        (found.redis.port, found.redis.start),
    ):
        if not private.port_open(port):
            start()
    connection.close()


def reconnect() -> None:
    """This test process's own connection did not survive the restart either."""
    connection.close()


def one_snapshot_counts(run_ids: list[int]) -> tuple[int, int, int]:
    """Runs on attempt 2, attempt-2 rows, and lost attempt-1 rows, read in one snapshot."""
    runs, attempts = SupervisedRun._meta.db_table, RunAttempt._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT (SELECT count(*) FROM {runs} WHERE id = ANY(%(ids)s) AND attempt = 2),
                       (SELECT count(*) FROM {attempts} WHERE run_id = ANY(%(ids)s) AND number = 2),
                       (SELECT count(*) FROM {attempts}
                         WHERE run_id = ANY(%(ids)s) AND number = 1 AND outcome = 'lost')""",
            {"ids": run_ids},
        )
        row = cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def succeeded(run_ids: list[int]) -> int:
    return SupervisedRun.objects.filter(pk__in=run_ids, status="succeeded").count()


# ---------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize("outage", [1.0, 4.0], ids=["shorter-than-the-lease", "longer-than-the-lease"])
def test_postgres_restarted_while_runs_heartbeat(live: Live, servers: private.Servers, outage: float) -> None:
    live.supervisor()
    workers = [live.worker("w1", concurrency=2), live.worker("w2", concurrency=2)]
    run_ids = [effect_job.delay(16, 0.25, f"pg-restart-{i}").run_id for i in range(8)]
    wait_until(lambda: running_count(run_ids) >= 3, 60, what="runs heartbeating")
    began = time.monotonic()
    servers.postgres.stop("fast")
    time.sleep(outage)  # the outage itself: nothing to poll, the server is down on purpose
    servers.postgres.start()
    took = time.monotonic() - began
    reconnect()
    settle(run_ids, timeout=120)
    failed = "".join(w.output() for w in workers).count("lease renewal failed")
    assert failed > 0, "the outage must have hit the lease renewals"
    v = verify(
        f"PostgreSQL restarted (clean shutdown), down {outage:.0f}s, while runs heartbeat (lease {LEASE:.0f}s)",
        f"server down {took:.1f}s; {failed} lease renewals failed, then reconnected",
        run_ids,
        expect=["succeeded"],
    )
    if took < LEASE:
        assert v.recovered == 0, "an outage shorter than the lease must not cost an attempt"


def test_postgres_crashed_mid_sweep(live: Live, servers: private.Servers) -> None:
    """An immediate stop is a crash: unflushed WAL is lost, the sweep's open transaction rolled back."""
    n = 1000
    run_ids = tools.ghost_runs(n, LEASE)
    sup = live.supervisor("sup", wait=False, SUPERVISOR_SWEEP_BATCH_SIZE="10")
    wait_until(
        lambda: SupervisedRun.objects.filter(pk__in=run_ids, attempt=2).count() >= 100, 60, 0.005, "100 rows handled"
    )
    servers.postgres.stop("immediate")
    servers.postgres.start()
    reconnect()
    # Right after crash recovery: every row is untouched or fully handled, never half. The
    # supervisor is already sweeping again, so the three counts come from one statement (one
    # snapshot); separate queries would race it (seen in CI: 140 attempts vs 130 runs).
    handled, second_attempts, lost_firsts = one_snapshot_counts(run_ids)
    assert 0 < handled < n, "the crash must land mid-sweep"
    assert second_attempts == handled
    assert lost_firsts == handled
    live.worker("w1", concurrency=2)
    settle(run_ids, timeout=150, watch_leases=False)
    assert sup.popen.poll() is None, "the supervisor must survive the database crash"
    assert "sweep failed; retrying" in sup.output()
    verify(
        f"PostgreSQL crashed (immediate stop) mid-sweep over {n} expired leases",
        f"crashed with {handled} of {n} rows handled and committed; the supervisor reconnected and "
        "finished; unpublished attempts were published again; all ran once",
        run_ids,
        expect=["succeeded"],
    )
    assert RunAttempt.objects.filter(run_id__in=run_ids, number=3).count() == 0


def test_postgres_crashed_while_workers_finish_with_asynchronous_commits(live: Live, servers: private.Servers) -> None:
    """Agent writes skip the WAL flush (SUPERVISOR_ASYNC_AGENT_COMMIT): a crash may forget the last
    few. A forgotten claim or finish must come back as a lost attempt, never as a lost run."""
    live.supervisor()
    live.worker("w1", concurrency=2)
    live.worker("w2", concurrency=2)
    run_ids = [effect_job.delay(1, 0.02, f"pg-crash-{i}").run_id for i in range(60)]
    wait_until(lambda: succeeded(run_ids) >= 10, 60, what="runs finishing")
    servers.postgres.stop("immediate")
    servers.postgres.start()
    reconnect()
    settle(run_ids, timeout=120, watch_leases=False)
    verify(
        "PostgreSQL crashed (immediate stop) while workers claim and finish runs",
        "agent writes not yet flushed were lost with the crash and came back as lost attempts",
        run_ids,
        expect=["succeeded"],
    )


def test_database_connection_limit_reached_by_idle_clients(live: Live, servers: private.Servers) -> None:
    """Workers and supervisor log in as a role with CONNECTION LIMIT; idle clients take every slot."""
    limit = 8
    with connection.cursor() as cursor:
        cursor.execute("DO $$ BEGIN CREATE ROLE faults_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        cursor.execute(f"ALTER ROLE faults_app CONNECTION LIMIT {limit}")
        cursor.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO faults_app")
        cursor.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO faults_app")
    db = connection.settings_dict["NAME"]
    app_url = servers.postgres.url(db).replace("postgres@", "faults_app@")
    sup = live.supervisor(DATABASE_URL=app_url)
    worker = live.worker("w1", concurrency=2, DATABASE_URL=app_url)
    warm = [effect_job.delay(1, 0.05, f"warm-{i}").run_id for i in range(4)]
    settle(warm)

    idle: list[psycopg.Connection[tuple[object, ...]]] = []

    def starve() -> bool:
        """Cut the app's connections and take their slots, until every slot is an idle client's."""
        with connection.cursor() as cursor:
            mine = [c.info.backend_pid for c in idle]
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE usename = 'faults_app' AND NOT (pid = ANY(%s))",
                [mine],
            )
        while len(idle) < limit:
            try:
                idle.append(psycopg.connect(app_url.replace("postgres://", "postgresql://"), autocommit=True))
            except psycopg.OperationalError as exc:
                assert "too many connections" in str(exc)
                return False
        return True

    try:
        wait_until(starve, 30, 0.05, "idle clients holding every connection slot")
        run_ids = [effect_job.delay(1, 0.05, f"starved-{i}").run_id for i in range(10)]
        wait_until(lambda: "database unavailable" in worker.output(), 30, what="a refused claim")
        wait_until(lambda: "sweep failed" in sup.output(), 30, what="a failed sweep")
        starved = SupervisedRun.objects.filter(pk__in=run_ids).values_list("status", flat=True)
        assert set(starved) == {"queued"}, "nothing may run, fail or be lost while no connection is free"
    finally:
        for c in idle:
            c.close()
    released = time.monotonic()
    settle(run_ids, timeout=90)
    took = time.monotonic() - released
    assert sup.popen.poll() is None and worker.popen.poll() is None
    verify(
        f"database connection limit ({limit}) reached by idle clients",
        "claims refused (deliveries dropped, runs left queued), sweeps failed and retried; once the "
        f"idle clients left, the supervisor published the attempts again: all done {took:.1f}s later",
        run_ids,
        expect=["succeeded"],
    )


# ---------------------------------------------------------------- brokers


def test_rabbitmq_restarted_with_runs_queued_and_running(live: Live, servers: private.Servers) -> None:
    live.supervisor()
    workers = [live.worker("w1", concurrency=2), live.worker("w2", concurrency=1)]
    run_ids = [effect_job.delay(2, 0.2, f"amqp-restart-{i}").run_id for i in range(30)]
    wait_until(lambda: succeeded(run_ids) >= 4, 60, what="runs finishing")
    servers.rabbit.stop()
    # Dispatched while the broker is down: recorded, not published.
    during = [effect_job.delay(1, 0.05, f"amqp-down-{i}").run_id for i in range(5)]
    assert set(SupervisedRun.objects.filter(pk__in=during).values_list("status", flat=True)) == {"queued"}
    servers.rabbit.start()
    settle(run_ids + during, timeout=120)
    reconnects = sum(w.output().count("Connection to broker lost") for w in workers)
    verify(
        "RabbitMQ shut down and booted again with runs queued and running; 5 runs dispatched while down",
        f"{reconnects} worker consumers lost the broker and reconnected; durable queued messages were "
        "delivered after the boot; runs dispatched during the outage were published by the supervisor",
        run_ids + during,
        expect=["succeeded"],
    )


def test_rabbitmq_crashed_with_runs_queued(live: Live, servers: private.Servers) -> None:
    live.supervisor()
    run_ids = [effect_job.delay(1, 0.05, f"amqp-crash-{i}").run_id for i in range(20)]
    servers.rabbit.crash()  # SIGKILL: what was not yet on disk is gone
    servers.rabbit.start()
    live.worker("w1", concurrency=2)
    settle(run_ids, timeout=120)
    again = SupervisedRun.objects.filter(pk__in=run_ids, publish_count__gte=2).count()
    verify(
        "RabbitMQ SIGKILLed with 20 runs queued and no worker",
        f"after the boot, messages that had reached the disk were delivered; the supervisor published "
        f"{again} attempts again after the start timeout",
        run_ids,
        expect=["succeeded"],
    )


def test_redis_restarted_loses_the_queue_and_the_supervisor_publishes_again(
    live: Live, servers: private.Servers
) -> None:
    import redis

    url = servers.redis.url(1)
    env = {"CELERY_BROKER_URL": url}
    live.supervisor(**env)
    # A countdown: recorded here, published through Redis by the supervisor when due (this test
    # process talks to RabbitMQ).
    run_ids = [effect_job.apply_async((1, 0.05, f"redis-restart-{i}"), countdown=0.01).run_id for i in range(15)]
    client = redis.Redis.from_url(url)
    wait_until(lambda: client.llen(live.queue) == len(run_ids), 30, what="every run's message in Redis")
    client.close()
    servers.redis.restart()  # no persistence: every queued message is gone
    client = redis.Redis.from_url(url)
    assert client.llen(live.queue) == 0
    client.close()
    live.worker("w1", concurrency=2, **env)
    settle(run_ids, timeout=90)
    publishes = SupervisedRun.objects.filter(pk__in=run_ids).values_list("publish_count", flat=True)
    assert min(publishes) >= 2, "every lost message must have been published again"
    verify(
        "Redis (no persistence) restarted with 15 runs queued",
        "every queued message was lost with the restart; the supervisor published each attempt again "
        "after the start timeout; all ran once",
        run_ids,
        expect=["succeeded"],
    )
