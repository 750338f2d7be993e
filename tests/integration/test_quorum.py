"""RabbitMQ quorum queues (``task_default_queue_type = "quorum"``), the queue type RabbitMQ recommends
for durability. ``make test-quorum`` runs this file and the kill and hang scenarios of
``test_recovery_integration`` with the default queue declared as a quorum queue (Celery then turns
off global QoS by itself). Outside that target the queue is classic and this file's check is skipped.
"""

from __future__ import annotations

import os

import pytest
from celery import current_app

from project.processes import wait_until
from project.tasks import quiet_job
from tests.conftest import Live
from tests.faults import tools
from tests.integration.test_recovery_integration import all_status, executions

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

QUORUM = os.environ.get("CELERY_TASK_DEFAULT_QUEUE_TYPE") == "quorum"


@pytest.mark.skipif(not QUORUM, reason="the default queue is classic (make test-quorum declares a quorum queue)")
@pytest.mark.skipif(not tools.rabbitmqctl_available(), reason="needs rabbitmqctl to read the queue's type")
def test_runs_go_through_a_quorum_queue(live: Live) -> None:
    live.supervisor()
    live.worker("quorum-w", concurrency=2)
    queue = current_app.conf.task_default_queue
    listed = tools._rabbitmqctl("list_queues", "-q", "name", "type")
    types = dict(line.split()[:2] for line in listed.splitlines() if len(line.split()) >= 2)
    assert types.get(queue) == "quorum", listed
    run_ids = [quiet_job.delay(0.1, f"quorum-{i}").run_id for i in range(5)]
    wait_until(lambda: all_status(run_ids, "succeeded"), 60, what="the runs through the quorum queue")
    assert executions(run_ids) == {r: 1 for r in run_ids}
