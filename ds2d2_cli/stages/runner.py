"""The part every training stage shares: run folder, training, evaluation, checkpoints, summary.

A stage only says what it trains (a `TrainingTask`) and which detector to score; this
module writes `config.json`, `metrics.jsonl`, `best.safetensors` (when evaluation runs
during training), `model.safetensors` with the final metrics, and `summary.json`; the
resume state (`checkpoints/last.pt`) lives only while the run is unfinished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ds2d2_cli import distributed
from ds2d2_cli.checkpoint import CheckpointMeta, save_checkpoint, save_tensors
from ds2d2_cli.config import (UNREADABLE_CONFIG, RunConfig, config_differences, config_to_json, stored_config,
                              value_differences)
from ds2d2_cli.data.dataset import DetectionDataset
from ds2d2_cli.models.families import is_oriented
from ds2d2_cli.engine import RESUME_FILE, TrainingTask, prepare_run_dir, remove_resume_state, train
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import read_json, write_json
from ds2d2_cli.metrics_log import MetricsLog
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.evaluation import evaluate_on_split
from ds2d2_cli.stages.common import StageData, resolve_classes


DISTILL_PARTS = "distill_parts.safetensors"


@dataclass
class StageResult:
    """What a stage produced; `summary` is also written to `OUT/summary.json`."""

    out: Path
    model_path: Path
    best_path: Path | None
    summary: dict[str, Any] = field(default_factory=dict)


NO_CONFIG = "(no config.json)"


@dataclass(frozen=True)
class PriorRun:
    """What a run folder already holds, against the config a caller would train it with.

    A finished run (its `model.safetensors`) is compared on the settings its stage depends
    on (`RunConfig.stage_inputs`: a changed student setting keeps the teacher); an
    unfinished one (resume state only) on the whole config, as `--resume` requires.
    `differences` is `[NO_CONFIG]` or `[UNREADABLE_CONFIG]` when there is nothing to compare.
    """

    finished: bool
    differences: list[str]


def prior_run(stage: str, out: Path, config: RunConfig) -> PriorRun | None:
    """None when `out` holds nothing to reuse or resume (demo and study decide with this)."""
    out = Path(out)
    finished = (out / "model.safetensors").is_file()
    if not finished and not (out / RESUME_FILE).is_file():
        return None
    stored_path = out / "config.json"
    if not stored_path.is_file():
        return PriorRun(finished, [NO_CONFIG])
    config = resolve_classes(config)  # the run recorded `auto` as the list it stood for
    if not finished:
        return PriorRun(False, config_differences(stored_path, config_to_json(config)))
    try:
        stored = stored_config(read_json(stored_path), str(stored_path))
    except InputError:
        return PriorRun(True, [UNREADABLE_CONFIG])
    return PriorRun(True, value_differences(stored.stage_inputs(stage), config.stage_inputs(stage)))  # type: ignore[arg-type]


def teacher_of(model: Path) -> str | None:
    """The SHA-256 of the teacher a finished amplifier or student was trained from (None: no teacher)."""
    from ds2d2_cli.checkpoint import load_checkpoint

    return load_checkpoint(model).meta.teacher_sha256


def prepare_stage(config: RunConfig, out: Path, resume: bool) -> None:
    """Rank 0 checks and creates the run folder; the other processes wait for it."""
    if distributed.is_main():
        prepare_run_dir(Path(out), config_to_json(config), resume)
    distributed.barrier()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """This process's peak CUDA memory held by tensors since the stage began in it (a resumed
    run: since the resume), in MiB (`torch.cuda.max_memory_allocated`); None off CUDA, where
    torch keeps no such count."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def run_stage(
    *,
    task: TrainingTask,
    scored: nn.Module | None,
    weights: Callable[[], dict[str, torch.Tensor]],
    meta: Callable[[dict[str, Any]], CheckpointMeta],
    config: RunConfig,
    data: StageData,
    out: Path,
    stage: str,
    device: torch.device,
    resume: bool,
    reporter: Reporter | None,
    extra_summary: dict[str, Any] | None = None,
    side_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> StageResult:
    """Train `task`, score `scored` (None: no detector to score) and save the checkpoints.

    `weights()` returns the state dict that goes into the checkpoint and `meta(metrics)`
    its metadata, so amplifier and student stages can save only what they hand over.
    `side_weights()`, when given, is what trained beside it and is not handed over (the
    adapter, MGD's generators): saved as `DISTILL_PARTS`, read by nothing downstream.
    """
    main = distributed.is_main()
    reporter = (reporter or NullReporter()) if main else NullReporter()
    out = Path(out)
    schedule = config.schedule(stage)  # type: ignore[arg-type]
    _reset_peak_memory(device)  # what the models built so far hold counts; earlier stages' peaks do not
    dataset = DetectionDataset(data.train, data.config.input, augment=schedule.augment, seed=schedule.seed,
                               cache_images=schedule.cache_images, rboxes=scored is not None and is_oriented(scored))
    evaluate = None
    best_path = out / "best.safetensors"
    if scored is not None and data.eval is not None:
        def evaluate() -> dict[str, Any]:
            metrics, _ = evaluate_on_split(scored, data.eval, device, input_cfg=data.config.input,
                                           batch_size=schedule.batch_size * 2)
            return metrics

    def on_best(metrics: dict[str, Any]) -> None:
        if main:
            save_checkpoint(best_path, weights(), meta(metrics))

    schedule_key = config.schedule_key(stage)  # type: ignore[arg-type]
    # One log for the run, the final evaluation included; a missing tensorboard package stops here.
    with MetricsLog(out, tensorboard=schedule.tensorboard, setting=f"{schedule_key}.tensorboard") as log:
        result = train(task, dataset, schedule, out, stage=stage, device=device, resume=resume,
                       schedule_key=schedule_key, reporter=reporter, evaluate=evaluate, on_best=on_best,
                       metrics_log=log)
        final_metrics: dict[str, Any] = {}
        if evaluate is not None:
            reporter.note(f"{stage}: evaluating on {data.eval.path.stem} ({len(data.eval.images)} images)")
            final_metrics = evaluate()
            log.evaluation(result.iterations, final_metrics)  # rank 0 writes
            best_so_far = max((e.get("mAP", -1.0) for e in result.evaluations), default=-1.0)
            if final_metrics["mAP"] >= best_so_far:
                on_best(final_metrics)
    model_path = out / "model.safetensors"
    parts_path = out / DISTILL_PARTS if side_weights is not None else None
    if main:
        save_checkpoint(model_path, weights(), meta(final_metrics))
        if parts_path is not None:
            save_tensors(parts_path, side_weights(), {"format": "ds2d2-distill-parts", "stage": stage,
                                                       "method": config.distill.method})
    summary = {
        "stage": stage,
        "out": str(out),
        "model": str(model_path),
        "best": str(best_path) if best_path.is_file() else None,
        "distill_parts": str(parts_path) if parts_path is not None else None,
        "iterations": result.iterations,
        "seconds": round(result.seconds, 2),
        "images_per_s": round(result.images_per_s, 3),
        "iterations_per_s": round(result.images_per_s / schedule.batch_size, 4),
        # five significant digits: the explicit streams' weighted terms are 1e-8..1e-5
        "final_losses": {k: float(f"{v:.5g}") for k, v in result.final_losses.items()},
        "skipped_steps": result.skipped_steps,
        # training and its evaluations, this process (rank 0 under torchrun); None on CPU
        "peak_cuda_memory_mb": peak_memory_mb(device),
        "metrics": final_metrics,
        "eval_split": data.eval.path.stem if data.eval is not None else None,
        **(extra_summary or {}),
    }
    if distributed.world_size() > 1:
        summary["processes"] = distributed.world_size()
    if main:
        write_json(out / "summary.json", summary, indent=2)
        remove_resume_state(out)
    distributed.barrier()  # the run is complete on disk before any process returns
    return StageResult(out, model_path, best_path if best_path.is_file() else None, summary)
