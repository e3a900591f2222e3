"""Training, evaluation and export subcommands: option parsing and tables around `ds2d2_cli.stages`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import (
    PRESET_HELP, SET_HELP, RichReporter, handle_errors, state, stdout_console, write_json_output,
)
from ds2d2_cli.distill.registry import DS2D2_STREAMS, METHODS, active_terms
from ds2d2_cli.errors import InputError

JSON_HELP = "also write the figures as JSON to FILE (`-` for stdout)"
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
DATA_HELP = "prepared data folder \\[default: the preset's data.root, where prepare-data writes]"
MAX_ITERS_HELP = "stop after N iterations (overrides the preset's epochs; handy for smoke tests)"
RESUME_HELP = "continue the run in OUT from its last checkpoint (same config required)"


def register(app: typer.Typer) -> None:
    app.command("train-teacher")(train_teacher_command)
    app.command("train-amplifier")(train_amplifier_command)
    app.command("distill")(distill_command)
    app.command("eval")(eval_command)
    from ds2d2_cli.cli import export as export_cli, predict as predict_cli

    app.command("export")(export_cli.export_command)
    app.command("predict")(predict_cli.predict_command)


# ----------------------------------------------------------------------------- shared


def resolve_config(preset: str, overrides: list[str], *, stage: str, command: str, options: list[str] | None = None,
                   max_iters: Optional[int] = None, weights: dict[str, Optional[Path]] | None = None):
    """The preset with the user's `--set` overrides (refused when `stage` would not read them)
    and the command's own options (`options`, `--max-iters`, backbone weights) folded in."""
    from ds2d2_cli.config import SCHEDULE_FIELDS, check_overrides_read, load_config

    extra = [*overrides, *(options or [])]
    config = load_config(preset, extra)
    check_overrides_read(config, stage, overrides, command=command, preset=preset)  # type: ignore[arg-type]
    if max_iters is not None:
        if max_iters <= 0:
            raise InputError("--max-iters must be positive")
        field = SCHEDULE_FIELDS[stage]
        if getattr(config, field) is None:
            extra.append(f"{field}={config.train.model_dump_json()}")
        extra.append(f"{field}.max_iters={max_iters}")
    for role, path in (weights or {}).items():
        if path is not None:
            extra.append(f"{role}.backbone_weights={path}")
    return load_config(preset, extra)


def _device(name: str):
    """`--device`, and under torchrun this process's device (cuda:LOCAL_RANK) in the process group."""
    from ds2d2_cli import distributed
    from ds2d2_cli.engine import resolve_device

    device = distributed.setup(resolve_device(name))
    if not distributed.is_main():
        state.quiet = True  # one set of tables and notes: rank 0's
    return device


def _json_to_stdout(json_out: Optional[Path]) -> bool:
    """With `--json -` stdout carries only the JSON, so scripts can parse it."""
    return json_out is not None and str(json_out) == "-"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def print_run_summary(summary: dict[str, Any]) -> None:
    console = stdout_console()
    table = Table(title=f"{summary['stage']} run: {summary['out']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("iterations", str(summary["iterations"]))
    table.add_row("time", f"{summary['seconds']:.1f} s ({summary['images_per_s']:.2f} images/s)")
    for name, value in summary.get("final_losses", {}).items():
        table.add_row(f"loss {name.removeprefix('loss_')}", f"{value:.4g}")
    metrics = summary.get("metrics") or {}
    if metrics:
        table.add_row(f"{summary.get('eval_split')} mAP / AP50", f"{_pct(metrics.get('mAP'))} / {_pct(metrics.get('AP50'))}")
    table.add_row("model", summary["model"])
    if summary.get("best"):
        table.add_row("best", summary["best"])
    console.print(table)


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    console = stdout_console()
    overall = Table(title=title)
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl"):
        overall.add_column(key, justify="right")
    overall.add_row(*(_pct(metrics.get(k)) for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")))
    console.print(overall)
    per_class = metrics.get("per_class") or {}
    if per_class:
        table = Table(title="per class (AP in %)")
        table.add_column("class")
        table.add_column("AP50", justify="right")
        table.add_column("AP", justify="right")
        for name, values in per_class.items():
            table.add_row(name, _pct(values["AP50"]), _pct(values["AP"]))
        console.print(table)
    if metrics.get("images_per_s"):
        console.print(f"{metrics['images']} images, {metrics['images_per_s']:.2f} images/s (model only), "
                      f"{metrics['detections']} detections")


def print_task1_metrics(metrics: dict[str, Any]) -> None:
    console = stdout_console()
    merged = " (patches merged into scenes)" if metrics.get("merged_patches") else ""
    from rich.markup import escape

    table = Table(title=f"DOTA Task 1: {escape(metrics['results'])} vs {escape(metrics['labels'])}{merged}, "
                        f"{metrics['ap']} AP at IoU > {metrics['iou_threshold']:g}")
    for column in ("class", "AP %", "objects", "difficult", "detections", "TP", "FP"):
        table.add_column(column, justify="left" if column == "class" else "right")
    absent = []
    for name, row in metrics["per_class"].items():
        if row["ground_truth"] == 0:
            absent.append(name)
        table.add_row(name, _pct(row["AP"]), str(row["ground_truth"]), str(row["difficult"]),
                      str(row["detections"]), str(row["true_positives"]), str(row["false_positives"]))
    table.add_section()
    table.add_row("mAP", _pct(metrics["mAP"]), "", "", str(metrics["detections"]), "", "")
    console.print(table)
    if absent:
        console.print(f"{len(absent)} of {len(metrics['per_class'])} classes have no (non-difficult) objects in "
                      f"these labels and count as AP 0 in the mean, as in the devkit ({', '.join(absent)}); "
                      "--classes [a,b,...] scores only some", soft_wrap=True, markup=False)
    if metrics.get("ignored_objects"):
        console.print(f"{metrics['ignored_objects']} objects of classes outside the list were left out "
                      f"(first: {metrics['ignored_example']})", soft_wrap=True, markup=False)


# ----------------------------------------------------------------------------- commands


@handle_errors
def train_teacher_command(
    preset: str = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/teacher"), "--out", "-o", help="run folder"),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help=MAX_ITERS_HELP),
    backbone_weights: Optional[Path] = typer.Option(
        None, "--backbone-weights", help="local backbone weights (state_dict .pth/.safetensors) instead of downloading"),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Train the teacher detector on prepared data.

    Example: ds2d2 train-teacher --preset retina-dior --out runs/teacher
    """
    from ds2d2_cli.stages.teacher import train_teacher

    config = resolve_config(preset, overrides, stage="teacher", command="train-teacher", max_iters=max_iters,
                            weights={"teacher": backbone_weights})
    result = train_teacher(config, out=out, data_dir=data, preset=preset, device=_device(device),
                           resume=resume, reporter=RichReporter())
    if not _json_to_stdout(json_out):
        print_run_summary(result.summary)
    write_json_output(json_out, result.summary)


@handle_errors
def train_amplifier_command(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="the teacher's model.safetensors"),
    preset: str = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/amplifier"), "--out", "-o", help="run folder"),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    wavelet: Optional[str] = typer.Option(None, "--wavelet", help="wavelet of the high-frequency split \\[default: preset]",
                                          show_default=False),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help=MAX_ITERS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Train the high-frequency knowledge amplifier of a teacher (its head on high-frequency features).

    Example: ds2d2 train-amplifier --teacher runs/teacher/model.safetensors --preset retina-dior --out runs/amplifier
    """
    from ds2d2_cli.stages.amplifier import train_amplifier

    config = resolve_config(preset, overrides, stage="amplifier", command="train-amplifier",
                            options=[f"distill.wavelet={wavelet}"] if wavelet else [], max_iters=max_iters)
    result = train_amplifier(config, teacher=teacher, out=out, data_dir=data, preset=preset,
                             device=_device(device), resume=resume, reporter=RichReporter())
    if not _json_to_stdout(json_out):
        print_run_summary(result.summary)
    write_json_output(json_out, result.summary)


def _streams(value: Optional[str]) -> list[str]:
    if value is None:
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in DS2D2_STREAMS]
    if unknown or not names:
        raise InputError(f"--streams takes a comma list of {', '.join(DS2D2_STREAMS)} (got {value!r})")
    return [f"distill.streams={json.dumps(names)}"]


def _refuse_unused_stream_flags(settings: Any, *, streams: bool, no_disw: bool, wavelet: bool) -> None:
    """--streams, --no-disw and --wavelet set DS2D2's streams; a method without them would drop them."""
    chosen = METHODS[settings.method]
    running = {term.name for term in active_terms(chosen, settings.streams)}
    if streams and not chosen.ablatable:
        raise InputError(f"--streams picks among ds2d2's streams; --method {settings.method} runs all its terms "
                         f"({', '.join(chosen.terms) or 'none'}): leave --streams out")
    if no_disw and not running & {"explicit-low", "explicit-high"}:
        raise InputError(f"--no-disw unweights DS2D2's explicit streams, and this run has none (method "
                         f"{settings.method}, terms {', '.join(sorted(running)) or 'none'}): leave it out")
    if wavelet and not running & {"explicit-low", "explicit-high", "implicit-high"}:
        raise InputError(f"--wavelet splits the features of DS2D2's explicit and high-frequency streams, and this run "
                         f"has none (method {settings.method}, terms {', '.join(sorted(running)) or 'none'}): "
                         "leave it out")


@handle_errors
def distill_command(
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="the teacher's model.safetensors "
                                           "(not needed with --method none, unless the student starts from it: "
                                           "distill.init_student_from_teacher)", show_default=False),
    amplifier: Optional[Path] = typer.Option(None, "--amplifier", "-a", help="the amplifier's model.safetensors "
                                             "(without it the implicit high-frequency stream is off)",
                                             show_default=False),
    init_student: Optional[Path] = typer.Option(
        None, "--init-student", help="start from this student checkpoint's detector weights (same student model, "
        "classes and input; optimizer and schedule fresh): progressive distillation, teacher-assistant chains",
        show_default=False),
    preset: str = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/student"), "--out", "-o", help="run folder"),
    method: Optional[str] = typer.Option(None, "--method", help=f"{', '.join(METHODS)} (none: the undistilled "
                                         "baseline) \\[default: preset, i.e. ds2d2]", show_default=False),
    streams: Optional[str] = typer.Option(None, "--streams", help="ablation: comma list of "
                                          f"{', '.join(DS2D2_STREAMS)} \\[default: all]", show_default=False),
    no_disw: bool = typer.Option(False, "--no-disw", help="ablation: plain (unweighted) explicit losses"),
    wavelet: Optional[str] = typer.Option(None, "--wavelet", help="any pywt discrete wavelet \\[default: preset, haar]",
                                          show_default=False),
    backbone_weights: Optional[Path] = typer.Option(
        None, "--backbone-weights", help="local ImageNet weights for the student backbone (state_dict "
        ".pth/.safetensors) instead of downloading", show_default=False),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help=MAX_ITERS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Train the student with DS2D2 distillation (or a baseline: --method none / fitnet).

    Examples: ds2d2 distill --teacher t.safetensors --preset retina-dior

              ds2d2 distill --method none --preset retina-dior --out runs/baseline

              ds2d2 distill --teacher t2.safetensors --init-student runs/student/model.safetensors --preset retina-dior
    """
    from ds2d2_cli.stages.distill import distill

    options: list[str] = []
    if method is not None:
        if method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
        options.append(f"distill.method={method}")
    options += _streams(streams)
    if no_disw:
        options.append("distill.disw=false")
    if wavelet:
        options.append(f"distill.wavelet={wavelet}")
    config = resolve_config(preset, overrides, stage="student", command="distill", options=options, max_iters=max_iters,
                            weights={"student": backbone_weights})
    _refuse_unused_stream_flags(config.distill, streams=streams is not None, no_disw=no_disw, wavelet=bool(wavelet))
    result = distill(config, out=out, teacher=teacher, amplifier=amplifier, init_student=init_student,
                     data_dir=data, preset=preset,
                     device=_device(device), resume=resume, reporter=RichReporter())
    if not _json_to_stdout(json_out):
        print_run_summary(result.summary)
    write_json_output(json_out, result.summary)


@handle_errors
def eval_command(
    checkpoint: Optional[Path] = typer.Argument(None, help="a teacher or student .safetensors checkpoint",
                                                show_default=False),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="prepared data folder \\[default: the checkpoint's run config]",
                                        show_default=False),
    split: Optional[str] = typer.Option(None, "--split", help="split to score \\[default: the config's eval split]",
                                        show_default=False),
    merge_patches: bool = typer.Option(False, "--merge-patches",
                                       help="merge DOTA patch detections back into scenes and score whole scenes"),
    predictions_out: Optional[Path] = typer.Option(None, "--predictions-out", help="write the COCO results JSON here "
                                                   "(with --dota-task1 --merge-patches: the merged Task1 files, "
                                                   "to this folder)"),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="score this COCO results file "
                                               "(no model; rows with `rbox`: DOTA Task 1)"),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO annotations for --predictions"),
    dota_task1: Optional[Path] = typer.Option(None, "--dota-task1", help="score the DOTA Task 1 submission files "
                                              "(Task1_<class>.txt) in this folder as the DOTA devkit does (no model)",
                                              show_default=False),
    dota_labels: Optional[Path] = typer.Option(None, "--dota-labels", help="DOTA labelTxt folder (<image>.txt) "
                                               "for --dota-task1", show_default=False),
    classes: Optional[str] = typer.Option(None, "--classes", help="with --dota-task1: the classes scored, a set "
                                          "(dota-v1.0, dota-v1.5, ...) or a list \\[plane,ship]; mAP is their mean "
                                          "\\[default: dota-v1.0]", show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="images per inference batch"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """COCO metrics (pycocotools) of a checkpoint, or of a results file; DOTA Task 1 mAP of submission files.

    Examples: ds2d2 eval runs/student/model.safetensors --json metrics.json

              ds2d2 eval --predictions results.json --annotations data/DIOR-coco/test.json

              ds2d2 eval --dota-task1 results/ --dota-labels DOTA/val/labelTxt

              ds2d2 eval --dota-task1 patch_results/ --merge-patches --dota-labels DOTA/val/labelTxt
    """
    from ds2d2_cli.stages.evaluate import evaluate_checkpoint, evaluate_predictions, evaluate_task1_submission

    if dota_task1 is not None or dota_labels is not None:
        given = {"a checkpoint": checkpoint, "--data": data, "--split": split, "--predictions": predictions,
                 "--annotations": annotations, "--batch-size": batch_size if batch_size != 8 else None,
                 "--device": device if device != "auto" else None}
        refused = [name for name, value in given.items() if value is not None]
        if refused:
            raise InputError(f"--dota-task1 scores submission files without a model: drop {', '.join(refused)}")
        if dota_task1 is None or dota_labels is None:
            raise InputError("--dota-task1 and --dota-labels go together")
        if predictions_out is not None and not merge_patches:
            raise InputError("--predictions-out with --dota-task1 writes merged files: it needs --merge-patches")
        metrics = evaluate_task1_submission(dota_task1, dota_labels, classes or "dota-v1.0",
                                            merge_patches=merge_patches, merged_out=predictions_out)
        if not _json_to_stdout(json_out):
            print_task1_metrics(metrics)
        write_json_output(json_out, metrics)
        return
    if classes is not None:
        raise InputError("--classes goes with --dota-task1 (a checkpoint scores its own classes)")
    if predictions is not None or annotations is not None:
        if checkpoint is not None:
            raise InputError("pass either a checkpoint or --predictions/--annotations, not both")
        if predictions is None or annotations is None:
            raise InputError("--predictions and --annotations go together")
        metrics = evaluate_predictions(predictions, annotations)
        title = f"{predictions.name} vs {annotations.name}"
    else:
        if checkpoint is None:
            raise InputError("give a checkpoint to evaluate (or --predictions with --annotations)")
        metrics = evaluate_checkpoint(checkpoint, data_dir=data, split=split, device=_device(device),
                                      merge_patches=merge_patches, batch_size=batch_size,
                                      predictions_out=predictions_out, reporter=RichReporter())
        title = f"{checkpoint} on {metrics['split']}{' (scenes)' if merge_patches else ''}"
    if not _json_to_stdout(json_out):
        print_metrics(metrics, title)
    write_json_output(json_out, metrics)
