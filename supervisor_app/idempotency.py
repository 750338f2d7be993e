"""Exactly-once effects for task authors: the public path of :mod:`supervisor_app.runs.effects`.

See that module for how ``effect()`` keeps a database side effect to one attempt of a run.
"""

from .runs.effects import MAX_KEY_LENGTH, effect, idempotency_key, once, performed

__all__ = ["MAX_KEY_LENGTH", "effect", "idempotency_key", "once", "performed"]
