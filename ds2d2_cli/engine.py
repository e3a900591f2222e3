"""The training loop shared by the teacher, amplifier and student stages.

A stage describes *what* is trained as a `TrainingTask` (which module owns the
trainable weights, how a batch becomes named loss terms); this module does the rest
the same way for all three: optimiser and LR schedule, mixed precision, gradient
clipping, logging every loss term to `metrics.jsonl`, periodic atomic checkpoints and
exact `--resume`, evaluation and the best checkpoint.

Faults never cost more than one checkpoint interval: Ctrl-C and SIGTERM let the current
step finish, write the resume checkpoint and stop (`TrainingInterrupted`; a second signal
aborts at once and keeps the previous checkpoint), a SIGKILL leaves the last
periodic one (written atomically, so a half-written file is never picked up), and a
non-finite loss term stops the run at the step it appears - or, with
`on_nonfinite: skip`, that step is skipped and counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from ds2d2_cli import distributed
from ds2d2_cli.config import TrainConfig, config_differences
from ds2d2_cli.data.dataset import DetectionDataset, ResumableBatchSampler, collate
from ds2d2_cli.errors import Ds2d2Error, InputError, TrainingInterrupted
from ds2d2_cli.fileio import atomic_path
from ds2d2_cli.progress import NullReporter, Reporter

RESUME_FILE = "checkpoints/last.pt"
# With on_nonfinite=skip, this many non-finite steps in a row mean the run has diverged.
MAX_CONSECUTIVE_SKIPS = 20


class TrainingTask(Protocol):
    module: nn.Module  # holds every trainable parameter; its state_dict is what resume restores

    def losses(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Weighted loss terms; their sum is minimised and each is logged on its own."""
        ...

    def train_mode(self) -> None: ...


@dataclass
class TrainResult:
    iterations: int
    seconds: float
    images_per_s: float
    final_losses: dict[str, float]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # non-finite steps skipped (on_nonfinite=skip)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def total_iterations(schedule: TrainConfig, num_samples: int, world_size: int = 1) -> int:
    if schedule.max_iters is not None:
        return schedule.max_iters
    per_epoch = max(1, num_samples // (schedule.batch_size * world_size))
    return per_epoch * int(schedule.epochs or 1)


def lr_factor(iteration: int, total: int, schedule: TrainConfig) -> float:
    """Linear warm-up, then step decay at the schedule's fractions (2x: epochs 16 and 22 of 24)."""
    factor = schedule.lr_gamma ** sum(iteration >= round(f * total) for f in schedule.lr_steps)
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= schedule.warmup_ratio * (1 - alpha) + alpha
    return factor


def build_optimizer(module: nn.Module, schedule: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise Ds2d2Error("nothing to train: every parameter is frozen")
    lr = schedule.lr * schedule.batch_size * world_size / schedule.lr_base_batch
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def _save_resume(out: Path, iteration: int, task: TrainingTask, optimizer, scheduler, scaler, extra: dict) -> None:
    state = {
        "iteration": iteration,
        "module": task.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "extra": extra,
    }
    with atomic_path(out / RESUME_FILE) as tmp:
        torch.save(state, tmp)


def remove_resume_state(out: Path) -> None:
    """A finished run needs no resume state; it is two to three times the model's size."""
    path = out / RESUME_FILE
    path.unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def _load_resume(out: Path) -> dict[str, Any]:
    path = out / RESUME_FILE
    if not path.is_file() and (out / "model.safetensors").is_file():
        raise InputError("--resume: this run already finished (model.safetensors); nothing to resume", out)
    if not path.is_file():
        raise InputError("--resume: no checkpoint to resume from in this run folder", out)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged resume file is a user-visible input problem
        raise InputError(f"--resume: cannot read the resume checkpoint ({exc})", path) from None


def _trim_metrics(path: Path, last_iteration: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log reads as one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("iter", 0) <= last_iteration]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def prepare_run_dir(out: Path, config_json: str, resume: bool) -> None:
    """Refuse to mix two runs in one folder; write the resolved config."""
    config_path = out / "config.json"
    if resume:
        differ = config_differences(config_path, config_json) if config_path.is_file() else []
        if differ:
            shown = ", ".join(differ[:3]) + (f", and {len(differ) - 3} more" if len(differ) > 3 else "")
            raise InputError(f"--resume: the resolved config differs from the run's config.json ({shown})",
                             config_path)
    elif (out / "model.safetensors").exists():
        raise InputError("this folder holds a finished run (model.safetensors); choose another --out", out)
    elif (out / RESUME_FILE).exists():
        raise InputError("this folder holds an unfinished run; use --resume to continue it or choose another --out",
                         out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Ds2d2Error(f"cannot create the run folder: {exc.strerror}", out) from None
    with atomic_path(config_path) as tmp:
        tmp.write_text(config_json)


@dataclass
class _StopRequest:
    """Set by the first Ctrl-C / SIGTERM; the loop stops at the next step boundary."""

    signal_name: str | None = None
    signal_number: int = 0


@contextlib.contextmanager
def _stop_at_step_boundary():
    """The first SIGINT/SIGTERM asks for a clean stop after the current step (so the
    checkpoint holds a consistent state); a second one aborts at once (KeyboardInterrupt)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signal_name is not None:
            raise KeyboardInterrupt
        stop.signal_name, stop.signal_number = signal.Signals(signum).name, signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _TaskForward(nn.Module):
    """`task.losses` as a module's forward, so DistributedDataParallel sees (and syncs) the step."""

    def __init__(self, task: TrainingTask):
        super().__init__()
        self.trained = task.module  # registers the trainable parameters with DDP
        self._losses = task.losses

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self._losses(images, targets)


def _compile_backbones(module: nn.Module) -> None:
    """Compile the ResNet bodies in place (state-dict keys unchanged); detection heads and
    post-processing have data-dependent shapes and stay eager."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    for sub in module.modules():
        if isinstance(sub, BackboneWithFPN):
            sub.body.compile()


def _distributed_forward(task: TrainingTask, schedule: TrainConfig, device: torch.device) -> Callable:
    """`task.losses`, or a DDP-wrapped equivalent when running under torchrun."""
    if distributed.world_size() == 1:
        return task.losses
    from torch.nn.parallel import DistributedDataParallel

    if schedule.sync_bn:
        if device.type != "cuda":
            raise InputError("train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernels)")
        task.module = nn.SyncBatchNorm.convert_sync_batchnorm(task.module)
    return DistributedDataParallel(_TaskForward(task), device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=schedule.find_unused_parameters)


def _nonfinite(values: dict[str, float]) -> str | None:
    return next((name for name, value in values.items() if not math.isfinite(value)), None)


def train(
    task: TrainingTask,
    dataset: DetectionDataset,
    schedule: TrainConfig,
    out: Path,
    *,
    stage: str,
    device: torch.device,
    schedule_key: str = "train",
    resume: bool = False,
    reporter: Reporter | None = None,
    evaluate: Callable[[], dict[str, Any]] | None = None,
    on_best: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    world, main = distributed.world_size(), distributed.is_main()
    reporter = (reporter or NullReporter()) if main else NullReporter()
    total = total_iterations(schedule, len(dataset), world)
    if schedule.channels_last:
        task.module.to(memory_format=torch.channels_last)
    if schedule.compile:
        _compile_backbones(task.module)
    forward = _distributed_forward(task, schedule, device)
    optimizer = build_optimizer(task.module, schedule, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, schedule))
    use_amp = device.type == "cuda" and schedule.amp
    scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    metrics_path = out / "metrics.jsonl"

    start, best, result_skipped = 0, -1.0, 0
    if resume:
        state = _load_resume(out)
        task.module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start, best = int(state["iteration"]), float(state["extra"].get("best", -1.0))
        result_skipped = int(state["extra"].get("skipped_steps", 0))
        if main:
            _trim_metrics(metrics_path, start)
        reporter.note(f"{stage}: resuming at iteration {start} of {total}")

    sampler = ResumableBatchSampler(len(dataset), schedule.batch_size, total, start, seed=schedule.seed,
                                    rank=distributed.rank(), world_size=world)
    # One iterator spans the whole run (the batch sampler covers every epoch), so the workers
    # start once and keep their decoded-image caches: persistent by construction.
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=schedule.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    if world > 1:
        reporter.note(f"{stage}: {world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
                      f"{schedule.batch_size} images per process, {schedule.batch_size * world} per step")
    task.train_mode()
    progress = reporter.task(stage, total=total, completed=start)
    result = TrainResult(iterations=start, seconds=0.0, images_per_s=0.0, final_losses={},
                         skipped_steps=result_skipped)
    consecutive_skips = 0
    resume_path = out / RESUME_FILE

    last_saved = start if resume else None

    def save(at: int) -> None:
        nonlocal last_saved
        if main:
            _save_resume(out, at, task, optimizer, scheduler, scaler,
                         {"best": best, "skipped_steps": result.skipped_steps})
        last_saved = at

    def skip_or_stop(what: str, value: float, at: int) -> None:
        """A non-finite loss term or gradient norm at iteration `at`: stop, or skip the step."""
        nonlocal consecutive_skips
        kept = f"last good checkpoint: {resume_path}" if resume_path.is_file() else "no checkpoint written yet"
        if schedule.on_nonfinite == "stop":
            raise Ds2d2Error(f"{stage}: {what} is {value} at iteration {at}; stopped ({kept}; "
                             f"--set {schedule_key}.on_nonfinite=skip skips such steps)")
        consecutive_skips += 1
        result.skipped_steps += 1
        if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise Ds2d2Error(f"{stage}: {what} is {value} at iteration {at}, the {consecutive_skips}th non-finite "
                             f"step in a row; the run has diverged, stopped ({kept})")
        log.write(json.dumps({"iter": at, "skipped_step": {"term": what, "value": str(value)}}) + "\n")
        log.flush()
        reporter.note(f"{stage}: {what} is {value} at iteration {at}; step skipped "
                      f"({result.skipped_steps} so far)")

    window_images, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    iteration = completed = start
    in_step = False  # between the forward pass and the optimiser step the state is inconsistent
    log = open(metrics_path if main else os.devnull, "a", encoding="utf-8")
    try:
        with _stop_at_step_boundary() as stop:
            for iteration, (images, targets) in enumerate(loader, start=start + 1):
                in_step = True
                images, targets = _to_device(images, targets, device)
                with _autocast(device, use_amp):
                    terms = forward(images, targets)
                loss = sum(terms.values())
                values = {k: float(v.detach()) for k, v in terms.items()}
                optimizer.zero_grad(set_to_none=True)
                bad = _nonfinite(values)
                # Every rank must take the same branch (a lone rank skipping its backward would hang the rest).
                bad_anywhere, stop_anywhere = distributed.any_rank([bad is not None, stop.signal_name is not None],
                                                                   device)
                if bad_anywhere:
                    what = f"loss term {bad}" if bad is not None else "a loss term on another process"
                    skip_or_stop(what, values[bad] if bad is not None else float("nan"), iteration)
                else:
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    # Without clipping the norm is still taken (an infinite limit scales by
                    # exactly 1), so a non-finite gradient is caught either way.
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], schedule.grad_clip or math.inf))
                    if scaler is not None:
                        scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
                        scaler.update()
                    elif not math.isfinite(grad_norm):
                        optimizer.zero_grad(set_to_none=True)
                        skip_or_stop("the gradient norm", grad_norm, iteration)
                    else:
                        optimizer.step()
                        consecutive_skips = 0
                    result.final_losses = values
                scheduler.step()  # skipped steps keep the schedule aligned with the data order
                completed, in_step = iteration, False

                window_images += len(images) * world
                if not bad_anywhere and (iteration % schedule.log_every == 0 or iteration == total):
                    elapsed = time.perf_counter() - window_start
                    speed = window_images / elapsed if elapsed > 0 else 0.0
                    logged = distributed.mean_over_ranks({"loss": float(loss.detach()), **values}, device)
                    record = {
                        "iter": iteration, "epoch": (iteration - 1) // sampler.iters_per_epoch,
                        "lr": optimizer.param_groups[0]["lr"], **logged, "images_per_s": round(speed, 3),
                    }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    window_images, window_start = 0, time.perf_counter()
                progress.update(1, loss=float(loss.detach()), lr=optimizer.param_groups[0]["lr"])

                evaluate_now = evaluate is not None and schedule.eval_every and iteration % schedule.eval_every == 0
                if evaluate_now and iteration != total:
                    metrics = evaluate()
                    task.train_mode()
                    result.evaluations.append({"iter": iteration, **metrics})
                    log.write(json.dumps({"iter": iteration, "eval": metrics}) + "\n")
                    log.flush()
                    if on_best is not None and metrics.get("mAP", -1.0) > best:
                        best = metrics["mAP"]
                        on_best(metrics)
                if iteration % schedule.checkpoint_every == 0 or iteration == total:
                    save(iteration)
                if stop_anywhere and iteration != total:
                    if last_saved != iteration:
                        save(iteration)
                    raise TrainingInterrupted(stop.signal_name or "SIGTERM", stop.signal_number or signal.SIGTERM,
                                              iteration, resume_path)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        # Raised mid-step (a second Ctrl-C) the weights are half-updated: keep the last checkpoint.
        if not in_step and completed != last_saved:
            save(completed)
        raise TrainingInterrupted("SIGINT", signal.SIGINT, last_saved or 0,
                                  resume_path if last_saved is not None else None) from None
    finally:
        log.close()
        progress.close()

    result.iterations = total
    result.seconds = time.perf_counter() - run_start
    done = total - start
    result.images_per_s = done * schedule.batch_size * world / result.seconds if result.seconds > 0 else 0.0
    return result
