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


def test_where_it_runs_names_every_driver_case_and_no_other() -> None:
    """The README's driver table and tests/integration/test_drivers.py name the same cases."""
    import re

    from tests.integration.test_drivers import CONFIGS

    text = README.read_text()
    section = text[text.index("## Where it runs") : text.index("**Worker pools.**")]
    last_cells = [line.rstrip(" |").rpartition("|")[2] for line in section.splitlines() if line.startswith("| ")]
    named = {case for cell in last_cells for case in re.findall(r"`((?:psycopg|pgbouncer)[a-z0-9-]*)`", cell)}
    assert named == {config.id for config in CONFIGS}
