"""the Scheduler-Agent-Supervisor pattern for Celery, as a Django app."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["LeaseLost", "NonRetryable", "RunCancelled", "RunFailed", "SupervisedTask", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import Django models or Celery (no work at import time).
    if name in {"LeaseLost", "NonRetryable", "RunCancelled", "RunFailed"}:
        from .core import errors

        return getattr(errors, name)
    if name == "SupervisedTask":
        from .tasks import SupervisedTask

        return SupervisedTask
    raise AttributeError(name)
