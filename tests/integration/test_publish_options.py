"""Publishing options through a real RabbitMQ and a real worker: what a run keeps reaches the wire.

The database tests check the options we hand to Celery; these check what Celery and the broker then
do with them: headers, priority and expiry in the message itself, and an expired message never run,
after which the supervisor ends the run ``missed`` instead of publishing it again for ever.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from celery import current_app
from django.utils import timezone
from kombu import Exchange, Queue

from project.processes import wait_until
from project.tasks import noop
from supervisor_app import broker
from supervisor_app.core.states import AttemptOutcome, RunStatus
from supervisor_app.models import RunAttempt, SupervisedRun
from tests.conftest import Live

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_kept_options_are_in_the_message_the_broker_delivers() -> None:
    name = f"supervisor-options-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    expires_at = timezone.now() + timedelta(minutes=10)
    kept = broker.run_options(
        {
            "queue": name,
            "exchange": name,
            "routing_key": name,
            "priority": 4,
            "expires": expires_at,
            "headers": {"tenant": "acme", "periodic_task_name": "nightly"},
        }
    )
    with current_app.connection_for_write() as conn:
        queue(conn.default_channel).declare()
        broker.send(broker.Message(41, 2, "project.tasks.noop", [], {}, kept, "41.2.test"))
        got = conn.SimpleQueue(queue).get(timeout=10)
        try:
            headers, properties = got.headers, got.properties
        finally:
            got.ack()
            queue(conn.default_channel).delete()
    assert headers["id"] == "41.2.test" and headers["task"] == "project.tasks.noop"
    assert headers[broker.HEADER_RUN] == 41 and headers[broker.HEADER_ATTEMPT] == 2
    assert headers["tenant"] == "acme" and headers["periodic_task_name"] == "nightly"
    assert datetime.fromisoformat(headers["expires"]) == expires_at
    assert properties["priority"] == 4
    assert got.content_type == "application/json"


def test_an_expired_message_is_never_run_and_the_supervisor_ends_the_run_missed(live: Live) -> None:
    """Celery turns ``expires`` into the AMQP message TTL: RabbitMQ drops the message unrun (on Redis the
    worker discards it). Published again, it would be dropped again: the sweep ends the run instead."""
    # Recorded and published while no worker runs; its messages expire before one starts.
    run_id = noop.apply_async(expires=timezone.now() + timedelta(seconds=0.3)).run_id
    wait_until(lambda: _expired(run_id), 10, what="the run's messages to expire")
    worker = live.worker("late")
    live.supervisor()
    wait_until(lambda: _status(run_id) == RunStatus.MISSED, 30, what="the run to end missed")
    run = SupervisedRun.objects.get(pk=run_id)
    assert run.started_at is None and "expired" in run.last_error
    assert not RunAttempt.objects.filter(run_id=run_id).exclude(outcome=AttemptOutcome.CANCELLED).exists()
    assert f"project.tasks.noop[{run.task_id}] received" not in worker.output()


def _status(run_id: int) -> str:
    return str(SupervisedRun.objects.filter(pk=run_id).values_list("status", flat=True).first())


def _expired(run_id: int) -> bool:
    options = SupervisedRun.objects.filter(pk=run_id).values_list("options", flat=True).first() or {}
    at = broker.expiry(options)
    return at is not None and at < timezone.now()
