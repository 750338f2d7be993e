"""Keep the README honest: its settings table is the settings table of the code."""

from __future__ import annotations

from pathlib import Path

from supervisor_app.conf import SETTINGS

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def settings_table() -> str:
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for name, spec in SETTINGS.items():
        rows.append(f"| `SUPERVISOR_{name}` | `{spec.default!r}` | {spec.doc} |")
    return "\n".join(rows)


def test_readme_settings_table_matches_the_code() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table")
    start = text.index("\n", start) + 1
    end = text.index("<!-- /settings-table -->")
    assert text[start:end].strip() == settings_table(), (
        "README settings table is out of date; regenerate it with:\n"
        "python -c 'from tests.db.test_readme import settings_table; print(settings_table())'"
    )


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"
