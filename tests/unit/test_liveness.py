"""Every run has a way out (issue 13): the liveness table covers every non-terminal status with a
deadline the sweep acts on and a bound, the README shows that very table, and the arithmetic on
counters that grow for ever is bounded. No database."""

from __future__ import annotations

from pathlib import Path

from supervisor_app.core.retry import (
    MAX_EXPONENT,
    RetryPolicy,
    never_started,
    republish_delay,
)
from supervisor_app.core.states import ACTIVE_STATUSES, LIVENESS, NEVER_STARTED, TERMINAL_STATUSES, RunStatus

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def liveness_table() -> str:
    rows = ["| status | the sweep acts on | what it does | way out |", "| --- | --- | --- | --- |"]
    for w in LIVENESS:
        rows.append(f"| `{w.status}` | `{w.column}` | {w.action} | {w.bound} |")
    return "\n".join(rows)


def test_every_non_terminal_status_has_a_watched_column_and_a_bound() -> None:
    assert {w.status for w in LIVENESS} == set(ACTIVE_STATUSES)
    assert all(w.column and w.action and w.bound for w in LIVENESS)
    # A queued run is watched whether or not it has a next check (a held queue_one run has none).
    assert {w.column for w in LIVENESS if w.status == RunStatus.QUEUED} == {"next_check_at", "next_check_at IS NULL"}


def test_a_run_nobody_takes_ends_in_a_terminal_state() -> None:
    assert NEVER_STARTED.sources == {RunStatus.QUEUED} and NEVER_STARTED.target in TERMINAL_STATUSES
    assert not never_started(19, 20) and never_started(20, 20)


def test_the_readme_liveness_table_is_the_code_s() -> None:
    text = README.read_text()
    start = text.index("\n", text.index("<!-- liveness-table")) + 1
    block = text[start : text.index("<!-- /liveness-table -->")]
    assert block.strip() == liveness_table(), (
        "README liveness table is out of date; regenerate it with:\n"
        "python -c 'from tests.unit.test_liveness import liveness_table; print(liveness_table())'"
    )
    # Next to the state diagram.
    assert 0 < start - text.index("docs/img/states.png") < 1500


def test_backoff_arithmetic_is_bounded_however_large_the_counter() -> None:
    # A week of republishing every 10 minutes is ~1,000 publishes: 60 * 2**1007 overflowed a float.
    assert republish_delay(60.0, 1_008) == 600.0
    assert republish_delay(60.0, 2**31) == 600.0
    assert republish_delay(60.0, 1) == 60.0 and republish_delay(60.0, 2) == 120.0
    policy = RetryPolicy(max_attempts=10**6, backoff=2.0, backoff_max=3600.0, jitter=False)
    assert policy.delay(5_000) == 3600.0
    assert 2.0 * 2**MAX_EXPONENT < float("inf")
