"""Publishing attempts to the broker: message options, the producer, queue probes; no database writes.

Every publish of every attempt goes through :func:`send`, with options built by :func:`run_options`
(when a run is recorded, from ``apply_async`` options or a schedule) and :func:`send_options` (at each
publish, from what the run kept): a schedule's queue, routing key, exchange, priority, headers and
expiry reach the first message and every republished one alike.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple, TypeVar

from django.utils import timezone

from . import amqp_batch
from .core.backlog import QueueState
from .core.workflow import CANVAS_OPTIONS

logger = logging.getLogger("supervisor_app")

#: Message headers that carry the run and the attempt (the fencing token) to the agent. Headers,
#: not keyword arguments: a task's signature would reject unknown kwargs.
HEADER_RUN = "supervisor_run"
HEADER_ATTEMPT = "supervisor_attempt"

#: Publishing options a run keeps (as JSON, in ``SupervisedRun.options``) for every publish of it.
KEPT_OPTIONS = ("queue", "routing_key", "exchange", "priority", "expires", "headers")

#: One quick reconnect (a connection that died since its last use, a broker restart), no waiting:
#: the run is durable and the supervisor publishes it again, so blocking the caller buys nothing.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class Message(NamedTuple):
    """One attempt to publish."""

    run_id: int
    attempt: int
    task_name: str
    args: Any
    kwargs: Any
    #: The run's kept options (see :func:`run_options`).
    options: Mapping[str, Any]
    task_id: str


# --------------------------------------------------------------------------- options


def _absolute_expiry(value: Any, now: datetime | None) -> str | None:
    """An ``expires`` option as an absolute ISO time: seconds count from now (the dispatch), so a
    message published again later expires when the first one would have, not later."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).isoformat()
    if isinstance(value, datetime):
        aware = value if timezone.is_aware(value) else timezone.make_aware(value)
        return aware.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ((now or timezone.now()) + timedelta(seconds=float(value))).isoformat()
    raise TypeError(f"expires must be seconds, a datetime or an ISO time, not {value!r}")


def run_options(options: Mapping[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """The publishing options a run keeps, from ``apply_async`` options or a schedule's: JSON values
    only (``expires`` absolute, see above), unset ones left out, our own headers never kept; and the
    canvas the message carries (``core.workflow.CANVAS_OPTIONS``, JSON already), sent again on every
    attempt."""
    kept: dict[str, Any] = {
        name: (options or {})[name] for name in CANVAS_OPTIONS if (options or {}).get(name) is not None
    }
    for name in KEPT_OPTIONS:
        value = (options or {}).get(name)
        if value is None:
            continue
        if name == "expires":
            value = _absolute_expiry(value, now)
        elif name == "headers":
            value = {k: v for k, v in dict(value).items() if k not in (HEADER_RUN, HEADER_ATTEMPT)}
            if not value:
                continue
        kept[name] = value
    return kept


def schedule_options(pt: Any) -> dict[str, Any]:
    """The options a django-celery-beat ``PeriodicTask`` gives its messages, as ``ModelEntry`` does:
    queue, exchange, routing key, priority, expiry (``expires`` or ``expire_seconds``) and headers
    (with ``periodic_task_name``). Raises ``ValueError`` when the headers are not a JSON object."""
    options: dict[str, Any] = {
        k: getattr(pt, k) for k in ("queue", "exchange", "routing_key", "priority") if getattr(pt, k) is not None
    }
    expires = getattr(pt, "expires_", None)
    if expires:
        options["expires"] = expires
    headers = json.loads(pt.headers or "{}")
    if not isinstance(headers, dict):
        raise ValueError(f"the headers of periodic task {pt.name!r} are not a JSON object")
    options["headers"] = {**headers, "periodic_task_name": pt.name}
    return options


def expiry(options: Mapping[str, Any]) -> datetime | None:
    """When a run's messages expire (None: never). Relative values are from rows written before
    expiry was kept absolute: they count from each publish, as they always did."""
    value = options.get("expires")
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def send_options(message: Message) -> dict[str, Any]:
    """The ``send_task`` options of one publish: the kept ones and the canvas, plus the run and
    attempt headers."""
    out: dict[str, Any] = {k: v for k, v in message.options.items() if k in KEPT_OPTIONS}
    canvas = {k: v for k, v in message.options.items() if k in CANVAS_OPTIONS}
    if "callbacks" in canvas:
        canvas["link"] = canvas.pop("callbacks")
    if "errbacks" in canvas:
        canvas["link_error"] = canvas.pop("errbacks")
    out.update(canvas)
    if isinstance(out.get("expires"), str):
        out["expires"] = datetime.fromisoformat(out["expires"])
    out["headers"] = {**(out.get("headers") or {}), HEADER_RUN: message.run_id, HEADER_ATTEMPT: message.attempt}
    return out


# --------------------------------------------------------------------------- sending
#
# ``send_task`` costs about 0.5-1 ms a message, most of it work that is the same for every message of
# a task: the registry look-up and option merging, the router, settings read through Celery's chained
# configuration, binding the queue to the channel to declare it. :func:`send` does that once per task
# and routing options (a :class:`Plan`) and leaves the rest to Celery itself: ``amqp.as_task_v2``
# builds the message, ``amqp.send_task_message`` sends it. What a worker receives is the same, header
# for header (``tests/db/test_fast_publish.py`` compares the two, also on the wire).

#: Options of a run that choose where its messages go (the router's input; ``headers`` and
#: ``expires`` are per message).
ROUTING_OPTIONS = ("queue", "routing_key", "exchange", "priority")


class Plan(NamedTuple):
    """How the messages of one task and routing options are sent, worked out once: what ``send_task``
    does before building each message (the task's own options merged in, Celery's router), and what
    it reads from the app's settings for each message."""

    #: The options ``send_task`` hands ``amqp.send_task_message`` (routed, JSON serializer).
    options: Mapping[str, Any]
    #: The entities to declare before publishing (as ``send_task_message`` would choose them).
    declare: tuple[Any, ...]
    time_limit: Any
    soft_time_limit: Any
    #: The task's own ``expires`` (a run that keeps none publishes with it, as ``send_task`` did).
    expires: Any
    repr_maxlevels: int
    send_sent_event: bool
    inherit_parent_priority: bool
    protocol: int


#: Plans of each app's router, by (task name, routing options); only for routers whose answer does
#: not depend on a message's arguments (``task_routes`` maps and globs). Dropped with the router.
_plans: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Plan]] = weakref.WeakKeyDictionary()
_PLANS_MAX = 1024


def _routes_are_static(router: Any) -> bool:
    from celery.app.routes import MapRoute

    return all(isinstance(route, MapRoute) for route in router.routes)


def plan_for(app: Any, message: Message) -> Plan | None:
    """The :class:`Plan` of a message: from the run's routing options, the task's own options (its
    registry entry, as ``send_task`` merges them) and Celery's router; cached per router when the
    routes are static, worked out for each message when a router function may look at arguments.
    None when the app sends another task protocol than 2 (``send_task`` then builds the message)."""
    router = app.amqp.router
    routing = tuple((name, message.options.get(name)) for name in ROUTING_OPTIONS)
    if _routes_are_static(router):
        cache = _plans.setdefault(router, {})
        key = (message.task_name, routing)
        plan = cache.get(key)
        if plan is None:
            if len(cache) >= _PLANS_MAX:
                cache.clear()
            plan = cache[key] = _make_plan(app, message.task_name, dict(routing), (), {})
    else:
        plan = _make_plan(app, message.task_name, dict(routing), message.args or (), message.kwargs or {})
    return plan if plan.protocol == 2 else None


def _make_plan(app: Any, name: str, routing: dict[str, Any], args: Any, kwargs: Any) -> Plan:
    """``send_task``'s work before it builds a message, for our messages (no countdown, no eta)."""
    from kombu.common import Broadcast

    amqp, conf = app.amqp, app.conf
    options: dict[str, Any] = {k: v for k, v in routing.items() if v is not None}
    task_type = app._tasks.get(name)
    get_exec_options = getattr(task_type, "_get_exec_options", None)
    if callable(get_exec_options):
        defaults = {k: v for k, v in (get_exec_options() or {}).items() if v is not None}
        options = {**defaults, **options}
    time_limit = options.pop("time_limit", None)
    soft_time_limit = options.pop("soft_time_limit", None)
    expires = options.pop("expires", None)
    options.pop("ignore_result", None)
    # Whatever the app's task_serializer: a run's arguments are stored as JSON and travel as JSON,
    # never pickle (a worker accepting pickle would run code from anyone who can publish).
    options["serializer"] = "json"
    options["retry"] = True
    options["retry_policy"] = RETRY_POLICY
    options = amqp.router.route(options, name, args, kwargs, task_type)
    # The queue send_task_message declares; bound to each producer's channel once (_declare).
    queue = options.get("queue")
    if queue is None and options.get("exchange") is None:
        queue = amqp.default_queue
    if isinstance(queue, str):
        queue = amqp.queues[queue]
    declare = options.get("declare")
    if declare is None:
        declare = [queue] if queue and not isinstance(queue, Broadcast) else []
    return Plan(
        options={k: v for k, v in options.items() if k != "declare"},
        declare=tuple(declare),
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        expires=expires,
        repr_maxlevels=conf.task_repr_maxlevels,
        send_sent_event=bool(conf.task_send_sent_event),
        inherit_parent_priority=bool(conf.task_inherit_parent_priority),
        protocol=int(conf.task_protocol),
    )


#: Entities to declare, bound once to each producer channel: kombu's ``maybe_declare`` copies an
#: unbound queue and its exchange to bind them, at every publish (a third of its cost).
_bound: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _declare(producer: Any, plan: Plan) -> list[Any]:
    if not plan.declare:
        return []
    channel = producer.channel
    try:
        bound = _bound.setdefault(channel, {})
    except TypeError:  # a channel that can't be weakly referenced: as kombu does it
        return list(plan.declare)
    out = []
    for entity in plan.declare:
        copy = bound.get(entity)
        if copy is None:
            copy = bound[entity] = entity if entity.is_bound else entity.bind(channel)
        out.append(copy)
    return out


#: Scalars whose ``repr`` is what Celery's ``saferepr`` writes (strings only when plain: see below).
_PLAIN_SCALARS = (int, float, bool, type(None))


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        # saferepr quotes a string without escaping it: the same as repr only when there is nothing
        # to escape.
        return value.isprintable() and "'" not in value and "\\" not in value
    return kind in _PLAIN_SCALARS


def _repr(value: Any, maxsize: int, maxlevels: int) -> str:
    """``argsrepr``/``kwargsrepr`` as Celery's ``saferepr`` writes them. For a flat list, tuple or
    dict of plain scalars that fits ``maxsize`` (the arguments of most tasks) that is Python's own
    ``repr``, a twentieth of the cost; anything else goes to saferepr (tests/db/test_fast_publish.py
    compares the two)."""
    from celery.utils.saferepr import saferepr

    if not value:  # what saferepr says of (), [] and {}, without its machinery
        return "()" if isinstance(value, tuple) else ("[]" if isinstance(value, list) else "{}")
    kind = type(value)
    if kind is dict:
        flat = all(type(k) is str and _plain(k) and _plain(v) for k, v in value.items())
    else:
        flat = (kind is list or kind is tuple) and all(_plain(v) for v in value)
    if flat:
        text = repr(value)
        if len(text) <= maxsize:
            return text
    return str(saferepr(value, maxsize, maxlevels=maxlevels))


#: This process's ``origin`` header (``anon_nodename()``), by process id (a forked worker has its own).
_origin: dict[int, str] = {}


def _origin_header() -> str:
    import os

    from celery.utils.nodenames import anon_nodename

    pid = os.getpid()
    name = _origin.get(pid)
    if name is None:
        name = _origin[pid] = str(anon_nodename())
    return name


def _expiry(app: Any, value: Any) -> tuple[Any, float | None]:
    """A message's ``expires`` (for its header) and its broker TTL in seconds, as ``send_task``
    computes them (a TTL in the past is 0: the broker drops it unless a consumer takes it at once)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    ttl = (value - app.now()).total_seconds() if isinstance(value, datetime) else float(value)
    if ttl < 0:
        logger.warning("a message's expiry (%s) is in the past; sent with a TTL of 0", value)
        ttl = 0
    return value, ttl


def send(message: Message, producer: Any = None) -> None:
    """Publish one attempt (raises when the broker cannot be reached).

    The message is ``send_task``'s: built by Celery's ``amqp.as_task_v2`` and sent by its
    ``amqp.send_task_message`` (``before/after_task_publish`` signals, ``task_send_sent_event``), as
    JSON, routed by Celery's router, with the run and attempt headers. What ``send_task`` works out
    anew for every message (the task's options, the route, settings read through Celery's chained
    configuration, the queue's declaration bound to the channel) comes from a :class:`Plan` made once
    per task and routing options. Without a producer, one is borrowed from the app's pool.
    """
    from celery import current_app

    app: Any = current_app._get_current_object()  # type: ignore[attr-defined]
    plan = plan_for(app, message)
    if plan is None:
        _send_task(app, message, producer)
        return
    if producer is None:
        with app.producer_or_acquire(None) as borrowed:
            send(message, borrowed)
        return
    amqp = app.amqp
    task_id, name = message.task_id, message.task_name
    args, kwargs = message.args or (), message.kwargs or {}
    kept = message.options
    expires, ttl = _expiry(app, kept["expires"] if kept.get("expires") is not None else plan.expires)
    options: dict[str, Any] = dict(plan.options)
    if ttl is not None:
        options["expiration"] = ttl
    # A run's place in a workflow is kept with it (recorded at dispatch, so a republished attempt
    # carries it too); a run recorded without one is placed under the task that publishes it.
    root_id, parent_id = kept.get("root_id"), kept.get("parent_id")
    parent = app.current_worker_task
    if parent:
        root_id = root_id or parent.request.root_id or parent.request.id
        parent_id = parent_id or parent.request.id
        if plan.inherit_parent_priority:
            options.setdefault("priority", parent.request.delivery_info.get("priority"))
    built = amqp.as_task_v2(
        task_id,
        name,
        args,
        kwargs,
        expires=expires,
        reply_to=app.thread_oid,
        time_limit=plan.time_limit,
        soft_time_limit=plan.soft_time_limit,
        create_sent_event=plan.send_sent_event,
        root_id=root_id,
        parent_id=parent_id,
        group_id=kept.get("group_id"),
        group_index=kept.get("group_index"),
        callbacks=kept.get("callbacks"),
        errbacks=kept.get("errbacks"),
        chain=kept.get("chain"),
        chord=kept.get("chord"),
        ignore_result=None,
        argsrepr=_repr(args, amqp.argsrepr_maxsize, plan.repr_maxlevels),
        kwargsrepr=_repr(kwargs, amqp.kwargsrepr_maxsize, plan.repr_maxlevels),
        origin=_origin_header(),
    )
    headers = {**(kept.get("headers") or {}), HEADER_RUN: message.run_id, HEADER_ATTEMPT: message.attempt}
    app.backend.on_task_call(producer, task_id)
    batch = amqp_batch.current(producer)
    # Messages of one plan (and expiry and priority) differ, once kombu has published the first of a
    # batch, only by their headers, body, correlation id and expiration: the rest is kombu's answer
    # for the first, when nothing watches the publishing (signals, sent events) and no compression.
    key = (id(plan), ttl is None, options.get("priority"))
    template = batch.templates.get(key) if batch is not None and not plan.send_sent_event else None
    if batch is not None and template is not None and not _publish_observed():
        all_headers, _, body, _ = built
        all_headers.update(headers)
        batch.publish_like(
            template[1],
            _json_body(body),
            all_headers,
            task_id,
            None if ttl is None else str(int(ttl * 1000)),
        )
    else:
        amqp.send_task_message(
            producer,
            name,
            built,
            headers=headers,
            declare=_declare(producer, plan),  # a new list: kombu appends to it
            **options,
        )
        _keep_template(amqp_batch.current(producer), key, plan)
    if parent:
        parent.add_trail(app.AsyncResult(task_id))


def _keep_template(batch: amqp_batch.PublishBatch | None, key: tuple[Any, ...], plan: Plan) -> None:
    """Keep the message kombu just published in ``batch`` as the template of ``key``: not when a
    receiver may have changed it, nor when kombu compressed it or serialized it otherwise."""
    if batch is None or batch.last is None or key in batch.templates or _publish_observed():
        return
    props = batch.last.message.properties
    if props.get("content_type") == "application/json" and "compression" not in (
        props.get("application_headers") or {}
    ):
        batch.templates[key] = (plan, batch.last)  # the plan kept alive: its id stays its own


def _publish_observed() -> bool:
    """Whether a receiver of Celery's publishing signals is connected (tracing, APM, tests): each
    message then goes through ``send_task_message``, which sends them."""
    from celery import signals

    return bool(
        signals.before_task_publish.receivers or signals.after_task_publish.receivers or signals.task_sent.receivers  # type: ignore[attr-defined]
    )


def _json_body(body: Any) -> bytes:
    """A message body as kombu serializes it (its JSON, UTF-8)."""
    from kombu.serialization import dumps

    _, encoding, payload = dumps(body, serializer="json")
    return payload.encode(encoding) if isinstance(payload, str) else bytes(payload)


def _send_task(app: Any, message: Message, producer: Any) -> None:
    """Celery's own ``send_task``: for an app configured for another task protocol than 2."""
    app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=message.task_id,
        retry=True,
        retry_policy=RETRY_POLICY,
        producer=producer,
        serializer="json",
        **send_options(message),
    )


P = TypeVar("P", bound="Publisher")


class Publisher:
    """Sends attempts to the broker.

    One producer (one broker channel) serves every message of a publisher's lifetime, a sweep:
    a mass recovery publishes hundreds of messages without a pool round trip each. After one failure
    it stops trying for its lifetime, so a broker outage costs one connection error per sweep, not
    one per run. What could not be sent goes to :meth:`unsent` (``runs`` records it, so the runs stay
    queued and the next sweep tries again).
    """

    def __init__(self) -> None:
        self.broken = False
        self.sent = 0
        self.failed = 0
        self._producer: Any = None
        self._closed = False
        #: The queues' states, asked once per queue for this publisher's lifetime (a sweep).
        self.queues = QueueProbe()

    def _acquire(self) -> Any:
        if self._producer is None:
            from celery import current_app

            self._producer = current_app.producer_pool.acquire(block=True)
        return self._producer

    def close(self) -> None:
        """Return the producer to the pool. A publish after this (an ``on_commit`` callback of a
        transaction that outlived the ``with`` block, as when the sweep runs inside the caller's
        transaction) borrows a producer for that publish only: none is ever kept out of the pool,
        which holds ten by default and blocks the eleventh caller for ever."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.release()
            except Exception:  # a dead connection: the pool revives it on its next use
                logger.debug("producer release failed", exc_info=True)

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _try(self, chunk: Sequence[Message]) -> int:
        """Send ``chunk``, and return how many of its messages were sent (its first ones). Where the
        transport batches (``amqp_batch``: py-amqp, kombu's Redis transport) they are written at the
        chunk's end, so a failure leaves the whole chunk unsent, though some of it may have reached
        the broker: those runs are published again, and the attempt fence runs a message delivered
        twice once. Elsewhere each message is sent as it comes."""
        if self.broken:
            return 0
        done = 0
        buffered = False
        try:
            producer = self._acquire()
            if len(chunk) == 1:
                send(chunk[0], producer=producer)
            else:
                with amqp_batch.batching(producer, len(chunk)) as batch:
                    for message in chunk:
                        send(message, producer=producer)
                        done += 1
                        if done == 1:  # the transport's batch, if any, is made by the first publish
                            buffered = batch.buffered
            done = len(chunk)
        except Exception as exc:  # broker down, DNS, auth...: the runs stay queued
            self.broken = True
            self._release()
            if buffered:  # nothing is known to have been written
                done = 0
            failed = chunk[done:]
            logger.warning(
                "could not publish %s (%s); %s queued and the supervisor will publish %s again",
                f"run {failed[0].run_id} attempt {failed[0].attempt}"
                if len(failed) == 1
                else f"{len(failed)} runs (the first: run {failed[0].run_id} attempt {failed[0].attempt})",
                type(exc).__name__,
                "it stays" if len(failed) == 1 else "they stay",
                "it" if len(failed) == 1 else "them",
            )
        self.sent += done
        return done

    def publish(self, message: Message) -> bool:
        return self.publish_many([message]) == 1

    def publish_many(self, messages: Iterable[Message]) -> int:
        """Publish the messages, in chunks of ``amqp_batch.MAX_SIZE``; once the broker failed, the
        rest are handed to :meth:`unsent` together. Returns how many were sent."""
        sent = 0
        unsent: list[Message] = []
        chunk: list[Message] = []

        def flush() -> None:
            nonlocal sent
            done = self._try(chunk)
            sent += done
            unsent.extend(chunk[done:])
            chunk.clear()

        try:
            for message in messages:
                chunk.append(message)
                if len(chunk) >= amqp_batch.MAX_SIZE:
                    flush()
            if chunk:
                flush()
        finally:
            if self._closed:
                self._release()
        if unsent:
            self.failed += len(unsent)
            self.unsent(unsent)
        return sent

    def unsent(self, messages: Sequence[Message]) -> None:
        """Messages that could not be sent. Nothing to do here; ``runs.publishing`` records them."""


# --------------------------------------------------------------------------- queues


def queue_of(task_name: str, options: Mapping[str, Any]) -> str | None:
    """The name of the queue a run's messages go to, as Celery's router decides it (the run's kept
    ``queue``, ``task_routes``, the default queue). None when an exchange or routing key of the run's
    own decides (the broker's bindings route it: no one queue to ask about)."""
    from celery import current_app

    if not options.get("queue") and (options.get("exchange") or options.get("routing_key")):
        return None
    route = current_app.amqp.router.route(dict(options), task_name, (), {})
    queue = route.get("queue")
    name = getattr(queue, "name", queue)
    return str(name) if name else None


def inspect_queue(name: str) -> QueueState | None:
    """Ask the broker about one queue: ready messages and consumers. None when the transport can't
    say (filesystem and others) or the broker can't be reached.

    RabbitMQ (classic and quorum queues alike): a passive ``queue.declare`` on a channel of its own
    (a queue that does not exist closes the channel: nothing in it, nobody consuming it). Redis:
    kombu's count of the queue's lists (one per priority step, ``LLEN``); consumers can't be counted
    (``BRPOP`` leaves no trace); the ``unacked`` hash (messages delivered, not acknowledged: a dead
    consumer's come back only after the visibility timeout) is reported, not counted as ready.
    """
    from celery import current_app

    pool: Any = current_app.pool
    try:
        with pool.acquire(block=True, timeout=5) as conn:
            driver = conn.transport.driver_type
            if driver == "amqp":
                return _amqp_queue(conn, name)
            if driver == "redis":
                channel = conn.default_channel
                unacked = int(channel.client.hlen(channel.unacked_key))
                return QueueState(name, int(channel._size(name)), None, unacked)
    except Exception as exc:  # broker down: the sweep behaves as it would without inspection
        logger.warning("could not inspect queue %r (%s)", name, type(exc).__name__)
    return None


def _amqp_queue(conn: Any, name: str) -> QueueState:
    from amqp.exceptions import NotFound

    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=name, passive=True)
    except NotFound:
        return QueueState(name, 0, 0)
    finally:
        try:
            channel.close()
        except Exception:  # closed by the broker already (NotFound)
            logger.debug("channel close failed", exc_info=True)
    return QueueState(name, int(ok.message_count), int(ok.consumer_count))


class QueueProbe:
    """What the broker says about each queue, asked once per queue for the probe's lifetime (a sweep).

    It also remembers, for this process, the runs it saw left waiting (a backlog, a worker outage) or
    waiting on a queue nobody consumes, each for twice its start timeout (it is judged again once per
    start timeout while it waits): the sweep's ``queues`` figures, which ``health/`` reports.
    """

    #: run id -> (queue, verdict, until (monotonic)), shared by the probes of this process.
    _seen: ClassVar[dict[int, tuple[str, str, float]]] = {}
    #: queue -> its last state, shared likewise.
    _last: ClassVar[dict[str, QueueState | None]] = {}
    #: Verdicts remembered for health: the run waits, or waits on a queue nobody consumes.
    WAITING = frozenset({"backlog", "outage", "unconsumed"})

    def __init__(self, inspect: Any = None) -> None:
        self._inspect = inspect
        self._states: dict[str, QueueState | None] = {}

    def state(self, name: str | None) -> QueueState | None:
        if name is None:
            return None
        if name not in self._states:
            state = (self._inspect or inspect_queue)(name)
            self._states[name] = QueueProbe._last[name] = state
        return self._states[name]

    def any_consumed(self) -> bool:
        """Whether any queue asked about, or the default queue, has a consumer: False is a worker
        outage (every worker down), not a queue nobody consumes."""
        from celery import current_app

        self.state(current_app.conf.task_default_queue)
        return any(s is not None and s.consumed for s in self._states.values())

    def note(self, run_id: int, queue: str | None, verdict: str, ttl: float) -> None:
        """Remember the verdict on a run (for ``ttl`` seconds) if it leaves the run waiting."""
        if verdict in self.WAITING:
            QueueProbe._seen[run_id] = (queue or "?", verdict, time.monotonic() + ttl)
        else:
            QueueProbe._seen.pop(run_id, None)

    @classmethod
    def summary(cls) -> dict[str, dict[str, Any]]:
        """Per queue, the runs of this process's recent sweeps left waiting (by verdict) and the
        broker's last figures for it."""
        now = time.monotonic()
        for run_id in [k for k, (_q, _v, until) in cls._seen.items() if until < now]:
            del cls._seen[run_id]
        out: dict[str, dict[str, Any]] = {}
        for queue, verdict, _until in cls._seen.values():
            state = cls._last.get(queue)
            entry = out.setdefault(
                queue,
                {
                    "runs": {},
                    "ready": None if state is None else state.ready,
                    "consumers": None if state is None else state.consumers,
                },
            )
            entry["runs"][verdict] = entry["runs"].get(verdict, 0) + 1
        return out
