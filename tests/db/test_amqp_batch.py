"""Publishing in batches on py-amqp (``amqp_batch``): the frames are py-amqp's own, byte for byte; a
batch of our messages writes what kombu would write one by one; a failed write leaves the whole
batch unsent; anything that watches the publishing still sees every message."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from amqp import Message as AmqpMessage
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from celery import current_app, signals
from kombu import Connection

from supervisor_app import amqp_batch, broker
from supervisor_app.runs.publishing import RunPublisher


class Capture:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.data += bytes(data)
        self.writes += 1


def py_amqp_frames(
    message: AmqpMessage, frame_max: int, exchange: str, routing_key: str, flags: tuple[bool, bool]
) -> bytes:
    """What py-amqp's own writer writes for ``basic_publish(message, exchange, routing_key, …)``."""
    capture = Capture()
    connection = type("Connection", (), {"frame_max": frame_max, "bytes_sent": 0})()
    write = frame_writer(connection, capture)
    write(1, 3, spec.Basic.Publish, dumps("Bssbb", (0, exchange, routing_key, *flags)), message)
    return bytes(capture.data)


HEADERS: list[dict[str, Any]] = [
    {},
    {"lang": "py", "task": "t", "id": "1.2.x", "retries": 0, "eta": None, "timelimit": (None, None)},
    {"n": 2**31, "m": -(2**31), "k": 2147483647, "j": -2147483647, "b": True, "c": False, "f": 1.5, "z": -0.0},
    {"one": 1, "true": True, "float": 1.0},  # equal values of three types: three encodings
    {"nested": {"a": [1, "b", None, {"c": (2.5, False)}]}, "list": [], "dict": {}},
    {"when": datetime(2026, 12, 2, 15, 0, tzinfo=timezone.utc), "d": Decimal("12.34")},
    {"ünï": "çødé ✓", "quote'": 'a"b\\c', "bytes": b"raw"},
    {"a": [1, True, 1.0, "s✓", None, 2**40, -0.0], "t": ("x",), "e": (), "m": [Decimal("1.5"), "y"], "n": [[1], (2,)]},
]


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("body", [b"", b'[[1], {}, {"callbacks": null}]', "text body ✓", b"x" * 300_000])
def test_the_frames_are_the_ones_py_amqp_writes(headers: dict[str, Any], body: Any) -> None:
    props = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 4,
        "correlation_id": "1.2.x",
        "reply_to": "f8a1-…",
        "expiration": "60000",
    }
    for frame_max in (4096, 131072):
        for exchange, routing_key, flags in (("", "q", (False, False)), ("ex", "rk.é", (True, False))):
            # Twice: the second encodes the headers from what the first left (amqp_batch._last).
            for _ in range(2):
                want = py_amqp_frames(
                    AmqpMessage(body, application_headers=headers, **props), frame_max, exchange, routing_key, flags
                )
                got = amqp_batch.publish_frames(
                    3, frame_max, AmqpMessage(body, application_headers=headers, **props), exchange, routing_key, *flags
                )
                assert got == want


def test_a_value_seen_before_under_another_type_is_encoded_anew() -> None:
    """``1``, ``1.0`` and ``True`` are equal in Python; each is written with its own AMQP type."""
    for value in (1, True, 1.0, 1, "1", None, 1):
        message = AmqpMessage(b"{}", application_headers={"v": value}, content_type="application/json")
        assert amqp_batch.publish_frames(3, 131072, message, "", "q") == py_amqp_frames(
            AmqpMessage(b"{}", application_headers={"v": value}, content_type="application/json"),
            131072,
            "",
            "q",
            (False, False),
        )


# --------------------------------------------------------------------------- on a RabbitMQ connection

AMQP_URL = os.environ.get("CELERY_BROKER_URL", "")
needs_rabbitmq = pytest.mark.skipif(not AMQP_URL.startswith("amqp"), reason="needs the RabbitMQ broker")


def messages(queue: str, n: int) -> list[broker.Message]:
    """Messages of several plans and options, interleaved (so a batch keeps several templates)."""
    out = []
    kept_by_kind = [
        broker.run_options({"queue": queue}),
        broker.run_options({"queue": queue, "priority": 3, "headers": {"tenant": "acme"}}),
        broker.run_options({"queue": queue, "expires": 600}),
    ]
    for i in range(n):
        kept = kept_by_kind[i % len(kept_by_kind)]
        args = [i, "label-" + str(i)] if i % 2 else [{"nested": [i]}]
        out.append(
            broker.Message(100 + i, 1 + i % 2, "project.tasks.noop", args, {"k": "v" * (i % 5)}, kept, f"{100 + i}.x")
        )
    return out


@pytest.fixture
def rabbit() -> Any:
    with Connection(AMQP_URL) as conn:
        yield conn


@needs_rabbitmq
def test_a_batch_writes_what_kombu_writes_one_message_at_a_time(rabbit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = current_app._get_current_object()
    queue_name = f"batch-{uuid.uuid4().hex[:8]}"
    fixed = datetime.now(timezone.utc)
    monkeypatch.setattr(app, "now", lambda: fixed)  # the same TTL in both runs
    producer = rabbit.Producer()
    queue = app.amqp.queues[queue_name](producer.channel)
    # Declared (and so remembered by kombu) before either capture: neither writes a queue.declare.
    assert producer.maybe_declare(app.amqp.queues[queue_name])
    batch = messages(queue_name, 12)
    like_calls: list[int] = []
    publish_like = amqp_batch.PublishBatch.publish_like

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        like_calls.append(1)
        publish_like(self, *args, **kwargs)

    monkeypatch.setattr(amqp_batch.PublishBatch, "publish_like", counting)
    amqp_connection = rabbit.connection
    try:
        # One by one, through kombu and py-amqp's writer.
        reference = Capture()
        monkeypatch.setattr(amqp_connection, "frame_writer", frame_writer(amqp_connection, reference))
        for message in batch:
            broker.send(message, producer=producer)
        # In one batch: the first message of each kind through kombu, the others written alike.
        ours = Capture()
        monkeypatch.setattr(amqp_connection.transport, "write", ours.write)
        monkeypatch.setattr(amqp_connection, "frame_writer", frame_writer(amqp_connection, ours))
        sent_before = amqp_connection.bytes_sent
        with amqp_batch.batching(producer, 100):
            for message in batch:
                broker.send(message, producer=producer)
        # py-amqp's heartbeat check sees the writes (it sends a heartbeat only after a silent interval).
        assert amqp_connection.bytes_sent == sent_before + len(batch)
    finally:
        monkeypatch.undo()
        queue.delete()
    assert bytes(ours.data) == bytes(reference.data)
    assert ours.writes == 1 and reference.writes == len(batch)
    assert len(like_calls) == len(batch) - 3  # three kinds: three went through kombu
    assert "create_publish_batch" not in vars(producer.channel)  # the channel is left as it was


@needs_rabbitmq
def test_a_failed_write_leaves_the_whole_batch_unsent(rabbit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    producer = rabbit.Producer()
    queue_name = f"batch-{uuid.uuid4().hex[:8]}"
    app = current_app._get_current_object()
    producer.maybe_declare(app.amqp.queues[queue_name])

    def refused(data: Any) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    unsent: list[broker.Message] = []

    class Recording(RunPublisher):
        def unsent(self, messages: Any) -> None:
            unsent.extend(messages)

    monkeypatch.setattr(current_app.producer_pool, "acquire", lambda block=True: producer, raising=False)
    monkeypatch.setattr(producer, "release", lambda: None, raising=False)
    try:
        monkeypatch.setattr(rabbit.connection.transport, "write", refused)
        publisher = Recording()
        batch = messages(queue_name, 5)
        assert publisher.publish_many(batch) == 0
        assert publisher.broken and publisher.failed == 5 and publisher.sent == 0
        assert [m.run_id for m in unsent] == [m.run_id for m in batch]
    finally:
        monkeypatch.undo()
        with Connection(AMQP_URL) as conn:
            app.amqp.queues[queue_name](conn.default_channel).delete()


@needs_rabbitmq
def test_a_publish_receiver_sees_every_message_of_a_batch(rabbit: Any) -> None:
    producer = rabbit.Producer()
    queue_name = f"batch-{uuid.uuid4().hex[:8]}"
    app = current_app._get_current_object()
    seen: list[str] = []

    def receiver(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        headers["traced"] = "yes"
        seen.append(headers["id"])

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        batch = messages(queue_name, 6)
        with amqp_batch.batching(producer, 100):
            for message in batch:
                broker.send(message, producer=producer)
        simple = rabbit.SimpleQueue(app.amqp.queues[queue_name](rabbit.default_channel))
        got = [simple.get(timeout=10) for _ in batch]
        for received in got:
            received.ack()
    finally:
        signals.before_task_publish.disconnect(receiver)
        app.amqp.queues[queue_name](rabbit.default_channel).delete()
    assert seen == [m.task_id for m in batch]
    assert [r.headers["id"] for r in got] == seen and all(r.headers["traced"] == "yes" for r in got)


@needs_rabbitmq
def test_with_publisher_confirms_each_message_is_left_to_py_amqp() -> None:
    """``confirm_publish`` waits for the broker's ack of each message: no batch of ours on such a
    channel (kombu then publishes each at once), and every message arrives."""
    app = current_app._get_current_object()
    queue_name = f"batch-{uuid.uuid4().hex[:8]}"
    with Connection(AMQP_URL, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        assert producer.channel.connection.confirm_publish
        queue = app.amqp.queues[queue_name](conn.default_channel)
        try:
            batch = messages(queue_name, 4)
            with amqp_batch.batching(producer, 100) as handle:
                assert "create_publish_batch" not in vars(producer.channel)
                for message in batch:
                    broker.send(message, producer=producer)
                assert not handle.buffered and amqp_batch.current(producer) is None
            simple = conn.SimpleQueue(queue)
            got = [simple.get(timeout=10) for _ in batch]
            for one in got:
                one.ack()
        finally:
            queue.delete()
    assert sorted(r.headers["id"] for r in got) == sorted(m.task_id for m in batch)
