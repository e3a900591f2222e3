"""Pictures people would rather look at than read: detections side by side, training curves.

matplotlib with the non-interactive Agg backend (no display needed); every figure is
written atomically as PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.fileio import atomic_path

# A qualitative palette that stays readable on busy aerial backgrounds.
PALETTE = ("#ff3b30", "#34c759", "#0a84ff", "#ffd60a", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f",
           "#30d158", "#5e5ce6", "#ffcc00", "#ac8e68", "#00c7be", "#ff6482", "#a2845e", "#8e8e93")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _draw_boxes(ax, detections: Sequence[dict[str, Any]], linewidth: float = 1.0) -> None:
    from matplotlib.patches import Rectangle

    for det in detections:
        x, y, w, h = det["bbox"]
        colour = PALETTE[(det["category_id"] - 1) % len(PALETTE)]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=linewidth))


def detections_side_by_side(image: np.ndarray, panels: dict[str, Sequence[dict[str, Any]]],
                            class_names: Sequence[str], out: str | Path, *, score_thr: float = 0.3) -> Path:
    """One scene, one panel per detection set (e.g. ground truth, baseline, DS2D2)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6))
    axes = np.atleast_1d(axes)
    for ax, (title, detections) in zip(axes, panels.items()):
        kept = [d for d in detections if d.get("score", 1.0) >= score_thr]
        ax.imshow(image)
        _draw_boxes(ax, kept)
        ax.set_title(f"{title} ({len(kept)} boxes)")
        ax.axis("off")
    handles = [Patch(edgecolor=PALETTE[i % len(PALETTE)], facecolor="none", label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(f"detections with score >= {score_thr}")
    return _save(fig, Path(out))


def read_metrics_log(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training steps, evaluations) from a run's metrics.jsonl."""
    steps, evals = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        (evals if "eval" in record else steps).append(record)
    return steps, evals


DETECTION_TERMS = ("classification", "bbox_regression", "loss_objectness", "loss_rpn_box_reg",
                   "loss_classifier", "loss_box_reg")


def training_curves(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Detection loss (the part both students share) and total loss per run, plus eval mAP when logged."""
    plt = _pyplot()
    fig, (ax_det, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, run) in enumerate(runs.items()):
        steps, evals = read_metrics_log(Path(run) / "metrics.jsonl")
        colour = PALETTE[i % len(PALETTE)]
        iters = [s["iter"] for s in steps]
        detection = [sum(s.get(k, 0.0) for k in DETECTION_TERMS) for s in steps]
        ax_det.plot(iters, detection, color=colour, label=f"{label}: detection loss")
        total = [s["loss"] for s in steps]
        if any(abs(t - d) > 1e-9 for t, d in zip(total, detection)):
            ax_det.plot(iters, total, color=colour, linestyle="--", alpha=0.7, label=f"{label}: total loss")
        if evals:
            ax_map.plot([e["iter"] for e in evals], [100 * e["eval"]["AP50"] for e in evals], marker="o",
                        color=colour, label=label)
    ax_det.set_xlabel("iteration")
    ax_det.set_ylabel("loss")
    ax_det.legend(fontsize=8)
    ax_det.set_title("training loss")
    ax_map.set_xlabel("iteration")
    ax_map.set_ylabel("AP50 (%) on held-out patches")
    ax_map.set_title("evaluation during training")
    if ax_map.has_data():
        ax_map.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(out))
