"""One lease keeper per worker process: renews every lease the process holds, off the task's thread.

One statement per interval for all the runs of the process (``runs.renew_leases``), so heartbeats cost
one query per process, not one per run, and need no code in the task body. When a renewal learns that
a body lost its lease or was cancelled, it interrupts that body (:mod:`.interrupt`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .. import runs
from ..db import recover_connection
from .interrupt import interrupt_body

logger = logging.getLogger("supervisor_app")


@dataclass
class Lease:
    interval: float
    #: Monotonic time until which the lease is surely held: the start of the last statement that
    #: renewed it, plus the lease timeout. Lets the agent ride out a database outage shorter than
    #: the lease without ever working past a lease the supervisor could have handed on.
    held_until: float
    lease_timeout: float
    lost: bool = False
    cancel_requested: bool = False
    #: The body runs on the process's main thread (prefork, solo): it can be interrupted.
    interruptible: bool = False


@dataclass
class LeaseKeeper:
    """Renews the leases of the runs executing in this process (any pool: prefork, threads)."""

    _leases: dict[tuple[int, int], Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pid: int = 0
    renewals: int = 0

    def register(
        self,
        run_id: int,
        attempt: int,
        interval: float,
        lease_timeout: float,
        since: float,
        interruptible: bool = False,
    ) -> None:
        with self._lock:
            self._leases[(run_id, attempt)] = Lease(
                interval, since + lease_timeout, lease_timeout, interruptible=interruptible
            )
            self._ensure_thread()
        self._wake.set()  # pick up a shorter interval at once

    def unregister(self, run_id: int, attempt: int) -> Lease | None:
        with self._lock:
            return self._leases.pop((run_id, attempt), None)

    def state(self, run_id: int, attempt: int) -> Lease | None:
        with self._lock:
            return self._leases.get((run_id, attempt))

    def mark(self, run_id: int, attempt: int, held: bool, cancel_requested: bool, since: float) -> None:
        """Record a renewal's answer; ``since`` is when its statement was sent (monotonic)."""
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is not None:
                lease.lost = lease.lost or not held
                lease.cancel_requested = lease.cancel_requested or cancel_requested
                if held:
                    lease.held_until = max(lease.held_until, since + lease.lease_timeout)

    def _ensure_thread(self) -> None:
        # After a fork (prefork pool) the parent's thread does not exist in the child: start anew.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="supervisor-lease-keeper", daemon=True)
            self._thread.start()

    def _interval(self) -> float | None:
        with self._lock:
            live = [lease.interval for lease in self._leases.values() if not lease.lost]
        return min(live) if live else None

    def _loop(self) -> None:
        while True:
            interval = self._interval()
            self._wake.clear()
            if interval is None:
                self._wake.wait(60.0)
                continue
            if self._wake.wait(interval):
                continue  # a lease was added: recompute the interval, the claim just renewed it
            self.renew_once()

    def renew_once(self) -> None:
        with self._lock:
            wanted = [key for key, lease in self._leases.items() if not lease.lost]
        if not wanted:
            return
        since = time.monotonic()
        try:
            states = runs.renew_leases(wanted)
        except Exception as exc:
            # A database hiccup: keep trying. If it lasts past the lease, the supervisor gives the run
            # to another agent and our next write is refused; that is the design, not a failure here.
            logger.warning("lease renewal failed (%s)", type(exc).__name__)
            recover_connection()
            return
        self.renewals += 1
        for (run_id, attempt), st in states.items():
            lease = self.state(run_id, attempt)
            # A run that finished while the statement ran is no longer registered: not a loss.
            if lease is None:
                continue
            news = (not st.held and not lease.lost) or (st.cancel_requested and not lease.cancel_requested)
            if not st.held:
                logger.warning("run %s attempt %s lost its lease", run_id, attempt)
            self.mark(run_id, attempt, st.held, st.cancel_requested, since)
            if news and lease.interruptible:
                interrupt_body((run_id, attempt), cancel=st.held and st.cancel_requested)


lease_keeper = LeaseKeeper()
