"""Read several runs side by side: metrics with deltas against a reference run, and charts.

A run is a training run folder (its `summary.json`, written by every training stage,
holds the final evaluation) or the JSON that `ds2d2 eval --json FILE` writes. The first
run is the reference; every other run gets its difference to it, in AP points. This is
how an ablation is read: `ds2d2 compare runs/baseline runs/fitnet runs/ds2d2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ds2d2_cli.errors import InputError
from ds2d2_cli.evaluation import METRIC_KEYS
from ds2d2_cli.fileio import read_json, write_json
from ds2d2_cli.metrics_log import LOG_FILE


@dataclass
class Run:
    """One compared run: where it came from and what it measured."""

    name: str
    path: Path
    metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # method, iterations, seconds, params, ...
    metrics_log: Path | None = None  # metrics.jsonl, for training curves


def count_parameters(checkpoint: Path) -> int | None:
    """Parameters of the model a teacher/student checkpoint builds, counted as `ds2d2 demo` counts
    them (`model.parameters()`; BatchNorm statistics are buffers, not parameters)."""
    if not checkpoint.is_file():
        return None
    from ds2d2_cli.models.detectors import checkpoint_parameter_count

    try:
        return checkpoint_parameter_count(checkpoint)
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the params column
        return None


def load_run(path: str | Path) -> Run:
    """A run folder (summary.json) or an `eval --json` file."""
    path = Path(path)
    if path.is_dir():
        summary_path = path / "summary.json"
        if not summary_path.is_file():
            raise InputError("not a ds2d2 run folder (no summary.json; the run may not have finished)", path)
        summary = read_json(summary_path)
        if not isinstance(summary, dict):
            raise InputError("summary.json is not a JSON object", summary_path)
        metrics = summary.get("metrics") or {}
        if not metrics:
            what = "an amplifier run has no detector to score" if summary.get("stage") == "amplifier" else (
                "it was trained without an evaluation split")
            raise InputError(f"this run has no evaluation metrics ({what}); score its checkpoint with "
                             "`ds2d2 eval CKPT --json FILE` and compare that file", summary_path)
        model = Path(summary.get("model") or path / "model.safetensors")
        if not model.is_file():
            model = path / "model.safetensors"
        info = {
            "stage": summary.get("stage"),
            "method": summary.get("method"),
            "iterations": summary.get("iterations"),
            "train_seconds": summary.get("seconds"),
            "eval_split": summary.get("eval_split"),
            "merged_patches": False,  # training scores its eval split patch by patch
            "params": count_parameters(model),
        }
        log = path / LOG_FILE
        return Run(path.name, path, metrics, info, log if log.is_file() else None)
    if path.suffix == ".json" or path.is_file():
        data = read_json(path)
        if not isinstance(data, dict) or "AP50" not in data:
            raise InputError("not a run folder or an `ds2d2 eval --json` file (no AP50)", path)
        checkpoint = Path(data["checkpoint"]) if data.get("checkpoint") else None
        merged = data.get("merged_patches")
        info = {"stage": data.get("stage"), "eval_split": data.get("split"),
                "merged_patches": merged if isinstance(merged, bool) else None,  # None: not recorded
                "params": count_parameters(checkpoint) if checkpoint else None}
        log = checkpoint.parent / LOG_FILE if checkpoint else None
        return Run(path.stem, path, data, info, log if log is not None and log.is_file() else None)
    raise InputError("not found (give run folders or `ds2d2 eval --json` files)", path)


def _unique_names(runs: list[Run]) -> None:
    """Folder names clash easily (`seed0/ds2d2`, `seed1/ds2d2`): add parents until unique."""
    for depth in range(1, 6):
        names = [r.name for r in runs]
        if len(set(names)) == len(names):
            return
        for run in runs:
            if names.count(run.name) > 1:
                parts = run.path.resolve().parts
                run.name = "/".join(parts[-(depth + 1):])


def _points(value: Any) -> float | None:
    return round(100.0 * value, 2) if isinstance(value, (int, float)) else None


def compare_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of every run in AP points, with deltas to the first run, and per-class AP50.

    Returns {"reference", "runs": [{name, path, metrics, deltas, per_class_AP50,
    per_class_delta, info}], "classes", "warnings"}. Runs scored on different splits or
    class lists, a mix of merged-scene (`eval --merge-patches`) and patch-level scores, or of
    COCO and DOTA Task 1 scores (oriented models), still compare, with a warning: the numbers
    are then not like for like.
    """
    if len(paths) < 2:
        raise InputError("compare needs at least two runs (the first is the reference)")
    runs = [load_run(p) for p in paths]
    if names:
        if len(names) != len(runs):
            raise InputError(f"--name was given {len(names)} times for {len(runs)} runs")
        for run, name in zip(runs, names):
            run.name = name
    _unique_names(runs)
    warnings: list[str] = []
    splits = {r.info.get("eval_split") for r in runs}
    if len(splits) > 1:
        warnings.append(f"the runs were scored on different splits ({', '.join(sorted(map(str, splits)))})")
    merged = [r.name for r in runs if r.info.get("merged_patches") is True]
    per_patch = [r.name for r in runs if r.info.get("merged_patches") is False]
    if merged and per_patch:
        warnings.append(f"the runs mix merged-scene scores ({', '.join(merged)}) with patch-level scores "
                        f"({', '.join(per_patch)})")
    metrics_used: dict[str, list[str]] = {}  # coco_metrics' rows carry no "metric"; Task 1's say dota-task1
    for r in runs:
        metrics_used.setdefault(str(r.metrics.get("metric") or "coco"), []).append(r.name)
    if len(metrics_used) > 1:
        mix = "; ".join(f"{metric}: {', '.join(names)}" for metric, names in metrics_used.items())
        warnings.append(f"the runs mix metrics ({mix}): the numbers are not like for like")
    class_lists = [list((r.metrics.get("per_class") or {}).keys()) for r in runs]
    classes = [c for c in class_lists[0] if all(c in other for other in class_lists[1:])]
    if any(set(c) != set(class_lists[0]) for c in class_lists[1:]):
        warnings.append("the runs have different class lists; per-class deltas cover the shared classes only")
    reference = runs[0]
    rows = []
    for run in runs:
        metrics = {k: _points(run.metrics.get(k)) for k in METRIC_KEYS}
        per_class = {c: _points(run.metrics["per_class"][c]["AP50"]) for c in classes}
        row: dict[str, Any] = {
            "name": run.name, "path": str(run.path), "metrics": metrics, "per_class_AP50": per_class,
            "images_per_s": run.metrics.get("images_per_s"), "info": run.info,
        }
        if run is not reference:
            ref_metrics = {k: _points(reference.metrics.get(k)) for k in METRIC_KEYS}
            row["deltas"] = {k: (round(metrics[k] - ref_metrics[k], 2)
                                 if metrics[k] is not None and ref_metrics[k] is not None else None)
                             for k in METRIC_KEYS}
            ref_class = {c: _points(reference.metrics["per_class"][c]["AP50"]) for c in classes}
            row["per_class_delta"] = {c: round(per_class[c] - ref_class[c], 2) for c in classes}
        rows.append(row)
    return {"reference": reference.name, "runs": rows, "classes": classes, "warnings": warnings,
            "metrics_logs": {r.name: str(r.metrics_log) for r in runs if r.metrics_log is not None}}


def per_class_delta_chart(comparison: dict[str, Any], out: str | Path) -> Path:
    """Horizontal bars: AP50 change per class of every run against the reference (points)."""
    import numpy as np

    from ds2d2_cli.plots import PALETTE, _pyplot, _save

    plt = _pyplot()
    classes = comparison["classes"]
    others = comparison["runs"][1:]
    if not classes:
        raise InputError("the runs share no classes; nothing to chart")
    height = max(2.5, 0.45 * (len(classes) + 1) * max(1, len(others)) ** 0.5 + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    labels = ["all classes", *classes]
    positions = np.arange(len(labels))
    bar = 0.8 / len(others)
    for i, row in enumerate(others):
        deltas = [row["deltas"]["AP50"] or 0.0, *(row["per_class_delta"][c] for c in classes)]
        ax.barh(positions + (i - (len(others) - 1) / 2) * bar, deltas, height=bar,
                color=PALETTE[(i + 1) % len(PALETTE)], label=row["name"])
        for y, d in zip(positions + (i - (len(others) - 1) / 2) * bar, deltas):
            ax.annotate(f"{d:+.1f}", (d, y), xytext=(3 if d >= 0 else -3, 0), textcoords="offset points",
                        ha="left" if d >= 0 else "right", va="center", fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(positions, labels)
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel(f"AP50 change vs {comparison['reference']} (points)")
    ax.set_title("per-class AP50 delta")
    ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.15)
    fig.tight_layout()
    return _save(fig, Path(out))


def write_comparison(comparison: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """compare.json, per_class_ap50_delta.png and (when the runs logged training) training_curves.png.

    All or nothing: when one file cannot be made (a damaged metrics.jsonl, a full disk), the
    ones this call already wrote are removed again.
    """
    from ds2d2_cli.plots import training_curves

    out_dir = Path(out_dir)
    written: dict[str, str] = {}
    try:
        if comparison["classes"]:
            written["per_class_chart"] = str(per_class_delta_chart(comparison, out_dir / "per_class_ap50_delta.png"))
        logs = comparison["metrics_logs"]
        if logs:
            written["training_curves"] = str(training_curves({name: Path(p).parent for name, p in logs.items()},
                                                             out_dir / "training_curves.png"))
        written["json"] = str(out_dir / "compare.json")
        write_json(out_dir / "compare.json", {**comparison, "files": written}, indent=2)
    except BaseException:
        for path in written.values():
            Path(path).unlink(missing_ok=True)
        raise
    return written


__all__ = ["Run", "load_run", "compare_runs", "per_class_delta_chart", "write_comparison", "count_parameters"]
