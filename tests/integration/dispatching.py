"""A dispatching process for tests/integration/test_drivers.py: runs are dispatched from inside a
Django request, as a web project does. With ``ATOMIC_REQUESTS`` the request is one transaction: the
runs are recorded in it and published when it commits, and a request that fails after dispatching
leaves no run and publishes nothing.

``python -m tests.integration.dispatching '<json list of [steps, step_seconds, label]>'`` (settings
from the environment, as for a worker) makes two requests, one that succeeds and one that raises
after dispatching the same runs, and prints a JSON report as its last line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import path

#: Run ids dispatched by the last request, whether it committed or not.
DISPATCHED: list[int] = []


def dispatch(request: HttpRequest) -> JsonResponse:
    from django.db import connection

    from project.tasks import driver_job

    DISPATCHED.clear()
    for steps, step_seconds, label in json.loads(request.POST["runs"]):
        DISPATCHED.append(driver_job.delay(steps, step_seconds, label).run_id)
    if request.POST.get("fail"):
        raise RuntimeError("the request fails after dispatching")
    return JsonResponse({"run_ids": DISPATCHED, "in_atomic_block": connection.in_atomic_block})


urlpatterns = [path("dispatch/", dispatch)]


def main(runs: str) -> dict[str, Any]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import connection
    from django.test import Client
    from django.test.utils import override_settings

    with override_settings(ROOT_URLCONF=__name__):
        client = Client(raise_request_exception=False)
        ok = client.post("/dispatch/", {"runs": runs})
        assert ok.status_code == 200, ok.content
        failed = client.post("/dispatch/", {"runs": runs, "fail": "1"})
    return {
        **ok.json(),
        "rolled_back": list(DISPATCHED),
        "failed_status": failed.status_code,
        "driver": getattr(connection, "Database").__name__,  # noqa: B009 (not in the stubs)
        "atomic_requests": connection.settings_dict["ATOMIC_REQUESTS"],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
