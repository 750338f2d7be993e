"""The publish path builds Celery's protocol-2 message itself (``broker.send``), once per message,
through one producer: these tests hold it to what ``send_task`` sends, argument for argument and on
the wire (RabbitMQ, Redis, the filesystem transport), and to the ``Publisher``'s failure semantics."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app, signals
from celery.app.routes import Router, prepare
from django.utils import timezone
from kombu import Connection

from supervisor_app import amqp_batch, broker
from supervisor_app.runs.publishing import RunPublisher

NOW = timezone.now()


class FakeProducer:
    """Records what ``publish`` is given (``send_task`` and our path both end there)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []
        self.channel = type("Channel", (), {})()
        self.connection = self
        self.fail_after = fail_after
        self.released = 0

    @contextmanager
    def _reraise_as_library_errors(self) -> Any:
        yield

    def publish(self, body: Any, **kwargs: Any) -> None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ConnectionRefusedError(111, "Connection refused")
        self.calls.append((body, kwargs))

    def release(self) -> None:
        self.released += 1


def both(message: broker.Message) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """What ``send_task`` hands the producer, and what ``broker.send`` does, for one message."""
    app = current_app._get_current_object()
    reference, ours = FakeProducer(), FakeProducer()
    broker._send_task(app, message, reference)
    broker.send(message, producer=ours)
    [want], [got] = reference.calls, ours.calls
    return want, got


def assert_same(want: tuple[Any, dict[str, Any]], got: tuple[Any, dict[str, Any]]) -> None:
    (want_body, want_kw), (got_body, got_kw) = want, got
    assert got_body == want_body
    # The same entities are declared (ours bound once to the producer's channel).
    assert [(e.name, type(e)) for e in got_kw.pop("declare")] == [(e.name, type(e)) for e in want_kw.pop("declare")]
    # The TTL counts from the moment each was built: the same to within a second.
    want_ttl, got_ttl = want_kw.pop("expiration", None), got_kw.pop("expiration", None)
    assert (want_ttl is None) == (got_ttl is None) and abs((want_ttl or 0) - (got_ttl or 0)) < 1
    assert got_kw == want_kw


KEPT = [
    pytest.param({}, id="defaults"),
    pytest.param(
        broker.run_options(
            {
                "queue": "fast-reports",
                "routing_key": "fast-reports",
                "priority": 3,
                "headers": {"tenant": "acme"},
                "expires": NOW + timedelta(minutes=5),
            }
        ),
        id="queue-priority-headers-expires",
    ),
    pytest.param({"exchange": "fast-exchange", "routing_key": "fast.key"}, id="exchange-and-routing-key"),
    pytest.param({"priority": 9, "headers": {"periodic_task_name": "nightly"}}, id="priority-only"),
]


@pytest.mark.parametrize("kept", KEPT)
@pytest.mark.parametrize(
    ("args", "kwargs"), [([], {}), ([1, "two", {"three": [3.0, None, True]}], {"k": "v" * 2000, "n": 7})]
)
def test_our_message_is_the_one_send_task_sends(kept: dict[str, Any], args: Any, kwargs: Any) -> None:
    message = broker.Message(7, 2, "project.tasks.noop", args, kwargs, kept, "7.2.abc")
    want, got = both(message)
    assert_same(want, got)
    headers = got[1]["headers"]
    assert headers[broker.HEADER_RUN] == 7 and headers[broker.HEADER_ATTEMPT] == 2 and headers["id"] == "7.2.abc"
    assert got[1]["serializer"] == "json"


def test_a_tasks_own_options_and_task_routes_are_applied_as_send_task_applies_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from supervisor_app.tasks import SupervisedTask

    name = f"tests.fast_publish.limited_{uuid.uuid4().hex[:6]}"

    @current_app.task(name=name, base=SupervisedTask, time_limit=30, soft_time_limit=20, expires=600, priority=2)
    def limited() -> None:
        return None

    assert limited.name == name and current_app.tasks[name].time_limit == 30  # registered now

    routes = prepare([{name: {"queue": "fast-routed", "routing_key": "fast-routed"}, "project.*": "fast-glob"}])
    amqp = current_app.amqp
    monkeypatch.setattr(amqp, "router", Router(routes, amqp.queues, True, app=current_app))
    try:
        for task_name in (name, "project.tasks.noop"):
            want, got = both(broker.Message(3, 1, task_name, [], {}, {}, "3.1"))
            # The task's relative expiry counts from each publish: compare it apart, to the second.
            for _, kw in (want, got):
                kw["headers"]["expires"] = kw["headers"]["expires"] and kw["headers"]["expires"][:19]
            assert_same(want, got)
        assert got[1]["routing_key"] == "fast-glob"
        assert want[1]["headers"]["timelimit"] != [30, 20]  # noop has none
        [(_, limited_kw)] = [both(broker.Message(4, 1, name, [], {}, {}, "4.1"))[1]]
        assert limited_kw["headers"]["timelimit"] == [30, 20] and limited_kw["routing_key"] == "fast-routed"
        assert limited_kw["priority"] == 2 and round(limited_kw["expiration"]) == 600
    finally:
        current_app.tasks.pop(name, None)


def test_a_router_function_sees_each_messages_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    def by_argument(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        return {"queue": f"fast-shard-{args[0] % 2}"} if args else None

    amqp = current_app.amqp
    monkeypatch.setattr(amqp, "router", Router(prepare([by_argument]), amqp.queues, True, app=current_app))
    producer = FakeProducer()
    for n in (1, 2, 3):
        broker.send(broker.Message(n, 1, "project.tasks.noop", [n], {}, {}, f"{n}.1"), producer=producer)
    assert [kw["routing_key"] for _, kw in producer.calls] == ["fast-shard-1", "fast-shard-0", "fast-shard-1"]


def test_before_publish_receivers_see_and_may_extend_the_headers() -> None:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        seen.append(dict(headers))
        headers["traceparent"] = "00-abc-def-01"  # as a tracing integration injects its context

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        producer = FakeProducer()
        broker.send(broker.Message(5, 1, "project.tasks.noop", [], {}, {}, "5.1"), producer=producer)
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert seen and seen[0][broker.HEADER_RUN] == 5
    assert producer.calls[0][1]["headers"]["traceparent"] == "00-abc-def-01"


def test_the_publisher_stops_at_the_first_failure_hands_on_the_rest_and_returns_its_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer = FakeProducer(fail_after=2)
    monkeypatch.setattr(current_app.producer_pool, "acquire", lambda block=True: producer, raising=False)
    handed: list[list[int]] = []

    class Recording(broker.Publisher):
        def unsent(self, messages: Any) -> None:
            handed.append([m.run_id for m in messages])

    messages = [broker.Message(n, 1, "project.tasks.noop", [], {}, {}, f"{n}.1") for n in range(1, 6)]
    with Recording() as publisher:
        assert publisher.publish_many(messages) == 2
        assert publisher.publish(messages[0]) is False  # broken for its lifetime: not tried again
    assert len(producer.calls) == 2 and handed == [[3, 4, 5], [1]]
    assert producer.released == 1 and publisher.sent == 2 and publisher.failed == 4


# --------------------------------------------------------------------------- on the wire


def transports() -> list[Any]:
    out = [pytest.param("filesystem", id="filesystem")]
    if os.environ.get("CELERY_BROKER_URL", "").startswith("amqp"):
        out.append(pytest.param(os.environ["CELERY_BROKER_URL"], id="rabbitmq"))
    if os.environ.get("SUPERVISOR_TEST_REDIS_URL"):
        out.append(pytest.param(os.environ["SUPERVISOR_TEST_REDIS_URL"], id="redis"))
    return out


def connection_to(url: str, tmp_path: Any) -> Connection:
    """A kombu connection to ``url`` (``filesystem``: folders under ``tmp_path``)."""
    if url == "filesystem":
        return Connection(
            "filesystem://",
            transport_options={"data_folder_in": tmp_path, "data_folder_out": tmp_path, "control_folder": tmp_path},
        )
    return Connection(url)


@pytest.mark.parametrize("url", transports())
def test_the_broker_delivers_the_same_message_as_send_tasks(url: str, tmp_path: Any) -> None:
    conn = connection_to(url, tmp_path)
    name = f"fast-wire-{uuid.uuid4().hex[:8]}"
    kept = broker.run_options({"queue": name, "priority": 4, "headers": {"tenant": "acme"}, "expires": 600})
    message = broker.Message(11, 3, "project.tasks.noop", [1, {"a": "b"}], {"x": [2]}, kept, "11.3.t")
    app = current_app._get_current_object()
    with conn:
        producer = conn.Producer()
        queue = app.amqp.queues[name](conn.default_channel)
        try:
            broker._send_task(app, message, producer)
            broker.send(message, producer=producer)
            simple = conn.SimpleQueue(queue)
            want, got = simple.get(timeout=10), simple.get(timeout=10)
            want.ack()
            got.ack()
        finally:
            queue.delete()
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert got.decode() == want.decode() == [[1, {"a": "b"}], {"x": [2]}, embed]
    assert got.headers == want.headers and got.headers[broker.HEADER_RUN] == 11
    assert got.content_type == want.content_type == "application/json"
    for prop in ("correlation_id", "reply_to", "priority", "delivery_mode"):
        assert got.properties.get(prop) == want.properties.get(prop), prop
    assert abs(int(got.properties.get("expiration", 0)) - int(want.properties.get("expiration", 0))) < 5000


def test_a_sweeps_publisher_sends_every_message_through_one_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = FakeProducer()
    acquired: list[Any] = []

    def acquire(block: bool = True) -> Any:
        acquired.append(producer)
        return producer

    monkeypatch.setattr(current_app.producer_pool, "acquire", acquire, raising=False)
    with RunPublisher() as publisher:
        sent = publisher.publish_many(
            [broker.Message(n, 2, "project.tasks.noop", [], {}, {}, f"{n}.2.x") for n in range(1, 101)]
        )
    assert sent == 100 and len(acquired) == 1 and producer.released == 1
    assert [kw["headers"]["id"] for _, kw in producer.calls] == [f"{n}.2.x" for n in range(1, 101)]


@pytest.mark.parametrize("url", transports())
def test_a_batch_delivers_the_messages_send_task_sends(url: str, tmp_path: Any) -> None:
    """Several messages in one batch (``amqp_batch``: written together on RabbitMQ, pipelined by
    kombu on Redis, one by one elsewhere): each as ``send_task`` sends it."""
    conn = connection_to(url, tmp_path)
    name = f"fast-batch-{uuid.uuid4().hex[:8]}"
    batch = [
        broker.Message(
            20 + i,
            1 + i % 3,
            "project.tasks.noop",
            [i, "x" * i],
            {"n": i},
            broker.run_options({"queue": name, "priority": i % 2, "headers": {"i": i}}),
            f"{20 + i}.t",
        )
        for i in range(6)
    ]
    app = current_app._get_current_object()
    with conn:
        producer = conn.Producer()
        queue = app.amqp.queues[name](conn.default_channel)
        try:
            for message in batch:
                broker._send_task(app, message, producer)
            with amqp_batch.batching(producer, 100):
                for message in batch:
                    broker.send(message, producer=producer)
            simple = conn.SimpleQueue(queue)
            received = [simple.get(timeout=10) for _ in range(2 * len(batch))]
            for one in received:
                one.ack()
        finally:
            queue.delete()
    # Priorities may reorder delivery: pair them by task id and by which path sent them.
    by_id: dict[str, list[Any]] = {}
    for one in received:
        by_id.setdefault(one.headers["id"], []).append(one)
    assert sorted(by_id) == sorted(m.task_id for m in batch)
    for message in batch:
        want, got = by_id[message.task_id]
        assert got.decode() == want.decode() and got.headers == want.headers
        assert got.headers[broker.HEADER_RUN] == message.run_id
        for prop in ("correlation_id", "reply_to", "priority", "delivery_mode", "content_type"):
            assert got.properties.get(prop) == want.properties.get(prop), prop


def test_argsrepr_is_what_saferepr_writes() -> None:
    """``broker._repr`` takes Python's ``repr`` for flat, plain arguments: always saferepr's text."""
    import random

    from celery.utils.saferepr import saferepr

    rng = random.Random(15)
    alphabet = "ab z09é€'\"\\\n\t\x00"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    def scalar() -> Any:
        return rng.choice([text(), rng.randint(-(10**12), 10**12), rng.choice([1.5, -0.0, 1e300]), True, None])

    def value() -> Any:
        pick = rng.random()
        if pick < 0.1:
            return [scalar()]  # nested: saferepr's own path
        return scalar()

    for _ in range(3000):
        n = rng.randint(0, 12)
        args: Any = [value() for _ in range(n)]
        for candidate in (args, tuple(args), {text(): value() for _ in range(n)}):
            for maxsize in (1024, 40):
                assert broker._repr(candidate, maxsize, 3) == str(saferepr(candidate, maxsize, maxlevels=3))
