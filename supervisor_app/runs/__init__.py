"""Every write to the run tables, one module per concern (the package re-exports the API).

- :mod:`.dispatch`: recording runs (ad hoc and schedule slots) and publishing them after commit;
- :mod:`.leases`: the agent's writes (claim, lease renewal, heartbeat, finish), fenced by the attempt;
- :mod:`.recovery`: the supervisor's writes (lost, timed out, retries due, unstarted);
- :mod:`.operator`: cancel, retry now, mark resolved;
- :mod:`.schedule_runs`: start windows passed, ``queue_one`` runs released;
- :mod:`.effects`: exactly-once side effects (``supervisor_app.idempotency``);
- :mod:`.workflow`: a finished run's continuation (callbacks, errbacks, chain, chord), dispatched once;
- :mod:`.results`: how a run's return value is stored;
- :mod:`.retention`: pruning old runs;
- :mod:`.publishing`, :mod:`.notify`, :mod:`.rows`: what the above share (publish after commit and
  record what could not be sent, signals after commit, the values of each move).

Each state change is a conditional ``UPDATE`` applying one :class:`~supervisor_app.core.states.Move`;
its row count (or ``RETURNING`` rows) decides who won. Nothing relies on a lock held in memory, and
times come from the database (``Now()``), never from the caller.
"""

from ..core.policies import RunPolicy
from .concurrency import release_waiters, wait_for_slot, waiting_keys
from .dispatch import Dispatched, SlotRun, check_json, create_run, create_runs, create_slot_runs
from .leases import (
    Claim,
    LeaseState,
    claim,
    finish_cancelled,
    finish_failure,
    finish_success,
    finish_successes,
    heartbeat,
    record_fenced,
    renew_leases,
    schedule_backoff,
)
from .operator import mark_resolved, request_cancel, retry_now
from .publishing import RunPublisher, publish_by_id
from .recovery import dispatch_retry, force_cancel, recover_lost_batch, republish, time_out
from .retention import prune_runs
from .workflow import follow_up

__all__ = [
    "Claim",
    "Dispatched",
    "LeaseState",
    "RunPolicy",
    "RunPublisher",
    "SlotRun",
    "check_json",
    "claim",
    "create_run",
    "create_runs",
    "create_slot_runs",
    "dispatch_retry",
    "finish_cancelled",
    "finish_failure",
    "finish_success",
    "finish_successes",
    "follow_up",
    "force_cancel",
    "heartbeat",
    "mark_resolved",
    "prune_runs",
    "publish_by_id",
    "record_fenced",
    "recover_lost_batch",
    "release_waiters",
    "renew_leases",
    "republish",
    "request_cancel",
    "retry_now",
    "schedule_backoff",
    "time_out",
    "wait_for_slot",
    "waiting_keys",
]
