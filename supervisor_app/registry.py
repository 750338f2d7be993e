"""Which Celery tasks are supervised: read from Celery's task registry, never from an import.

``SupervisedTask`` sets the class attribute ``supervised = True``; every layer asks this module
instead of importing the class, so the models, the scheduler and the alerts do not depend on the
task layer above them.
"""

from __future__ import annotations

from typing import Any

#: Celery apps whose task modules were imported (``id(app)``).
_discovered: set[int] = set()


def celery_app(app: Any = None) -> Any:
    from celery import current_app

    return app or current_app


def tasks(app: Any = None) -> Any:
    """The app's task registry, after importing the task modules autodiscovery names.

    Celery's autodiscovery runs only when a worker or beat starts; the supervisor, the admin and
    model validation need the registry too.
    """
    app = celery_app(app)
    if id(app) not in _discovered:
        app.loader.import_default_modules()
        _discovered.add(id(app))
    return app.tasks


def is_supervised_task(task: Any) -> bool:
    """Whether ``task`` (a registered task object) is a ``SupervisedTask``."""
    return getattr(task, "supervised", False) is True


def supervised_task_names(app: Any = None) -> set[str]:
    """Names of the registered tasks that are ``SupervisedTask``s (the scheduler's business)."""
    return {name for name, task in tasks(app).items() if is_supervised_task(task)}


def is_registered(name: str, app: Any = None) -> bool:
    return name in tasks(app)


def is_supervised(name: str, app: Any = None) -> bool:
    registered = tasks(app)
    return name in registered and is_supervised_task(registered[name])


def task(name: str, app: Any = None) -> Any:
    """The registered task called ``name`` (``KeyError`` when no imported module defines it)."""
    return tasks(app)[name]
