"""The scenario table: each fault scenario records what happened and whether the invariants held.

Rows are kept in ``test-artifacts/faults.json`` (one per scenario, the latest run wins) and rendered
to ``test-artifacts/faults.md``, the table pasted into the README.
"""

from __future__ import annotations

import json
from pathlib import Path

from .invariants import Verdict

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


def record(scenario: str, happened: str, verdict: Verdict | None, held: bool | None = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store = ARTIFACTS / "faults.json"
    rows: dict[str, dict[str, str]] = json.loads(store.read_text()) if store.exists() else {}
    ok = verdict.ok if verdict is not None else bool(held)
    outcome = verdict.summary() if verdict is not None else ""
    rows[scenario] = {
        "happened": happened + (f" ({outcome})" if outcome else ""),
        "held": "yes" if ok else "NO: " + "; ".join((verdict.violations if verdict else [])[:3]),
    }
    store.write_text(json.dumps(rows, indent=1))
    lines = ["| scenario | what happened | invariants held |", "| --- | --- | --- |"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['happened']} | {row['held']} |")
    (ARTIFACTS / "faults.md").write_text("\n".join(lines) + "\n")
