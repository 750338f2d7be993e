"""Is an unstarted attempt's message lost, or only waiting its turn? The rule, as a pure function.

The supervisor asks the broker about the attempt's queue (``broker.QueueProbe``, once per queue per
sweep) and decides here. A message waiting in a healthy backlog is left alone however long the backlog
(publishing it again would only cost a claim per duplicate); a message that is gone is published again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class QueueState:
    """What the broker says about one queue."""

    name: str
    #: Messages ready for delivery (not those held, unacknowledged, by a consumer).
    ready: int
    #: Consumers attached to it; None where the transport can't tell (Redis).
    consumers: int | None
    #: Messages delivered and not yet acknowledged, where the transport tells (Redis: its ``unacked``
    #: hash, every queue's); reported, not used in the decision.
    unacked: int | None = None

    @property
    def consumed(self) -> bool:
        return bool(self.consumers)


class Verdict(str, Enum):
    """What the sweep does with an unstarted attempt whose start timeout passed."""

    #: Waiting behind ready messages that consumers are taking: left alone, not counted as a publish.
    BACKLOG = "backlog"
    #: No queue the supervisor looked at has a consumer (workers down): left alone, not counted;
    #: ``health/`` reports it as a problem.
    OUTAGE = "outage"
    #: No consumer on its queue while other queues have some: published again and counted toward
    #: ``SUPERVISOR_MAX_PUBLISHES`` (the task's queue is not consumed by anyone).
    UNCONSUMED = "unconsumed"
    #: No ready message in its queue: the message is gone (purged, lost by a broker restart) or held
    #: by a consumer (hung, or its prefetch): published again, counted.
    GONE = "gone"
    #: Waiting behind a backlog for longer than ``SUPERVISOR_MAX_BACKLOG_WAIT``: published again,
    #: counted, but never ended ``dead`` while its queue is healthy.
    BOUND = "bound"
    #: The broker can't be asked (filesystem transport, an exchange route, the broker unreachable),
    #: the message was never sent, or a queue whose consumers can't be counted (Redis) kept ready
    #: messages past the bound: published again, counted (the behaviour without inspection).
    UNKNOWN = "unknown"

    @property
    def publishes(self) -> bool:
        return self not in (Verdict.BACKLOG, Verdict.OUTAGE)

    @property
    def may_end(self) -> bool:
        """Whether an attempt published ``SUPERVISOR_MAX_PUBLISHES`` times ends ``dead`` on this verdict."""
        return self in (Verdict.UNCONSUMED, Verdict.GONE, Verdict.UNKNOWN)


def judge(
    state: QueueState | None,
    publish_count: int,
    waited: float,
    max_wait: float | None,
    any_consumed: bool,
) -> Verdict:
    """The verdict on one unstarted attempt whose start timeout passed.

    ``state`` is its queue's (None: unknown); ``publish_count`` its publishes so far (0: never sent,
    so nothing can be waiting); ``waited`` the seconds since the attempt was recorded; ``max_wait``
    ``SUPERVISOR_MAX_BACKLOG_WAIT`` (None: no bound); ``any_consumed`` whether any queue the
    supervisor looked at has a consumer.

    A healthy backlog (ready messages, consumers) leaves the attempt alone until it has waited
    ``max_wait`` per publish: one more publish per bound, against a message lost from a queue that
    never empties. Where the transport can't count consumers (Redis), ready messages are taken for a
    backlog under the same bound.
    """
    if state is None or publish_count < 1:
        return Verdict.UNKNOWN
    if state.consumers == 0:
        return Verdict.UNCONSUMED if any_consumed else Verdict.OUTAGE
    if state.ready < 1:
        return Verdict.GONE
    if max_wait is not None and waited >= max_wait * publish_count:
        # Where consumers can't be counted, a queue nobody consumes looks like a backlog: past the
        # bound the publish counts toward the never-started end, as an unknown state's would.
        return Verdict.BOUND if state.consumers is not None else Verdict.UNKNOWN
    return Verdict.BACKLOG
