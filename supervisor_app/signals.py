"""Lifecycle signals, sent after the transaction that made the change has committed.

Every signal is sent with ``sender=SupervisedRun`` and ``run=<SupervisedRun>``; extra keyword
arguments are listed beside each one. Receivers run in the process that made the change (worker or
supervisor): keep them short, or hand the work to a task.
"""

from __future__ import annotations

from django.dispatch import Signal

#: An attempt completed. Extra: ``attempt``.
run_succeeded = Signal()
#: A non-retryable error failed the run. Extra: ``attempt``, ``error``.
run_failed = Signal()
#: A retryable error; another attempt follows. Extra: ``attempt``, ``error``, ``retry_in`` (seconds).
run_retrying = Signal()
#: Attempts are exhausted. Extra: ``attempt``, ``reason`` ("error", "lost" or "timed_out").
run_dead = Signal()
#: The agent of an attempt was lost (lease expired) and a new attempt was queued. Extra: ``lost_attempt``.
run_recovered = Signal()
#: An attempt ran past its max runtime, was timed out (fenced) and a new attempt queued. Extra: ``timed_out_attempt``.
run_timed_out = Signal()
#: A zombie agent's write was refused (it lost the lease). Extra: ``attempt``, ``worker``.
run_fenced = Signal()
#: The run was cancelled. Extra: ``attempt``.
run_cancelled = Signal()
#: A scheduled slot was not started inside its window. Extra: ``reason``; ``batch``, the runs of the
#: same schedule missed together (one signal each), for receivers that alert once per batch.
run_missed = Signal()
#: A schedule was disabled after ``pause_after_failures`` consecutive failed or dead runs; ``run`` is the
#: latest of them. Extra: ``reason``; ``batch``, the failed runs (newest first).
schedule_paused = Signal()
