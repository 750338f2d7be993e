"""Schedules on the database: definitions, firing, the beat scheduler, the sweep's schedule phase.

- :mod:`.definitions`: a ``PeriodicTask`` and its policy resolved into a ``ScheduleDef``;
- :mod:`.firing`: slots recorded as runs, by the overlap policy; missed slots alerted;
- :mod:`.beat`: ``SupervisedScheduler`` (public as ``supervisor_app.schedulers:SupervisedScheduler``);
- :mod:`.sweep`: overdue slots, start windows and ``queue_one`` releases, a phase of the sweep.

The slot rules themselves are pure, in :mod:`supervisor_app.core.slots`.
"""
