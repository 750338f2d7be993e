"""The rules of supervision as pure functions and values: no database, no broker, no Celery.

Everything here can be unit-tested without a database (``tests/unit``). The layers above apply these
rules: ``runs`` turns each :class:`~supervisor_app.core.states.Move` into a conditional ``UPDATE``,
``scheduling`` turns slot decisions into recorded runs.

- :mod:`.states`: statuses, outcomes, every allowed move, the liveness table;
- :mod:`.errors`: the exceptions task code raises or receives;
- :mod:`.retry`: failure classification, backoff, "is this the last attempt?";
- :mod:`.policies`: the supervision policy choices (defined once) and the values a run records;
- :mod:`.slots`: slot times of schedules and what to do with late slots;
- :mod:`.alerting`: alert events, messages and the redaction of webhook URLs;
- :mod:`.ids`: Celery task ids of attempts;
- :mod:`.delay`: when a dispatched run is due (``countdown=``, ``eta=``).

(``TextChoices`` comes from ``django.db.models`` but is a plain enum: nothing here opens a connection.)
"""
