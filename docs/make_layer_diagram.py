"""Draw the layers of supervisor_app from the code: docs/img/layers.png and the README's text diagram.

Run from the repository root: ``python docs/make_layer_diagram.py`` (``--text`` prints the README
block only). The layers are import-linter's contract in pyproject.toml (which ``make lint`` checks);
the arrows are the imports grimp finds in the package, counting imports inside functions; the
descriptions are the first line of each module's docstring. Only the layout is chosen here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGE = "supervisor_app"
#: Names of the layers, top to bottom (the contract lists only modules).
LAYER_NAMES = ["edges", "sweep", "processes", "agent", "domain", "storage", "core"]


def layers() -> list[list[str]]:
    """The layers of the contract, each a list of component names (top first)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [contract] = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in re.split(r"[|:]", layer)] for layer in contract["layers"]]


def summary(component: str) -> str:
    """The first line of the component's docstring (its package ``__init__`` or its module)."""
    base = ROOT / PACKAGE / component
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0].rstrip(".:") if doc.strip() else ""


def dependencies() -> dict[str, set[str]]:
    """For each component, the other components its modules import (TYPE_CHECKING imports aside)."""
    import grimp

    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)
    names = {c for layer in layers() for c in layer}

    def component(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in names else None

    deps: dict[str, set[str]] = {name: set() for name in names}
    for module in graph.modules:
        source = component(module)
        if source is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            target = component(imported)
            if target is not None and target != source:
                deps[source].add(target)
    return deps


def text() -> str:
    """The README block: one row per layer, then what each component is and imports."""
    rows = []
    all_layers = layers()
    width = max(len(n) for n in LAYER_NAMES)
    for i, layer in enumerate(all_layers):
        if i:
            rows.append(" " * (width + 2) + "↓")
        rows.append(f"{LAYER_NAMES[i]:<{width}}  " + "   ".join(layer))
    deps = dependencies()
    order = [c for layer in all_layers for c in layer]
    pad = max(len(c) for c in order)
    rows.append("")
    for name in order:
        uses = ", ".join(c for c in order if c in deps[name]) or "—"
        rows.append(f"{name:<{pad}}  {summary(name)}")
        rows.append(f"{'':<{pad}}  imports {uses}")
    return "\n".join(rows)


def draw(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    all_layers = layers()
    deps = dependencies()
    fig, ax = plt.subplots(figsize=(12, 7.6), dpi=100)
    ax.set_xlim(-1.6, 10.2)
    ax.set_ylim(-0.6, len(all_layers) * 1.1)
    ax.axis("off")
    centres: dict[str, tuple[float, float]] = {}
    boxes = {}
    for i, layer in enumerate(all_layers):
        y = (len(all_layers) - 1 - i) * 1.1
        ax.text(-1.5, y, LAYER_NAMES[i], va="center", fontsize=10, color="#555555", style="italic")
        step = 10.0 / len(layer)
        for j, name in enumerate(layer):
            x = step * (j + 0.5)
            w = min(step - 0.15, 2.0)
            box = FancyBboxPatch(
                (x - w / 2, y - 0.22), w, 0.44, boxstyle="round,pad=0.04", fc="#eef3fa", ec="#333333", zorder=3
            )
            ax.add_patch(box)
            ax.text(x, y, name, ha="center", va="center", fontsize=9 if len(layer) > 6 else 10, zorder=4)
            centres[name], boxes[name] = (x, y), box
    bottom = set(all_layers[-1])
    for source, targets in deps.items():
        # Nearly every module imports the core row: arrows into it would hide the rest.
        for target in targets - bottom:
            arrow = FancyArrowPatch(
                centres[source],
                centres[target],
                arrowstyle="-|>",
                mutation_scale=8,
                patchA=boxes[source],
                patchB=boxes[target],
                connectionstyle=f"arc3,rad={-0.3 if centres[source][1] == centres[target][1] else 0.0}",
                color="#1f3b73",
                alpha=0.35,
                lw=0.8,
                zorder=2,
            )
            ax.add_patch(arrow)
    ax.set_title(
        "supervisor_app: layers (the import-linter contract of pyproject.toml) and the imports between them "
        "(grimp): every arrow points down\n(arrows into the core row are left out: nearly every module imports it)",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    import os

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    if "--text" in sys.argv:
        print(text())
    else:
        out = ROOT / "docs" / "img" / "layers.png"
        draw(out)
        print(f"wrote {out}")
