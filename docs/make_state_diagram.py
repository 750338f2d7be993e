"""Draw docs/img/states.png from the TRANSITIONS table of supervisor_app.core.states (drawn from its MOVES).

Run from the repository root: ``python docs/make_state_diagram.py``. The edges and their labels come
from the code, so the picture cannot drift from the state machine; only the layout (positions) is
chosen here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor_app.core.states import MOVES, TERMINAL_STATUSES, TRANSITIONS, RunStatus  # noqa: E402

#: Layout only: where each status is drawn (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    RunStatus.QUEUED: (1.0, 3.0),
    RunStatus.WAITING: (0.9, 1.4),
    RunStatus.RUNNING: (4.0, 3.0),
    RunStatus.RETRYING: (4.0, 5.0),
    RunStatus.SUCCEEDED: (7.4, 4.6),
    RunStatus.FAILED: (7.4, 3.0),
    RunStatus.DEAD: (7.4, 1.4),
    RunStatus.CANCELLED: (5.3, 0.4),
    RunStatus.MISSED: (2.7, 0.4),
    RunStatus.SKIPPED: (1.0, 5.2),
}

#: Why each move happens: the label of the first move (in ``MOVES`` order) that makes the edge.
LABELS: dict[tuple[str, str], str] = {}
for _move in MOVES:
    for _source in _move.sources:
        if _move.label and (_source, _move.target) not in LABELS:
            LABELS[(_source, _move.target)] = _move.label

TERMINAL_COLOUR = "#e8eef7"
ACTIVE_COLOUR = "#fff3d6"


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 6.4), dpi=110)
    ax.set_xlim(-0.2, 8.8)
    ax.set_ylim(-0.3, 6.2)
    ax.axis("off")
    boxes = {}
    for status in RunStatus:
        x, y = POSITIONS[status.value]
        colour = TERMINAL_COLOUR if status.value in TERMINAL_STATUSES else ACTIVE_COLOUR
        boxes[status.value] = FancyBboxPatch(
            (x - 0.7, y - 0.28), 1.4, 0.56, boxstyle="round,pad=0.05", fc=colour, ec="#333333", lw=1.2, zorder=2
        )
        ax.add_patch(boxes[status.value])
        ax.text(x, y, status.value, ha="center", va="center", fontsize=11, zorder=3, family="DejaVu Sans")
    for source, targets in TRANSITIONS.items():
        for target in sorted(targets):
            x1, y1 = POSITIONS[source]
            x2, y2 = POSITIONS[target]
            label = LABELS.get((source, target), "")
            if source == target:
                ax.annotate(
                    "",
                    xy=(x1 + 0.35, y1 + 0.33),
                    xytext=(x1 - 0.35, y1 + 0.33),
                    arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=-1.2", "color": "#555555"},
                )
                ax.text(x1, y1 + 0.85, label, ha="center", fontsize=8, color="#555555")
                continue
            back = (target, source) in {(s, t) for s, ts in TRANSITIONS.items() for t in ts}
            rad = 0.25 if back else 0.08
            arrow = FancyArrowPatch(
                (x1, y1),
                (x2, y2),
                arrowstyle="-|>",
                mutation_scale=13,
                connectionstyle=f"arc3,rad={rad}",
                patchA=boxes[source],
                patchB=boxes[target],
                shrinkA=2,
                shrinkB=2,
                color="#444444",
                lw=1.0,
                zorder=3,
            )
            ax.add_patch(arrow)
            if label:
                mx, my = (x1 + x2) / 2, (y1 + y2) / 2
                # Nudge the label to the side the arc bends to.
                dx, dy = x2 - x1, y2 - y1
                mx, my = mx + rad * dy * 0.9, my - rad * dx * 0.9
                ax.text(mx, my, label, ha="center", va="center", fontsize=8, color="#1f3b73",
                        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})  # fmt: skip
    ax.text(
        0.0,
        -0.2,
        "yellow: active (watched by the supervisor)   blue: terminal   "
        "skipped is recorded directly by the overlap policy",
        fontsize=8,
        color="#555555",
    )
    ax.set_title("supervisor_app: run states (from supervisor_app.core.states.TRANSITIONS)", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "states.png"
    draw(out)
    print(f"wrote {out}")
