"""The state machine's moves and the policy choices: each rule written once, checked without a database."""

from __future__ import annotations

import pytest

from supervisor_app.core.policies import CatchUp, Overlap, parse_choice
from supervisor_app.core.retry import RetryPolicy, decide_failure, decide_lost, has_attempts_left
from supervisor_app.core.states import (
    ACTIVE_STATUSES,
    FAILURE_MOVES,
    LIVENESS,
    MOVES,
    REOPEN,
    TERMINAL_STATUSES,
    TRANSITIONS,
    RunStatus,
    can_transition,
)


def test_every_move_is_a_transition_of_the_diagram_except_reopening_a_terminal_run() -> None:
    for move in MOVES:
        for source in move.sources:
            if source in TERMINAL_STATUSES:
                assert move is REOPEN
            else:
                assert can_transition(source, move.target), move.name


def test_the_transitions_are_exactly_those_of_the_moves() -> None:
    # Edges the code never made (retrying -> dead) are gone from the diagram; queued -> dead is a
    # run no worker ever started (NEVER_STARTED).
    assert can_transition(RunStatus.QUEUED, RunStatus.DEAD)
    assert not can_transition(RunStatus.RETRYING, RunStatus.DEAD)
    assert set(TRANSITIONS) == set(ACTIVE_STATUSES)


def test_move_names_are_unique_and_single_source_moves_say_so() -> None:
    assert len({m.name for m in MOVES}) == len(MOVES)
    assert REOPEN.sources == {s.value for s in RunStatus} - {RunStatus.RUNNING}
    with pytest.raises(ValueError, match="source statuses"):
        _ = REOPEN.source


def test_a_failure_decision_maps_to_one_move_per_status() -> None:
    policy = RetryPolicy(max_attempts=2, backoff=1.0, backoff_max=1.0, jitter=False)
    for attempt, exc in ((1, ValueError()), (2, ValueError()), (1, TypeError())):
        decision = decide_failure(policy, attempt, exc)
        assert FAILURE_MOVES[decision.status].sources == {RunStatus.RUNNING}


def test_the_last_attempt_rule_is_one_rule() -> None:
    assert has_attempts_left(1, 3) and has_attempts_left(2, 3) and not has_attempts_left(3, 3)
    assert not has_attempts_left(4, 3)  # an operator's retry_now can go past max_attempts
    policy = RetryPolicy(max_attempts=3, backoff=1.0, backoff_max=1.0, jitter=False)
    for attempt in (1, 2, 3, 4):
        lost_requeued = decide_lost(attempt, 3) == RunStatus.QUEUED
        error_retried = decide_failure(policy, attempt, ValueError()).status == RunStatus.RETRYING
        assert lost_requeued is error_retried is has_attempts_left(attempt, 3)


def test_every_active_status_has_a_deadline_the_sweep_acts_on() -> None:
    assert {w.status for w in LIVENESS} == set(ACTIVE_STATUSES)


@pytest.mark.parametrize(
    ("choices", "value", "ok"),
    [
        (Overlap, "skip", True),
        (Overlap, "Skip", False),  # was read as `replace`: it cancelled the active runs
        (Overlap, " skip", False),
        (Overlap, None, False),
        (Overlap, 1, False),
        (CatchUp, "all", True),
        (CatchUp, "ALL", False),
        (CatchUp, "", False),
    ],
)
def test_policy_choices_are_parsed_exactly(choices: type, value: object, ok: bool) -> None:
    if ok:
        assert parse_choice(choices, value, "X") == value
    else:
        with pytest.raises(ValueError, match=r"X must be one of .*got"):
            parse_choice(choices, value, "X")
