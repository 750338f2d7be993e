"""Interrupting a body that lost its lease or was cancelled, without waiting for its next heartbeat.

A body that never calls ``heartbeat()`` would only learn of a lost lease or a cancel when it returns.
The lease keeper learns of it at its next renewal; it then signals its own process, and the handler,
which Python runs on the main thread between two bytecodes (also breaking a sleep or a blocking
read), raises ``LeaseLost`` / ``RunCancelled`` in the body if that body is still the one running.
The check runs on the main thread itself, so a body that has just returned is never hit.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from ..conf import supervisor_settings
from ..core.errors import LeaseLost, RunCancelled

logger = logging.getLogger("supervisor_app")

INTERRUPT_SIGNAL = signal.SIGUSR2


@dataclass
class _Body:
    current: tuple[int, int] | None = None
    pending: tuple[tuple[int, int], bool] | None = None
    #: The body interrupted last: it may have been stopped in the middle of a database call.
    fired: tuple[int, int] | None = None
    warned: bool = False


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


def interrupt_body(key: tuple[int, int], cancel: bool) -> None:
    body.pending = (key, cancel)
    logger.warning(
        "run %s attempt %s: interrupting the body (%s)", key[0], key[1], "cancelled" if cancel else "lease lost"
    )
    signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)
