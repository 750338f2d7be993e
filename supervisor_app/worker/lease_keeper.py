"""One lease keeper per worker process: renews every lease the process holds, off the task's thread.

One statement per interval for all the runs of the process (``runs.renew_leases``), so heartbeats cost
one query per process, not one per run, and need no code in the task body. When a renewal learns that
a body lost its lease or was cancelled, it stops that body (:mod:`.interrupt`).

Two threads, so that a database that stops answering can't silence the watch:

- the *keeper* never touches the database. It decides when renewals are due (each lease on its own
  interval, never postponed by other leases arriving: with the threads and gevent pools, short tasks
  keep registering leases while a long body runs), and it **self-fences**: a lease that no renewal has
  confirmed for its whole length may already be handed on by the supervisor, so its body is stopped
  (as for a lost lease) and nothing more is written for it. It also cuts the socket of a renewal
  that hangs, so the next one starts on a fresh connection;
- the *renewer* runs the renewal statement when the keeper asks, and writes the queued completions.

**Deferred completions** (unless ``SUPERVISOR_STRICT_FINISH`` or the task's ``strict_finish``): a body
that returned hands its success to the keeper (:meth:`LeaseKeeper.complete`) and the worker moves on
to its next task. The renewer writes every queued success of the process in one statement
(``runs.finish_successes``) within ``SUPERVISOR_FINISH_DELAY``, sooner when the batch is full, and
on shutdown. Until then the run stays ``running`` with its lease: a worker killed in between leaves
it to the supervisor, which recovers it and runs the body again (at-least-once, as for any crash);
the write is fenced by the claim's token like every other, so a late one can't win over a new claim.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import runs
from ..conf import supervisor_settings
from ..db import cut_socket, recover_connection, socket_fd

logger = logging.getLogger("supervisor_app")

#: Stops a body: called with ``cancel`` True for an operator's cancel, False for a lost lease.
Stop = Callable[[bool], None]

T = TypeVar("T")

#: Queued completions that make the renewer write at once, without waiting for the delay.
FLUSH_BATCH = 200


@dataclass
class Lease:
    interval: float
    #: Monotonic time until which the lease is surely held: the start of the last statement that
    #: renewed it, plus the lease timeout. Lets the agent ride out a database outage shorter than
    #: the lease without ever working past a lease the supervisor could have handed on.
    held_until: float
    lease_timeout: float
    #: The claim's token: the fence of every write for this lease.
    token: str | None = None
    lost: bool = False
    #: Lost because no renewal could confirm it in time (partition, outage), not because the
    #: database refused it: the agent then writes nothing more for it.
    unprovable: bool = False
    cancel_requested: bool = False
    #: How to stop the body (None: it can't be stopped from outside, e.g. the threads pool).
    stop: Stop | None = None
    #: When to renew next (monotonic).
    due: float = 0.0
    #: When the body was asked to stop (monotonic), for the hard stop after the grace.
    stopped_at: float | None = None
    hard_stop: Callable[[], None] | None = None
    #: Cuts the body's own database socket: at a self-fence the body may be blocked in a query that
    #: will never be answered, where no exception can reach it.
    cut_body: Callable[[], None] | None = None
    #: The body returned and its success waits to be written (monotonic time), by ``flush_at``.
    completed_at: float | None = None
    flush_at: float = 0.0
    worker: str = ""
    #: The body's return value, as the JSON text its run stores (None: nothing to store).
    result: str | None = None


def fence_margin(lease_timeout: float) -> float:
    """How long before ``held_until`` the keeper stops a body it can't prove holds its lease: time
    for the stop to land before the supervisor's next sweep could hand the run on."""
    return min(2.0, lease_timeout / 10)


@dataclass
class LeaseKeeper:
    """Renews the leases of the runs executing in this process (any pool: prefork, solo, threads, gevent)."""

    _leases: dict[tuple[int, int], Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pid: int = 0
    renewals: int = 0
    #: The renewer: asked to renew by ``_renew_now``, busy since ``_busy_since`` on socket ``_fd``.
    _renew_now: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None
    _busy_since: float | None = None
    _fd: int | None = None
    _cut: bool = False
    #: When the keeper's next pass is due (monotonic): a new deadline before it wakes the keeper.
    _next_pass: float = 0.0
    #: What the renewer was woken for.
    _renew_wanted: bool = False
    _flush_wanted: bool = False
    #: This process is a Celery worker's (``worker_init`` was sent in it or its parent): only there
    #: is a keeper thread sure to outlive the task and flush its completion.
    in_worker: bool = False
    #: Completions written, and statements that wrote them.
    completions: int = 0
    flushes: int = 0

    def register(
        self,
        run_id: int,
        attempt: int,
        interval: float,
        lease_timeout: float,
        since: float,
        token: str | None = None,
        stop: Stop | None = None,
        hard_stop: Callable[[], None] | None = None,
        cut_body: Callable[[], None] | None = None,
    ) -> None:
        with self._lock:
            # The claim just renewed it: the first renewal is one interval after the claim.
            self._leases[(run_id, attempt)] = Lease(
                interval,
                since + lease_timeout,
                lease_timeout,
                token=token,
                stop=stop,
                due=since + interval,
                hard_stop=hard_stop,
                cut_body=cut_body,
            )
            self._ensure_thread()
            earlier = min(since + interval, since + lease_timeout - fence_margin(lease_timeout)) < self._next_pass
        if earlier:
            # An earlier deadline than the keeper waits for: recompute its wait. (Not on every
            # registration: waking a thread per task costs a context switch on the task's path.)
            self._wake.set()

    def complete(self, run_id: int, attempt: int, worker: str, result: str | None = None) -> bool:
        """Queue the success of a body that returned; the renewer writes it (see the module's doc).

        False when it can't be queued (no such lease, or it is lost): the caller writes it itself."""
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is None or lease.lost or lease.completed_at is not None:
                return False
            delay = supervisor_settings.FINISH_DELAY
            lease.completed_at, lease.flush_at, lease.worker = now, now + float(delay or 0.0), worker
            lease.result = result
            # Nothing left to stop: the body returned.
            lease.stop = lease.hard_stop = lease.cut_body = None
            pending = sum(1 for other in self._leases.values() if other.completed_at is not None)
            self._ensure_thread()
            if pending >= FLUSH_BATCH or not delay:
                self._flush_wanted = True
                self._renew_now.set()
                return True
            earlier = lease.flush_at < self._next_pass
        if earlier:
            self._wake.set()  # the keeper waits for longer than the delay: recompute its wait
        return True

    def pending_completions(self) -> int:
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.completed_at is not None)

    def drain(self, timeout: float = 5.0) -> int:
        """Write the queued completions now (worker shutdown), waiting at most ``timeout`` seconds;
        returns how many are still unwritten."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.pending_completions()
            if not left:
                return 0
            if time.monotonic() >= deadline:
                logger.warning("%s completions not written at shutdown; the supervisor recovers those runs", left)
                return left
            with self._lock:
                self._flush_wanted = True
                self._ensure_thread()
            self._renew_now.set()
            time.sleep(0.01)

    def unregister(self, run_id: int, attempt: int) -> Lease | None:
        with self._lock:
            return self._leases.pop((run_id, attempt), None)

    def state(self, run_id: int, attempt: int) -> Lease | None:
        with self._lock:
            return self._leases.get((run_id, attempt))

    def checked(self, run_id: int, attempt: int) -> Lease | None:
        """The lease of a body about to touch the database, self-fenced first if it can no longer be
        proved held. A body resuming after a pause (SIGSTOP, a VM freeze) may run before the keeper's
        thread does: it must learn the lease is gone here, not from a write sent past the lease."""
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is not None:
                self._fence_if_unprovable((run_id, attempt), lease, time.monotonic())
            return lease

    @staticmethod
    def _fence_if_unprovable(key: tuple[int, int], lease: Lease, now: float) -> bool:
        """Mark ``lease`` lost (self-fenced) if no renewal confirmed it for long enough that the
        supervisor may hand the run on; True when this call fenced it. The caller holds the lock."""
        if lease.lost or now < lease.held_until - fence_margin(lease.lease_timeout):
            return False
        lease.lost = lease.unprovable = True
        logger.warning(
            "run %s attempt %s: lease not confirmed for %.1fs (database unreachable?); "
            "stopping the body and writing nothing more for it (self-fenced)",
            key[0],
            key[1],
            lease.lease_timeout - (lease.held_until - now),
        )
        return True

    def mark(self, run_id: int, attempt: int, held: bool, cancel_requested: bool, since: float) -> None:
        """Record a renewal's answer; ``since`` is when its statement was sent (monotonic)."""
        with self._lock:
            lease = self._leases.get((run_id, attempt))
            if lease is not None:
                lease.lost = lease.lost or not held
                lease.cancel_requested = lease.cancel_requested or cancel_requested
                if held and not lease.lost:
                    lease.held_until = max(lease.held_until, since + lease.lease_timeout)

    def _ensure_thread(self) -> None:
        # After a fork (prefork pool) the parent's threads do not exist in the child: start anew.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._busy_since, self._fd, self._renewer = None, None, None
            self._thread = threading.Thread(target=self._loop, name="supervisor-lease-keeper", daemon=True)
            self._thread.start()
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_loop, name="supervisor-lease-renewer", daemon=True)
            self._renewer.start()

    # ------------------------------------------------------------------ the keeper (no database)

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            wait = self.tick(time.monotonic())
            self._wake.wait(wait)

    def tick(self, now: float) -> float:
        """One pass of the keeper at ``now``: self-fence, hard stops, renewal due. Returns how long to
        wait before the next pass (the nearest deadline)."""
        to_stop: list[tuple[tuple[int, int], Lease]] = []
        to_kill: list[Callable[[], None]] = []
        grace = supervisor_settings.STOP_GRACE
        with self._lock:
            nearest = now + 60.0
            renew = flush = False
            for key, lease in self._leases.items():
                if lease.completed_at is not None:
                    # No body to stop or lease to renew: the write is due (it is fenced by the token,
                    # so one that comes late can't win over another claim).
                    if now >= lease.flush_at:
                        flush = True
                    else:
                        nearest = min(nearest, lease.flush_at)
                    continue
                if self._fence_if_unprovable(key, lease, now):
                    to_stop.append((key, lease))
                elif not lease.lost:
                    nearest = min(nearest, lease.held_until - fence_margin(lease.lease_timeout))
                    if now >= lease.due:
                        renew = True
                        lease.due = now + lease.interval
                    nearest = min(nearest, lease.due)
                if lease.stopped_at is not None and lease.hard_stop is not None and grace is not None:
                    if now >= lease.stopped_at + grace:
                        to_kill.append(lease.hard_stop)
                        lease.hard_stop = None
                    else:
                        nearest = min(nearest, lease.stopped_at + grace)
            busy = self._busy_since
            self._next_pass = nearest
            self._renew_wanted = self._renew_wanted or renew
            self._flush_wanted = self._flush_wanted or flush
        if flush and busy is None:
            self._renew_now.set()
        if renew:
            if busy is None:
                self._renew_now.set()
            else:
                self._unstick(now)
        elif busy is not None and now - busy > self._stuck_after():
            self._unstick(now)
        for key, lease in to_stop:
            self._stop(key, lease, cancel=False, now=now)
            if lease.cut_body is not None:
                lease.cut_body()
        for kill in to_kill:
            kill()
        return max(0.01, nearest - time.monotonic())

    def _stuck_after(self) -> float:
        # A renewal outstanding for a whole lease can't save any lease any more (the bodies are
        # self-fenced by then): only then is its socket cut, so the next renewal starts afresh. Not
        # sooner: under load a slow renewal is still worth its answer, and a cut costs a reconnect.
        with self._lock:
            timeouts = [lease.lease_timeout for lease in self._leases.values()]
        return max(1.0, min(timeouts, default=60.0))

    def _unstick(self, now: float) -> None:
        """The renewal in flight is taking too long: cut its socket (a partition blackholes packets,
        and a blocked read would wait for TCP's own timeouts), so it fails and the next renewal
        starts on a fresh connection."""
        stuck_after = self._stuck_after()
        with self._lock:  # the renewer clears the fd under this lock before closing its connection
            busy, fd = self._busy_since, self._fd
            if busy is None or fd is None or self._cut or now - busy <= stuck_after:
                return
            self._cut = True
            cut_socket(fd)
        logger.warning("lease renewal unanswered for %.1fs: cut its database connection", now - busy)

    def _stop(self, key: tuple[int, int], lease: Lease, cancel: bool, now: float) -> None:
        if lease.stop is None:
            return
        with self._lock:
            if lease.stopped_at is None:
                lease.stopped_at = now
        try:
            lease.stop(cancel)
        except Exception:  # never let one body's stop kill the keeper
            logger.exception("run %s attempt %s: could not stop the body", *key)

    # ------------------------------------------------------------------ the renewer (database)

    def _renew_loop(self) -> None:
        while True:
            self._renew_now.wait()
            self._renew_now.clear()
            with self._lock:
                flush, renew = self._flush_wanted, self._renew_wanted
                self._flush_wanted = self._renew_wanted = False
            if flush:
                self.flush_completions()
            if renew:
                self.renew_once()

    def _watched(self, statement: Callable[[], T], what: str) -> T | None:
        """Run the renewer's ``statement`` with its socket watched by the keeper (cut if it hangs);
        None when it failed, logged, the connection recovered for the next one."""
        with self._lock:
            self._busy_since, self._fd, self._cut = time.monotonic(), socket_fd(), False
        try:
            return statement()
        except Exception as exc:
            # A database hiccup: keep trying. If it lasts past the lease, the keeper self-fences the
            # bodies, and the supervisor gives the runs to other agents.
            with self._lock:  # before the socket is closed: the keeper must never cut a reused fd
                self._busy_since = self._fd = None
            logger.warning("%s failed (%s)", what, type(exc).__name__)
            recover_connection()
            return None
        finally:
            with self._lock:
                self._busy_since = self._fd = None

    def flush_completions(self) -> None:
        """Write every queued completion of this process in one statement."""
        with self._lock:
            batch = [(key, lease) for key, lease in self._leases.items() if lease.completed_at is not None]
        if not batch:
            return
        done = [(key[0], key[1], lease.token, lease.worker, lease.result) for key, lease in batch]
        written = self._watched(lambda: runs.finish_successes(done), "writing completions")
        now = time.monotonic()
        with self._lock:
            for key, lease in batch:
                if written is not None or now >= lease.held_until:
                    self._leases.pop(key, None)
                    if written is None:
                        logger.warning(
                            "run %s attempt %s: outcome not recorded, database unavailable past the lease; "
                            "the supervisor will recover the attempt",
                            *key,
                        )
                else:
                    lease.flush_at = now + 0.2  # try again soon, while the lease surely holds
        if written is not None:
            self.completions += len(written)
            self.flushes += 1
        else:
            self._wake.set()

    def renew_once(self) -> None:
        with self._lock:
            live = [(k, lease) for k, lease in self._leases.items() if not lease.lost and lease.completed_at is None]
            wanted = [key for key, _ in live]
            tokens = {key: lease.token for key, lease in live if lease.token}
        if not wanted:
            return
        since = time.monotonic()
        states = self._watched(lambda: runs.renew_leases(wanted, tokens), "lease renewal")
        if states is None:
            return
        self.renewals += 1
        now = time.monotonic()
        for (run_id, attempt), st in states.items():
            lease = self.state(run_id, attempt)
            # A run that finished while the statement ran is no longer registered: not a loss.
            if lease is None:
                continue
            news = (not st.held and not lease.lost) or (st.cancel_requested and not lease.cancel_requested)
            if not st.held and not lease.lost:
                logger.warning("run %s attempt %s lost its lease", run_id, attempt)
            self.mark(run_id, attempt, st.held, st.cancel_requested, since)
            if news:
                self._stop((run_id, attempt), lease, cancel=st.held and st.cancel_requested, now=now)
        self._wake.set()  # leases were extended: the keeper's nearest deadline moved


lease_keeper = LeaseKeeper()


def _in_worker(**kwargs: Any) -> None:
    # Sent in a worker's main process before its pool starts; prefork pool processes inherit it.
    lease_keeper.in_worker = True


def _drain(**kwargs: Any) -> None:
    lease_keeper.drain()


def connect() -> None:
    """Connected by the app's ``ready()``: completions are deferred only in Celery workers, and
    written before a worker or pool process exits."""
    from celery.signals import worker_init, worker_process_shutdown, worker_shutdown

    worker_init.connect(_in_worker, weak=False, dispatch_uid="supervisor_app.in_worker")
    worker_process_shutdown.connect(_drain, weak=False, dispatch_uid="supervisor_app.drain_pool_process")
    worker_shutdown.connect(_drain, weak=False, dispatch_uid="supervisor_app.drain_worker")
