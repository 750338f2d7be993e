"""The beat entry point: ``celery -A project beat -S supervisor_app.schedulers:SupervisedScheduler``.

The scheduler lives in :mod:`supervisor_app.scheduling.beat`; this path is the public one.
"""

from .scheduling.beat import SupervisedEntry, SupervisedScheduler

__all__ = ["SupervisedEntry", "SupervisedScheduler"]
