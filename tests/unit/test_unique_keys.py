"""Unique-run keys (``supervisor_app.core.unique``), without a database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from supervisor_app.core.unique import (
    HASHED,
    MAX_KEY_LENGTH,
    UniqueKeyError,
    arguments_key,
    canonical_json,
    chosen_arguments,
    given_key,
    window_seconds,
)


def report(customer: int, kind: str = "daily", *, fmt: str = "pdf") -> None: ...


def spread(source: str, *items: Any, **options: Any) -> None: ...


def test_a_name_is_found_whether_passed_by_position_keyword_or_default() -> None:
    key = arguments_key(report, ("customer",), [7], {})
    assert key == arguments_key(report, ("customer",), [], {"customer": 7})
    assert key == arguments_key(report, ("customer",), [7, "weekly"], {"fmt": "csv"})
    assert key != arguments_key(report, ("customer",), [8], {})
    assert arguments_key(report, ("kind",), [1], {}) == arguments_key(report, ("kind",), [2, "daily"], {})


def test_args_takes_every_argument_defaults_included() -> None:
    key = arguments_key(report, "args", [7], {})
    assert key == arguments_key(report, "args", [], {"customer": 7, "kind": "daily", "fmt": "pdf"})
    assert key != arguments_key(report, "args", [7], {"fmt": "csv"})
    assert chosen_arguments(spread, "args", ["a", 1, 2], {"x": 1}) == {
        "source": "a",
        "items": [1, 2],
        "options": {"x": 1},
    }


def test_values_are_json_normalised() -> None:
    def f(value: Any) -> None: ...

    # Object keys in any order, tuples as lists: one key. 1 and 1.0 are different JSON.
    assert arguments_key(f, "args", [{"b": 1, "a": [1, 2]}], {}) == arguments_key(
        f, "args", [{"a": (1, 2), "b": 1}], {}
    )
    assert arguments_key(f, "args", [1], {}) != arguments_key(f, "args", [1.0], {})
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    with pytest.raises(UniqueKeyError, match="JSON"):
        arguments_key(f, "args", [float("nan")], {})


def test_names_in_kwargs_of_a_function_that_takes_them() -> None:
    assert chosen_arguments(spread, ("tenant",), ["a"], {"tenant": 3}) == {"tenant": 3}
    assert chosen_arguments(spread, ("tenant",), ["a"], {}) == {}  # not given: left out
    with pytest.raises(UniqueKeyError, match="names"):
        chosen_arguments(report, ("tenant",), [1], {})
    with pytest.raises(UniqueKeyError, match="does not fit"):
        chosen_arguments(report, ("customer",), [], {})


def test_keys_are_bounded_and_hashed_ones_cannot_be_given() -> None:
    derived = arguments_key(report, "args", ["x" * 10_000], {})
    assert derived.startswith(HASHED) and len(derived) == len(HASHED) + 64 <= MAX_KEY_LENGTH
    assert given_key("nightly-import") == "nightly-import"
    assert given_key("k" * MAX_KEY_LENGTH) == "k" * MAX_KEY_LENGTH
    long = given_key("k" * (MAX_KEY_LENGTH + 1))
    assert long.startswith(HASHED) and len(long) <= MAX_KEY_LENGTH
    assert given_key(derived) != derived
    for wrong in ("", None, 7):
        with pytest.raises(UniqueKeyError):
            given_key(wrong)


def test_windows() -> None:
    assert window_seconds(None) is None and window_seconds(0) is None
    assert window_seconds(90) == 90.0 == window_seconds(timedelta(minutes=1, seconds=30))
    with pytest.raises(ValueError):
        window_seconds(-1)
