"""System checks: invalid ``SUPERVISOR_*`` settings fail at start-up with a clear message; stored
schedules Celery can't send are reported."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from .conf import SETTINGS, supervisor_settings
from .core.alerting import check_webhook_url, parse_events
from .core.arguments import parse_arguments
from .core.policies import CatchUp, Overlap, parse_choice
from .core.retry import exception_types


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    values: dict[str, Any] = {}
    for name, spec in SETTINGS.items():
        try:
            values[name] = getattr(supervisor_settings, name)
        except TypeError as exc:
            errors.append(Error(str(exc), id="supervisor_app.E001"))
            continue
        value = values[name]
        if spec.duration and value is not None and value <= 0:
            errors.append(Error(f"SUPERVISOR_{name} must be positive, got {value!r}", id="supervisor_app.E002"))
    for name in ("MAX_ATTEMPTS", "SWEEP_BATCH_SIZE"):
        value = values.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(Error(f"SUPERVISOR_{name} must be an integer >= 1, got {value!r}", id="supervisor_app.E003"))
    limit = values.get("MAX_ARGS_BYTES")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        errors.append(
            Error(f"SUPERVISOR_MAX_ARGS_BYTES must be an integer >= 1 or None, got {limit!r}", id="supervisor_app.E003")
        )
    pause = values.get("PAUSE_AFTER_FAILURES")
    if pause is not None and (not isinstance(pause, int) or isinstance(pause, bool) or pause < 1):
        errors.append(
            Error(
                f"SUPERVISOR_PAUSE_AFTER_FAILURES must be an integer >= 1 or None, got {pause!r}",
                id="supervisor_app.E003",
            )
        )
    lease, beat = values.get("LEASE_TIMEOUT"), values.get("HEARTBEAT_INTERVAL")
    if isinstance(lease, float) and isinstance(beat, float) and lease > 0 and beat > 0:
        if lease <= beat:
            errors.append(
                Error(
                    f"SUPERVISOR_LEASE_TIMEOUT ({lease}s) must be larger than SUPERVISOR_HEARTBEAT_INTERVAL "
                    f"({beat}s), or every lease expires between two renewals.",
                    hint="Use a lease timeout of at least twice the heartbeat interval.",
                    id="supervisor_app.E004",
                )
            )
        elif lease < 2 * beat:
            errors.append(
                Warning(
                    f"SUPERVISOR_LEASE_TIMEOUT ({lease}s) is less than twice SUPERVISOR_HEARTBEAT_INTERVAL "
                    f"({beat}s): one slow renewal loses the lease.",
                    id="supervisor_app.W001",
                )
            )
    for name in ("RETRYABLE_EXCEPTIONS", "NON_RETRYABLE_EXCEPTIONS"):
        try:
            exception_types(values.get(name) or [])
        except (ImportError, TypeError) as exc:
            errors.append(Error(f"SUPERVISOR_{name}: {exc}", id="supervisor_app.E005"))
    for name, choices in (("OVERLAP", Overlap), ("CATCH_UP", CatchUp)):
        try:
            parse_choice(choices, values.get(name), f"SUPERVISOR_{name}")
        except ValueError as exc:
            errors.append(Error(str(exc), id="supervisor_app.E006"))
    return errors


def check_metrics(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``metrics/`` is mounted but prometheus-client (the ``metrics`` extra) is not installed (W020)."""
    from django.urls import NoReverseMatch, reverse

    from .ops.metrics import available

    if available():
        return []
    try:
        url = reverse("supervisor_app:metrics")
    except NoReverseMatch:  # the URLs are not mounted: nothing promises metrics
        return []
    return [
        Warning(
            f"{url} answers 501: the prometheus-client package is not installed.",
            hint='Install the metrics extra: pip install "supervisor-app[metrics]" (or prometheus-client).',
            id="supervisor_app.W020",
        )
    ]


def check_celery(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Refuse pickle: a supervised run's arguments are stored as JSON and must travel as JSON."""
    from django.conf import settings

    messages: list[CheckMessage] = []
    for name in ("CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER"):
        if getattr(settings, name, "json") == "pickle":
            messages.append(Error(f"{name} is 'pickle'; supervisor_app requires JSON.", id="supervisor_app.E010"))
    if "pickle" in (getattr(settings, "CELERY_ACCEPT_CONTENT", None) or []):
        messages.append(
            Error("CELERY_ACCEPT_CONTENT allows pickle; supervisor_app requires JSON.", id="supervisor_app.E011")
        )
    messages.extend(check_broker_heartbeat(getattr(settings, "CELERY_BROKER_URL", None) or "", settings))
    return messages


def check_broker_heartbeat(broker_url: str, settings: Any) -> list[CheckMessage]:
    """On RabbitMQ, a hung worker must lose its connection before its lease expires.

    A hung worker (SIGSTOP, a deadlock in the main process, a paused VM) keeps its AMQP connection
    and its free prefetch slots until the broker notices that heartbeats stopped. Measured: with
    heartbeats off, the attempt the supervisor publishes after the lease landed in the hung worker's
    free slot in every trial, and ran only after a second start timeout (twice the recovery bound).
    """
    if not broker_url.startswith(("amqp", "pyamqp")):
        return []
    # Celery's default for py-amqp is 120 s when the setting is absent.
    heartbeat = getattr(settings, "CELERY_BROKER_HEARTBEAT", 120.0)
    lease = supervisor_settings.lease_timeout
    if not heartbeat or float(heartbeat) >= lease:
        return [
            Warning(
                f"CELERY_BROKER_HEARTBEAT ({heartbeat!r}) is not below SUPERVISOR_LEASE_TIMEOUT ({lease}s): a hung "
                "worker keeps its broker connection past its lease, and RabbitMQ can hand it the attempt the "
                "supervisor publishes to recover the run, which then waits a start timeout more.",
                hint=f"Set CELERY_BROKER_HEARTBEAT to at most a third of the lease timeout ({lease / 3:.0f}s).",
                id="supervisor_app.W002",
            )
        ]
    return []


def check_alert_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    s = supervisor_settings
    errors: list[CheckMessage] = []
    try:
        parse_events(s.ALERT_ON)
    except (ValueError, AttributeError, TypeError) as exc:
        errors.append(Error(f"SUPERVISOR_ALERT_ON: {exc}", id="supervisor_app.E101"))
    url = s.ALERT_WEBHOOK_URL
    if url:
        try:
            check_webhook_url(str(url))
        except ValueError as exc:
            errors.append(Error(f"SUPERVISOR_ALERT_WEBHOOK_URL: {exc}", id="supervisor_app.E102"))
    limit = s.ALERT_RATE_LIMIT
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        errors.append(
            Error(
                f"SUPERVISOR_ALERT_RATE_LIMIT must be an integer >= 1 or None, got {limit!r}", id="supervisor_app.E103"
            )
        )
    retries = s.ALERT_WEBHOOK_RETRIES
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        errors.append(
            Error(
                f"SUPERVISOR_ALERT_WEBHOOK_RETRIES must be an integer >= 0, got {retries!r}", id="supervisor_app.E104"
            )
        )
    return errors


#: Periodic tasks with bad arguments reported one by one, at most this many (then a count).
REPORTED_ROWS = 20


def check_schedule_arguments(
    app_configs: Any = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Periodic tasks whose stored arguments are not a JSON list and a JSON object (W010).

    django-celery-beat's form and ``CELERY_BEAT_SCHEDULE`` accept any JSON; Celery then refuses to send
    such a task, and the beat leaves a supervised one out (warning at each load). The admin form now
    refuses them; this reports the rows written before, or by other means. A database check: it reads
    the table, so it runs only for the databases it is given (``migrate``, ``check --database default``).
    """
    from django.db import DatabaseError, connections, router
    from django_celery_beat.models import PeriodicTask

    alias = router.db_for_read(PeriodicTask)
    if not databases or alias not in databases:
        return []
    bad: list[str] = []
    try:
        # ``migrate`` runs database checks before it migrates: on a new database the table is not
        # there yet, and a failed query would abort the migration's own transaction (psycopg2 also
        # raises its own error, not Django's, when a server-side cursor fails), so look first.
        with connections[alias].cursor() as cursor:
            if PeriodicTask._meta.db_table not in connections[alias].introspection.table_names(cursor):
                return []
        # A plain query, not ``.iterator()``: a server-side cursor fails behind a transaction pooler.
        rows = PeriodicTask.objects.using(alias).order_by("name").values_list("name", "task", "args", "kwargs")
        for name, task, args, kwargs_text in rows:
            try:
                parse_arguments(args, kwargs_text)
            except ValueError as exc:
                bad.append(f"periodic task {name!r} ({task}): {exc}")
    except DatabaseError:  # unreachable or not migrated: no stored schedule to check
        return []
    hint = (
        "Correct them in the admin or in CELERY_BEAT_SCHEDULE. Until then Celery refuses to send them, and "
        "the beat and the supervisor leave out the supervised ones."
    )
    messages: list[CheckMessage] = [Warning(text, hint=hint, id="supervisor_app.W010") for text in bad[:REPORTED_ROWS]]
    if len(bad) > REPORTED_ROWS:
        messages.append(
            Warning(f"{len(bad) - REPORTED_ROWS} more periodic tasks with bad arguments", id="supervisor_app.W010")
        )
    return messages


#: Database vendors the runs' tables may live on. The agent's writes are ``UPDATE … RETURNING`` (one
#: statement each) and the sweep locks with ``SELECT … FOR UPDATE SKIP LOCKED``: MySQL and MariaDB have
#: no ``UPDATE … RETURNING``, Oracle returns only ``INTO`` variables.
SUPPORTED_DATABASE_VENDORS = ("postgresql", "sqlite")
#: ``UPDATE … RETURNING`` came with SQLite 3.35.
SQLITE_MIN_VERSION = (3, 35)


def check_database(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The databases holding supervisor_app's tables (as the routers send them) must be ones the
    agent's writes work on (E030-E032, W030). Reads settings only: no connection is opened."""
    from django.apps import apps
    from django.db import connections, router

    aliases: set[str] = set()
    for model in apps.get_app_config("supervisor_app").get_models():
        aliases.update(alias for alias in (router.db_for_write(model), router.db_for_read(model)) if alias)
    messages: list[CheckMessage] = []
    for alias in sorted(aliases):
        messages.extend(database_messages(alias, connections[alias]))
    return messages


def database_messages(alias: str, conn: Any) -> list[CheckMessage]:
    """What is wrong with database ``alias`` (a Django connection, not necessarily connected)."""
    db = conn.settings_dict
    if conn.vendor not in SUPPORTED_DATABASE_VENDORS:
        return [
            Error(
                f"DATABASES[{alias!r}] ({db.get('ENGINE')}, vendor {conn.vendor!r}) holds supervisor_app's tables, "
                "but only PostgreSQL and SQLite are supported: the agent's writes are UPDATE ... RETURNING "
                "statements and the sweep locks rows with SELECT ... FOR UPDATE SKIP LOCKED.",
                hint="Keep supervisor_app's models on a PostgreSQL database (a database router can send them "
                "there while the rest of the project stays where it is).",
                id="supervisor_app.E030",
            )
        ]
    messages: list[CheckMessage] = []
    if db.get("AUTOCOMMIT", True) is False:
        messages.append(
            Error(
                f"DATABASES[{alias!r}]['AUTOCOMMIT'] is False: no claim, lease renewal or finish of an agent "
                "would ever commit (nor the sweep's transactions), so every run would look lost.",
                hint="Remove AUTOCOMMIT (Django's default, True) for the database of supervisor_app's tables.",
                id="supervisor_app.E031",
            )
        )
    if conn.vendor == "sqlite":
        version = tuple(conn.Database.sqlite_version_info)
        if version < SQLITE_MIN_VERSION:
            messages.append(
                Error(
                    f"DATABASES[{alias!r}] runs SQLite {'.'.join(map(str, version))}; supervisor_app needs "
                    f"{'.'.join(map(str, SQLITE_MIN_VERSION))} or newer (UPDATE ... RETURNING).",
                    id="supervisor_app.E032",
                )
            )
    options = db.get("OPTIONS") or {}
    if (
        conn.vendor == "postgresql"
        and db.get("DISABLE_SERVER_SIDE_CURSORS")
        and options.get("server_side_binding")
        and options.get("prepare_threshold") is not None
    ):
        messages.append(
            Warning(
                f"DATABASES[{alias!r}] disables server-side cursors (as for a pooler in transaction mode, such as "
                "PgBouncer) and has psycopg prepare named statements (server_side_binding with prepare_threshold "
                f"{options['prepare_threshold']!r}). A transaction-mode PgBouncer before 1.21, or without "
                "max_prepared_statements, hands each transaction to any server connection: statements then fail at "
                'random ("prepared statement "_pg3_0" already exists" with PgBouncer 1.18), the agent\'s claims '
                "and lease renewals among them.",
                hint="Behind a transaction pooler, leave prepare_threshold unset (Django's default: None) or bind "
                "client-side (the default); or enable max_prepared_statements on PgBouncer 1.21+.",
                id="supervisor_app.W030",
            )
        )
    return messages
