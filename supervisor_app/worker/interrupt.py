"""Interrupting a body that lost its lease or was cancelled, without waiting for its next heartbeat.

A body that never calls ``heartbeat()`` would only learn of a lost lease or a cancel when it returns.
The lease keeper learns of it at its next renewal; it then signals its own process, and the handler,
which Python runs on the main thread between two bytecodes (also breaking a sleep or a blocking
read), raises ``LeaseLost`` / ``RunCancelled`` in the body if that body is still the one running.
The check runs on the main thread itself, so a body that has just returned is never hit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.signals import worker_process_init

from ..conf import supervisor_settings
from ..core.errors import LeaseLost, RunCancelled

logger = logging.getLogger("supervisor_app")

#: Stops a body: ``cancel`` True for an operator's cancel, False for a lost lease.
Stop = Callable[[bool], None]

INTERRUPT_SIGNAL = signal.SIGUSR2


@dataclass
class _Body:
    current: tuple[int, int] | None = None
    pending: tuple[tuple[int, int], bool] | None = None
    #: The body interrupted last: it may have been stopped in the middle of a database call.
    fired: tuple[int, int] | None = None
    warned: bool = False
    #: This process is a prefork pool process (``worker_process_init`` was sent in it).
    pool_child: bool = False


#: The body running on this process's main thread (one per process: prefork and solo run one at a time).
body = _Body()


def _on_interrupt(signum: int, frame: Any) -> None:
    pending, body.pending = body.pending, None
    if pending is None or pending[0] != body.current:
        return  # the body it was meant for has finished already
    (run_id, attempt), cancel = pending
    body.fired = pending[0]
    if cancel:
        raise RunCancelled(f"run {run_id} was cancelled (body interrupted)")
    raise LeaseLost(f"run {run_id} attempt {attempt} lost its lease (body interrupted)")


def can_interrupt() -> bool:
    """Install the handler once per process, on the main thread, unless the signal is taken."""
    if not supervisor_settings.raw("INTERRUPT_BODIES") or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(INTERRUPT_SIGNAL)
    if current is _on_interrupt:
        return True
    if current == signal.SIG_DFL:  # someone else's handler is never replaced
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
        return True
    if not body.warned:
        body.warned = True
        logger.info("SIGUSR2 has a handler already: bodies are not interrupted, they stop at heartbeat()")
    return False


def _in_pool_child(**kwargs: Any) -> None:
    # Sent in each prefork pool process after the fork (not in solo, threads or gevent workers).
    body.pool_child = True


def connect() -> None:
    """Connected by the app's ``ready()`` (never at import): mark prefork pool processes, whose
    bodies a hard stop may end with their process."""
    worker_process_init.connect(_in_pool_child, weak=False, dispatch_uid="supervisor_app.pool_child")


def stopper(key: tuple[int, int]) -> tuple[Stop | None, Callable[[], None] | None]:
    """How the lease keeper can stop the body of ``key`` about to run on this thread or greenlet:
    ``(stop, hard_stop)``, each None where it is impossible.

    - prefork and solo (the body runs on the main thread): a signal to our own process, handled on
      the main thread, raises in the body if it is still the one running (:func:`interrupt_body`);
      in a prefork pool process, ``hard_stop`` then ends that process if the body is *still* that
      attempt after ``SUPERVISOR_STOP_GRACE`` (stuck in C code, or swallowing the exception). Only
      this process, verified to be running this very attempt, is ended: never a signal from
      outside that may land on the next task.
    - gevent: the exception is thrown into the body's own greenlet, which runs nothing else.
    - threads: a thread can't be stopped from outside; the body learns it at its next
      ``heartbeat()`` and its writes are fenced.
    """
    if can_interrupt():
        return (lambda cancel: interrupt_body(key, cancel)), (_hard_stop(key) if body.pool_child else None)
    greenlet = _current_greenlet()
    if greenlet is not None:
        return (lambda cancel: _kill_greenlet(greenlet, key, cancel)), None
    return None, None


def _hard_stop(key: tuple[int, int]) -> Callable[[], None]:
    def stop() -> None:
        if body.current != key:
            return  # it stopped in time: nothing to do
        logger.error(
            "run %s attempt %s: the body did not stop after being interrupted; ending this pool process",
            key[0],
            key[1],
        )
        os._exit(70)  # EX_SOFTWARE; the pool starts a new process

    return stop


def _current_greenlet() -> Any:
    """The running greenlet when gevent has patched this process and we are not on its hub's main."""
    try:
        from gevent import monkey
    except ImportError:
        return None
    if not monkey.is_module_patched("threading"):
        return None
    import gevent

    current = gevent.getcurrent()
    return None if current.parent is None else current


def _kill_greenlet(greenlet: Any, key: tuple[int, int], cancel: bool) -> None:
    import gevent

    run_id, attempt = key
    logger.warning(
        "run %s attempt %s: interrupting the body (%s)", run_id, attempt, "cancelled" if cancel else "lease lost"
    )
    exc: BaseException = (
        RunCancelled(f"run {run_id} was cancelled (body interrupted)")
        if cancel
        else LeaseLost(f"run {run_id} attempt {attempt} lost its lease (body interrupted)")
    )
    # Thrown from the hub, not from the keeper's greenlet: a direct throw would switch into the
    # body and leave the keeper never scheduled again.
    gevent.kill(greenlet, exc)


def interrupt_body(key: tuple[int, int], cancel: bool) -> None:
    body.pending = (key, cancel)
    logger.warning(
        "run %s attempt %s: interrupting the body (%s)", key[0], key[1], "cancelled" if cancel else "lease lost"
    )
    signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)
