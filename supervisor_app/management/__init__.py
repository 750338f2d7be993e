"""Management commands: ``supervise`` (the supervisor), ``supervisor_status``, ``prune_runs``."""
