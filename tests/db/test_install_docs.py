"""The install instructions tell the truth: README and quickstart share one settings block, name the
extras pyproject defines, and do not send users to a public index the package is not on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def settings_block(path: Path) -> str:
    text = path.read_text()
    match = re.search(r"```python\n(# settings\.py\n.*?)```", text, re.S)
    assert match, f"{path.name} has no settings.py block"
    return match.group(1)


def test_readme_and_quickstart_settings_blocks_agree() -> None:
    assert settings_block(ROOT / "README.md") == settings_block(ROOT / "docs" / "quickstart.md")


def test_install_lines_use_a_checkout_or_a_wheel_with_the_defined_extras() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; we support 3.10)
    section = pyproject.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    assert extras == {"postgres", "metrics", "redis"}
    for path in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        text = path.read_text()
        assert "pip install supervisor-app" not in text and 'pip install "supervisor-app' not in text, path.name
        assert ".whl[" in text and "pip wheel" in text, path.name
        for extra in extras:
            assert f"| `{extra}` |" in text, (path.name, extra)
