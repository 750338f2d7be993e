"""The agent side: what runs in a Celery worker process.

- :mod:`.task`: ``SupervisedTask``, the base class (public as ``supervisor_app.tasks.SupervisedTask``);
- :mod:`.execute`: one delivered attempt, from claim to fenced finish, riding out database outages;
- :mod:`.lease_keeper`: one thread per process renewing every lease it holds;
- :mod:`.interrupt`: stopping a body whose lease was lost or whose run was cancelled.
"""
