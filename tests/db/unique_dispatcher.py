"""One dispatching process of ``test_unique_runs``'s concurrency test.

``python -m tests.db.unique_dispatcher KEYS``: connects, prints ``ready`` and waits for a line on its
standard input (the test sends it to every sibling at once, when all are ready), then dispatches
``send_report(customer)`` for customers ``0 … KEYS-1`` and prints one JSON line:
``[[customer, run id, deduplicated], …]``. The database and broker come from the environment, as for
any process of the project.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    keys = int(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import connection

    from tests.db.unique_tasks import send_report

    connection.ensure_connection()  # connected before the start: the processes race the inserts only
    print("ready", flush=True)
    sys.stdin.readline()
    out = []
    for customer in range(keys):
        result = send_report.delay(customer)
        out.append([customer, result.run_id, result.deduplicated])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
