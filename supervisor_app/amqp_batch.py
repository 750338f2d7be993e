"""Many ``basic.publish`` calls on one py-amqp channel written to the socket together.

kombu (5.7 and later) lets a producer batch its publishes (``Producer.batch()``) when the channel can
make a publish batch (``create_publish_batch``); its Redis transport pipelines them, its py-amqp
transport has no batch and publishes each message as it comes: its properties encoded by py-amqp's
general-purpose serializer, a ``drain_events(timeout=0)`` (a ``recv`` that times out) to notice a
``connection.blocked``, and one ``sendall`` per message. For a sweep or a fan-out of thousands of
messages that is most of the publishing time.

:class:`PublishBatch` is such a batch for py-amqp: it encodes the very frames py-amqp would write
(the method frame, the content header with the properties, the body split at the connection's frame
size; ``tests/db/test_amqp_batch.py`` holds the bytes equal to py-amqp's own), appends them to a
buffer and writes the buffer in one call every ``max_size`` messages and at the batch's end, then
looks once for what the server sent meanwhile (a ``connection.blocked``, a channel closed by an
error), as py-amqp does before each publish.

What changes for the caller: a message is on the wire only once the batch is flushed, so a broker
failure is raised by the flush (the ``with producer.batch()`` block's end), for every message not yet
written; some of them may have reached the broker. Our callers treat them all as unsent: the runs
stay queued and are published again, and the attempt fence makes a message delivered twice run once.

:func:`batching` gives a producer such a batch only where it is safe: a py-amqp channel not in
publisher-confirm mode (``confirm_publish`` waits for each message's ack: left to py-amqp), on a
kombu that has ``Producer.batch``. Anywhere else it is kombu's own batch (Redis) or nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from struct import Struct
from typing import Any, NamedTuple

#: Messages buffered before a write (about 0.3-0.5 KB each for a small task: a write of a few
#: hundred KB, well inside the socket's send buffer growth and RabbitMQ's read size).
MAX_SIZE = 1000

_BASIC_CLASS = 60
_PUBLISH = (60, 40)
_FRAME_END = b"\xce"
_FRAME_OVERHEAD = 40  # py-amqp's margin when it decides whether a message fits one frame
_frame_head = Struct(">BHI")
_content_head = Struct(">HHQ")
_method_head = Struct(">HH")
_u8 = Struct("B")
_u16 = Struct(">H")
_u32 = Struct(">I")
_i32 = Struct(">i")
_i64 = Struct(">q")
_f64 = Struct(">d")


def _write_value(value: Any, out: bytearray) -> None:
    """One field value of a table, as py-amqp's ``_write_item`` encodes it: the common types here,
    anything else (nested tables and arrays, datetimes, decimals, subclasses) by py-amqp itself."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out += b"S"
        out += _u32.pack(len(data))
        out += data
    elif value is None:
        out += b"V"
    elif kind is int:
        if value > 2147483647 or value < -2147483647:
            out += b"L"
            out += _i64.pack(value)
        else:
            out += b"I"
            out += _i32.pack(value)
    elif kind is bool:
        out += b"t\x01" if value else b"t\x00"
    elif kind is float:
        out += b"d"
        out += _f64.pack(value)
    elif (kind is tuple or kind is list) and all(type(item) in _SCALARS for item in value):
        # An array of scalars (Celery's timelimit, in every message): no BytesIO per value.
        items = bytearray()
        for item in value:
            _write_value(item, items)
        out += b"A"
        out += _u32.pack(len(items))
        out += items
    else:
        from amqp.serialization import _write_item  # type: ignore[attr-defined]

        buffer = BytesIO()
        _write_item(value, buffer.write, [])
        out += buffer.getvalue()


#: The last value of each table key and its encoded item: most of a Celery message's headers are the
#: same in every message of a batch (task name, limits, origin...), and are encoded once. A value is
#: the same when it is an equal scalar of the same type (``1``, ``1.0`` and ``True`` are equal,
#: encoded differently); containers are encoded every time (one may have changed since).
_last: dict[str, tuple[Any, bytes]] = {}
_LAST_MAX = 1024
_SCALARS = frozenset((str, int, bool, float, type(None)))


def _write_table(table: Any, out: bytearray) -> None:
    body = bytearray()
    last = _last
    for key, value in table.items():
        if type(key) is str:
            previous = last.get(key)
            if previous is not None:
                seen = previous[0]
                if type(seen) is type(value) and type(value) in _SCALARS and (seen is value or seen == value):
                    body += previous[1]
                    continue
            item = bytearray()
            name = key.encode("utf-8", "surrogatepass")
            item += _u8.pack(len(name))
            item += name
            _write_value(value, item)
            if len(last) >= _LAST_MAX:
                last.clear()
            last[key] = (value, bytes(item))
            body += item
            continue
        body += _u8.pack(len(key))
        body += key
        _write_value(value, body)
    out += _u32.pack(len(body))
    out += body


def _write_shortstr(value: Any, out: bytearray) -> None:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    out += _u8.pack(len(data))
    out += data


def properties(props: Any, fields: Any) -> bytes:
    """The property flags and list of a content header (``props`` of a message whose class has
    ``fields`` as its ``PROPERTIES``), as ``GenericContent._serialize_properties`` writes them (one flag
    word: basic messages have fewer than 15 properties)."""
    from amqp.serialization import dumps

    flags = 0
    shift = 15
    out = bytearray()
    for key, kind in fields:
        value = props.get(key)
        if value is not None:
            flags |= 1 << shift
            if kind == "s":
                _write_shortstr(value or "", out)
            elif kind == "F":
                _write_table(value or {}, out)
            elif kind == "o":
                out += _u8.pack(value)
            else:
                out += dumps(kind, (value,))
        shift -= 1
    return _u16.pack(flags) + bytes(out)


def _frame(kind: int, channel: int, payload: bytes | memoryview) -> bytes:
    return b"".join((_frame_head.pack(kind, channel, len(payload)), payload, _FRAME_END))


def publish_frames(
    channel_id: int,
    frame_max: int,
    message: Any,
    exchange: str = "",
    routing_key: str = "",
    mandatory: bool = False,
    immediate: bool = False,
) -> bytes:
    """The frames of one ``basic.publish`` of ``message`` (an ``amqp.Message``), byte for byte what
    py-amqp's ``frame_writer`` writes for ``channel.basic_publish``."""
    args = _publish_args(exchange, routing_key, mandatory, immediate)
    return _frames(channel_id, frame_max, _body(message), properties(message.properties, message.PROPERTIES), args)


def _body(message: Any) -> bytes:
    """A message's body as py-amqp writes it (text encoded, its encoding recorded as py-amqp does)."""
    body = message.body
    if isinstance(body, str):
        body = body.encode(message.properties.setdefault("content_encoding", "utf-8"))
    return bytes(body)


def _publish_args(exchange: str, routing_key: str, mandatory: bool, immediate: bool) -> bytes:
    from amqp.serialization import dumps

    return bytes(dumps("Bssbb", (0, exchange, routing_key, mandatory, immediate)))


def _frames(channel_id: int, frame_max: int, body: bytes, props: bytes, args: bytes) -> bytes:
    head = _content_head.pack(_BASIC_CLASS, 0, len(body)) + props
    parts = [_frame(1, channel_id, _method_head.pack(*_PUBLISH) + args), _frame(2, channel_id, head)]
    chunk = frame_max - 8
    if len(args) + len(props) + len(body) + _FRAME_OVERHEAD > chunk:  # py-amqp's test: split the body
        view = memoryview(body)
        parts.extend(_frame(3, channel_id, view[i : i + chunk]) for i in range(0, len(body), chunk))
    elif body:
        parts.append(_frame(3, channel_id, body))
    return b"".join(parts)


class Template(NamedTuple):
    """A message published through kombu in this batch, to publish others like it without kombu:
    the same properties but for the headers, the correlation id and the expiration; the same
    exchange, routing key and flags."""

    message: Any
    args: bytes


class PublishBatch:
    """A publish batch (kombu's ``create_publish_batch`` protocol) for one py-amqp channel."""

    def __init__(self, channel: Any, max_size: int = MAX_SIZE) -> None:
        self.channel = channel
        self.max_size = max_size
        self._buffer: list[bytes] = []
        #: The last message published through kombu (see :meth:`publish_like`).
        self.last: Template | None = None
        #: Templates kept by the caller for this batch, by a key of its own.
        self.templates: dict[Any, Any] = {}

    def publish(
        self,
        message: Any,
        exchange: str = "",
        routing_key: str = "",
        mandatory: bool = False,
        immediate: bool = False,
        timeout: float | None = None,
        confirm_timeout: float | None = None,
    ) -> None:
        args = _publish_args(exchange or "", routing_key or "", mandatory, immediate)
        self._add(_body(message), properties(message.properties, message.PROPERTIES), args)
        self.last = Template(message, args)

    def publish_like(
        self, template: Template, body: bytes, headers: Any, correlation_id: str, expiration: str | None
    ) -> None:
        """Publish ``body`` as ``template``'s message was published, with these headers, correlation id
        and expiration (None: none): the frames kombu and py-amqp would write for it, without them."""
        props = {
            **template.message.properties,
            "application_headers": headers,
            "correlation_id": correlation_id,
            "expiration": expiration,
        }
        self._add(body, properties(props, template.message.PROPERTIES), template.args)

    def _connection(self) -> Any:
        connection = self.channel.connection
        if not connection:
            from amqp.exceptions import RecoverableConnectionError

            raise RecoverableConnectionError("basic_publish: connection closed")
        return connection

    def _add(self, body: bytes, props: bytes, args: bytes) -> None:
        self._buffer.append(_frames(self.channel.channel_id, self._connection().frame_max, body, props, args))
        if len(self._buffer) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        count = len(self._buffer)
        data, self._buffer = b"".join(self._buffer), []
        connection = self._connection()
        try:
            connection.transport.write(data)
        except TimeoutError:
            from amqp.exceptions import RecoverableConnectionError

            # As py-amqp: a write that timed out leaves the socket unusable.
            raise RecoverableConnectionError("basic_publish: timed out") from None
        # py-amqp counts each publish it writes; its heartbeat check sends a heartbeat only when
        # nothing was written since the last one.
        connection.bytes_sent += count
        # What py-amqp does before every publish, once per write: let the connection handle what the
        # server sent meanwhile (connection.blocked, a channel closed by an error).
        if connection.client_properties.get("capabilities", {}).get("connection.blocked", False):
            try:
                connection.drain_events(timeout=0)
            except TimeoutError:
                pass

    def discard(self) -> None:
        self._buffer = []

    def close(self) -> None:
        self._buffer = []


def _is_pyamqp(channel: Any) -> bool:
    try:
        from amqp.channel import Channel
    except ImportError:  # no py-amqp installed: not this transport
        return False
    return isinstance(channel, Channel)


def current(producer: Any) -> PublishBatch | None:
    """The :class:`PublishBatch` of ``producer``'s open ``batch()`` block, once its first message went
    through kombu (kombu keeps it in ``_batch_local.current.session``); None otherwise, and on a kombu
    that keeps it elsewhere (its callers then publish through kombu, as before)."""
    state = _state(producer)
    session = getattr(state, "session", None)
    return session if isinstance(session, PublishBatch) and not getattr(state, "aborted", True) else None


def _state(producer: Any) -> Any:
    """kombu's state of the producer's open ``batch()`` block (None outside one)."""
    return getattr(getattr(producer, "_batch_local", None), "current", None)


class Batch:
    """What :func:`batching` yields: whether the producer's messages are being buffered."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    @property
    def buffered(self) -> bool:
        """True once the transport made a batch (kombu's ``session``): messages are then written at
        the block's end; False where kombu publishes each at once (no batch for the transport)."""
        return getattr(_state(self.producer), "session", None) is not None


@contextmanager
def batching(producer: Any, max_size: int = MAX_SIZE) -> Iterator[Batch]:
    """``producer.batch(max_size)`` with a :class:`PublishBatch` on a py-amqp channel (see the module
    docstring for where); each message sent at once on a kombu without ``Producer.batch``."""
    handle = Batch(producer)
    batch = getattr(producer, "batch", None)
    if batch is None:
        yield handle
        return
    channel = producer.channel
    ours = (
        _is_pyamqp(channel)
        and not getattr(channel.connection, "confirm_publish", False)
        and "create_publish_batch" not in vars(channel)
    )
    if ours:
        # On this channel object only, for this block only: kombu looks the factory up on the channel.
        channel.create_publish_batch = lambda max_size: PublishBatch(channel, max_size)
    try:
        with batch(max_size):
            yield handle
    finally:
        if ours:
            vars(channel).pop("create_publish_batch", None)
