"""One beat's schedule loads, in a fresh process: the child of bench/run.py's beat-load case.

    python bench/beat_load.py SCHEDULER RELOADS

Reads the schedules already in the database that DATABASE_URL names (bench/run.py creates them and
sets the environment; nothing is written here) as a beat does at start: ``scheduler.schedule`` with
the initial read forced (``all_as_schedule()``), then ``populate_heap()``. Then RELOADS more times in
the same process, as after a PeriodicTask change or the 5-minute full sync (caches warm). Prints one
JSON line: the seconds of each load, and the entries and heap size of the last.

Not part of run.py, whose import drops and recreates the bench database.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    scheduler_path, reloads = sys.argv[1], int(sys.argv[2])
    import django

    django.setup()
    from celery.utils.imports import symbol_by_name

    from project.celery import app

    scheduler = symbol_by_name(scheduler_path)(app=app, lazy=True)
    seconds = []
    for _ in range(1 + reloads):
        t = time.perf_counter()
        scheduler._initial_read = True  # a start; a change or the full sync reads the same way
        entries = scheduler.schedule
        scheduler.populate_heap()
        seconds.append(time.perf_counter() - t)
    print(json.dumps({"seconds": seconds, "entries": len(entries), "heap": len(scheduler._heap)}))


if __name__ == "__main__":
    main()
