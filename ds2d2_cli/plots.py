"""Pictures people would rather look at than read: detections side by side, training curves.

matplotlib with the non-interactive Agg backend (no display needed); every figure is
written atomically as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.fileio import atomic_path
from ds2d2_cli.metrics_log import LOG_FILE, MetricsLog

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


def _draw_boxes(ax, detections: Sequence[dict[str, Any]], linewidth: float = 1.0, linestyle: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for det in detections:
        x, y, w, h = det["bbox"]
        colour = PALETTE[(det["category_id"] - 1) % len(PALETTE)]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=linewidth, linestyle=linestyle))


def detections_side_by_side(image: np.ndarray, panels: dict[str, Sequence[dict[str, Any]]],
                            class_names: Sequence[str], out: str | Path, *, suptitle: str | None = None) -> Path:
    """One scene, one panel per box set (ground truth, then each model), titled by the caller.

    Boxes flagged `hit: False` (false alarms) are drawn dashed, so hits and false alarms
    read apart at a glance; colours are classes.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.9))
    axes = np.atleast_1d(axes)
    for ax, (title, detections) in zip(axes, panels.items()):
        ax.imshow(image)
        _draw_boxes(ax, [d for d in detections if d.get("hit", True)], linewidth=1.2)
        _draw_boxes(ax, [d for d in detections if not d.get("hit", True)], linewidth=1.0, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    handles = [Patch(edgecolor=PALETTE[i % len(PALETTE)], facecolor="none", label=n) for i, n in enumerate(class_names)]
    handles.append(Patch(edgecolor="#636366", facecolor="none", linestyle="--", label="false alarm (dashed)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
    return _save(fig, Path(out))


DETECTION_TERMS = ("classification", "bbox_regression", "loss_objectness", "loss_rpn_box_reg",
                   "loss_classifier", "loss_box_reg")


def _smooth(values: list[float], window: int = 5) -> np.ndarray:
    """Trailing moving average: detection losses of small batches are noisy."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < window:
        return array
    kernel = np.ones(window) / window
    head = np.array([array[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(array, kernel, mode="valid")])


def training_curves(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Per run: the detection loss (what every student shares), the distillation terms, eval AP50 when logged."""
    plt = _pyplot()
    logs = {label: MetricsLog.read(Path(run) / LOG_FILE) for label, run in runs.items()}
    extra_terms = {label: sorted({k for s in steps for k in s} - set(DETECTION_TERMS)
                                 - {"iter", "epoch", "lr", "loss", "images_per_s"})
                   for label, (steps, _) in logs.items()}
    has_extra = any(extra_terms.values())
    has_evals = any(evals for _, evals in logs.values())
    panels = 1 + has_extra + has_evals
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    axes = list(np.atleast_1d(axes))
    ax_det = axes.pop(0)
    ax_kd = axes.pop(0) if has_extra else None
    ax_map = axes.pop(0) if has_evals else None
    term_lines = 0  # one colour per distillation-term line across all runs
    for i, (label, (steps, evals)) in enumerate(logs.items()):
        colour = PALETTE[i % len(PALETTE)]
        iters = [s["iter"] for s in steps]
        detection = [sum(s.get(k, 0.0) for k in DETECTION_TERMS) for s in steps]
        ax_det.plot(iters, _smooth(detection), color=colour, label=label)
        for term in extra_terms[label]:
            term_lines += 1
            ax_kd.plot(iters, _smooth([s.get(term, 0.0) for s in steps]), color=PALETTE[term_lines % len(PALETTE)],
                       label=f"{label}: {term}")
        if evals and ax_map is not None:
            ax_map.plot([e["iter"] for e in evals], [100 * e["eval"]["AP50"] for e in evals], marker="o",
                        color=colour, label=label)
    ax_det.set(xlabel="iteration", ylabel="loss (moving average of 5 logs)", title="detection loss")
    ax_det.legend(fontsize=8)
    if ax_kd is not None:
        ax_kd.set(xlabel="iteration", ylabel="weighted loss term", title="distillation terms", yscale="log")
        ax_kd.legend(fontsize=7)
    if ax_map is not None:
        ax_map.set(xlabel="iteration", ylabel="AP50 (%)", title="evaluation during training")
        ax_map.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(out))


def paired_gain_chart(record: dict[str, Any], out: str | Path, metric: str = "AP50") -> Path:
    """`ds2d2 study`'s picture: per method the paired gain vs none, its 95% interval, the seeds as dots."""
    plt = _pyplot()
    rows = [(name, entry["gain"][metric]) for name, entry in record["table"].items()
            if entry.get("gain") and entry["gain"][metric]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * max(len(rows), 1) + 1.4))
    ax.axvline(0.0, color="#8e8e93", linewidth=1.0, zorder=1)
    for y, (name, gain) in enumerate(rows):
        colour = PALETTE[2] if gain["distinguishable"] else "#636366"
        if gain.get("ci95"):
            low, high = gain["ci95"]
            ax.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt", zorder=2)
        ax.plot([gain["mean"]], [y], marker="D", color=colour, markersize=7, zorder=3)
        dots = list(gain["per_seed"].values())
        ax.scatter(dots, [y + 0.18] * len(dots), s=16, color="#ff9f0a", zorder=4,
                   label="one seed" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [record["table"][name]["label"] for name, _ in rows])
    ax.invert_yaxis()
    seeds = ",".join(map(str, record["seeds"]))
    ax.set_xlabel(f"{metric} gain over the undistilled student (points), paired by seed")
    ax.set_title(f"{metric} gain vs none, mean and 95% t-interval over seeds {seeds}\n"
                 "(blue: interval excludes zero)", fontsize=10)
    if rows:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, Path(out))
