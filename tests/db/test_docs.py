"""Keep the documentation honest: examples compile, settings exist, links resolve, the diagram
is drawn from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from supervisor_app.conf import SETTINGS
from supervisor_app.core.states import RunStatus

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_there_is_documentation() -> None:
    names = {p.name for p in DOCS}
    assert {"quickstart.md", "operations.md", "comparison.md"} <= names
    assert (ROOT / "CHANGELOG.md").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_compile(page: Path) -> None:
    blocks = code_blocks(page.read_text(), "python")
    for block in blocks:
        ast.parse(block, filename=page.name)
    if page.name in ("README.md", "quickstart.md"):
        assert blocks, f"{page.name} should show code"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_setting_named_exists(page: Path) -> None:
    unknown = []
    for name, star in re.findall(r"\bSUPERVISOR_([A-Z0-9_]*[A-Z0-9])(_?\*)?", page.read_text()):
        if star:  # SUPERVISOR_ALERT_* or SUPERVISOR_BACKOFF*: a family of settings
            if not any(s.startswith(name) for s in SETTINGS):
                unknown.append(f"SUPERVISOR_{name}*")
        elif name not in SETTINGS:
            unknown.append(f"SUPERVISOR_{name}")
    # Environment variables of the demo project and the test suite, not settings of the app.
    unknown = [u for u in unknown if u not in ("SUPERVISOR_LOG_LEVEL", "SUPERVISOR_TEST_REDIS_URL")]
    assert not unknown, f"{page.name} names settings that supervisor_app.conf.SETTINGS does not have: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page: Path) -> None:
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_state_diagram_covers_every_status_and_is_committed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import runpy

    module = runpy.run_path(str(ROOT / "docs" / "make_state_diagram.py"), run_name="diagram")
    assert set(module["POSITIONS"]) == {s.value for s in RunStatus}
    out = tmp_path / "states.png"
    module["draw"](out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ROOT / "docs" / "img" / "states.png").exists()
    assert "docs/img/states.png" in (ROOT / "README.md").read_text()


def test_layer_diagram_in_the_readme_is_drawn_from_the_code(tmp_path: Path) -> None:
    import runpy

    module = runpy.run_path(str(ROOT / "docs" / "make_layer_diagram.py"), run_name="diagram")
    text = (ROOT / "README.md").read_text()
    start = text.index("\n", text.index("<!-- layers:")) + 1
    block = text[start : text.index("<!-- /layers -->")]
    assert block.strip() == f"```text\n{module['text']()}\n```", (
        "README layer diagram is out of date; regenerate it with: python docs/make_layer_diagram.py --text"
    )
    # Every component of the contract is drawn, and the picture is committed.
    assert {c for layer in module["layers"]() for c in layer} >= {"core", "runs", "worker", "supervisor", "admin"}
    pytest.importorskip("matplotlib")
    out = tmp_path / "layers.png"
    module["draw"](out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ROOT / "docs" / "img" / "layers.png").exists()
