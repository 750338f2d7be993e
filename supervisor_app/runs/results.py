"""How a run's return value is stored (``SupervisedRun.result``) and read back."""

from __future__ import annotations

import logging
from typing import Any

from ..conf import supervisor_settings
from ..core.errors import RunFailed

logger = logging.getLogger("supervisor_app")


def encode_result(task_name: str, value: Any) -> str | None:
    """A return value as the JSON text stored with its run (kombu's JSON, as Celery's result
    backends write it: datetimes, UUIDs and decimals survive). None for None, and for a value that
    can't be stored (not JSON, or over ``SUPERVISOR_MAX_RESULT_BYTES``), with a warning."""
    if value is None:
        return None
    from kombu.utils.json import dumps

    try:
        text = str(dumps(value))
    except (TypeError, ValueError) as exc:
        logger.warning("%s returned a value that is not JSON (%s); its run stores None", task_name, exc)
        return None
    limit = supervisor_settings.MAX_RESULT_BYTES
    if limit is not None and len(text.encode()) > limit:
        logger.warning(
            "%s returned %d bytes of JSON, over SUPERVISOR_MAX_RESULT_BYTES (%s); its run stores None",
            task_name,
            len(text.encode()),
            limit,
        )
        return None
    return text


def decode_result(value: Any) -> Any:
    """A stored result as the task returned it (the JSON column holds kombu's encoding)."""
    if value is None:
        return None
    from kombu.utils.json import dumps, loads

    # The column's JSON came back as Python values; kombu's type markers are decoded on a round trip.
    return loads(dumps(value))


def final_error(task_name: str, run_id: int, status: str, last_error: str) -> RunFailed:
    """The error a run that did not succeed ends with, as its handle raises it and a result backend
    stores it when no task code raised one."""
    return RunFailed(f"{task_name} run {run_id} {status}: {last_error or 'no error recorded'}")
