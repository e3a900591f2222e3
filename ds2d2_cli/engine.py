"""The training loop shared by the teacher, amplifier and student stages.

A stage describes *what* is trained as a `TrainingTask` (which module owns the
trainable weights, how a batch becomes named loss terms); this module does the rest
the same way for all three (`Trainer`; `train` runs one): optimiser and LR schedule,
mixed precision, gradient clipping, logging every loss term (`MetricsLog`: `metrics.jsonl`,
optionally TensorBoard), periodic atomic checkpoints and exact `--resume`, evaluation and
the best checkpoint.

Faults never cost more than one checkpoint interval: Ctrl-C and SIGTERM let the current
step finish, write the resume checkpoint and stop (`TrainingInterrupted`; a second signal
aborts at once and keeps the previous checkpoint), a SIGKILL leaves the last
periodic one (written atomically, so a half-written file is never picked up), and a
non-finite loss term stops the run at the step it appears - or, with
`on_nonfinite: skip`, that step is skipped and counted.
"""

from __future__ import annotations

import contextlib
import math
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
from ds2d2_cli.metrics_log import MetricsLog
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

    # Optional: `begin_iteration(iteration)` is called with the 1-based iteration before each
    # step's forward (DistillTask's `distill.implicit_every` keys on it).


@dataclass
class TrainState:
    """Where a run stands between steps; `best` and `skipped_steps` travel in the resume checkpoint."""

    iteration: int = 0  # the last completed iteration
    best: float = -1.0  # the best evaluation's mAP so far (what `on_best` last saw)
    skipped_steps: int = 0  # non-finite steps skipped (on_nonfinite=skip)
    consecutive_skips: int = 0  # ... in a row; MAX_CONSECUTIVE_SKIPS of them mean divergence
    last_saved: int | None = None  # the iteration of the resume checkpoint on disk (None: none yet)
    in_step: bool = False  # between the forward pass and the optimiser step the state is inconsistent


@dataclass
class _StepOutcome:
    """What one training step hands to logging and the step-boundary checks."""

    loss: torch.Tensor
    values: dict[str, float]  # each loss term, as a float
    images: int  # in this process's batch
    skipped: bool  # a non-finite loss term on some process: no backward pass, nothing logged
    stop_requested: bool  # a signal on some process: stop at this step boundary


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
        from ds2d2_cli.models.backbones import EvalBatchNorm2d

        if any(isinstance(m, EvalBatchNorm2d) for m in task.module.modules()):
            raise InputError("train.sync_bn has nothing to synchronise with norm bn_eval (its batch statistics "
                             "are never used); leave it off")
        task.module = nn.SyncBatchNorm.convert_sync_batchnorm(task.module)
    return DistributedDataParallel(_TaskForward(task), device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=schedule.find_unused_parameters)


def _nonfinite(values: dict[str, float]) -> str | None:
    return next((name for name, value in values.items() if not math.isfinite(value)), None)


class Trainer:
    """Trains `task` on `dataset` under `schedule`, writing its run folder `out`.

    `run()` restores the resume state (with `resume=True`), then for every batch takes one
    `step` (forward, the non-finite check every process agrees on, backward, gradient-norm
    check, optimiser and LR step), logs it, evaluates and `checkpoint`s on schedule, and stops
    cleanly at the step boundary after a Ctrl-C / SIGTERM. Every process of a multi-GPU run
    takes the same branch at every step; only rank 0 writes files.
    """

    def __init__(
        self,
        task: TrainingTask,
        dataset: DetectionDataset,
        schedule: TrainConfig,
        out: Path,
        *,
        stage: str,
        device: torch.device,
        schedule_key: str = "train",
        reporter: Reporter | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        on_best: Callable[[dict[str, Any]], None] | None = None,
        metrics_log: MetricsLog | None = None,
    ):
        self.task, self.dataset, self.schedule, self.out = task, dataset, schedule, Path(out)
        self.stage, self.device, self.schedule_key = stage, device, schedule_key
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.reporter = (reporter or NullReporter()) if self.main else NullReporter()
        self._evaluate, self._on_best = evaluate, on_best
        # A missing tensorboard package stops the run here, before anything is trained.
        self._owns_log = metrics_log is None
        self.log = metrics_log if metrics_log is not None else MetricsLog(
            self.out, tensorboard=schedule.tensorboard, setting=f"{schedule_key}.tensorboard")
        self.total = total = total_iterations(schedule, len(dataset), self.world)
        if schedule.channels_last:
            task.module.to(memory_format=torch.channels_last)
        if schedule.compile:
            _compile_backbones(task.module)
        self.forward = _distributed_forward(task, schedule, device)
        self._begin_iteration = getattr(task, "begin_iteration", None)
        self.optimizer = build_optimizer(task.module, schedule, self.world)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, total, schedule))
        self.use_amp = device.type == "cuda" and schedule.amp
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and not torch.cuda.is_bf16_supported() else None
        self.resume_path = self.out / RESUME_FILE
        self.state = TrainState()
        self.result = TrainResult(iterations=0, seconds=0.0, images_per_s=0.0, final_losses={})
        self._window_images, self._window_start = 0, 0.0

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool = False) -> TrainResult:
        if resume:
            self.restore()
        start, schedule = self.state.iteration, self.schedule
        sampler = ResumableBatchSampler(len(self.dataset), schedule.batch_size, self.total, start, seed=schedule.seed,
                                        rank=distributed.rank(), world_size=self.world)
        # One iterator spans the whole run (the batch sampler covers every epoch), so the workers
        # start once and keep their decoded-image caches: persistent by construction.
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=schedule.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        self._iters_per_epoch = sampler.iters_per_epoch
        if self.world > 1:
            self.reporter.note(f"{self.stage}: {self.world} processes "
                               f"({'NCCL' if self.device.type == 'cuda' else 'gloo'}), {schedule.batch_size} "
                               f"images per process, {schedule.batch_size * self.world} per step")
        self.task.train_mode()
        self.progress = self.reporter.task(self.stage, total=self.total, completed=start)
        self.result = TrainResult(iterations=start, seconds=0.0, images_per_s=0.0, final_losses={},
                                  skipped_steps=self.state.skipped_steps)
        self._window_images, self._window_start = 0, time.perf_counter()
        run_start = time.perf_counter()
        self.log.open()
        try:
            with _stop_at_step_boundary() as stop:
                for iteration, (images, targets) in enumerate(loader, start=start + 1):
                    outcome = self.step(iteration, images, targets, stop)
                    self._log_step(iteration, outcome)
                    self._at_step_boundary(iteration, outcome, stop)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            self._abort()
        finally:
            if self._owns_log:
                self.log.close()
            self.progress.close()

        result = self.result
        result.iterations = self.total
        result.seconds = time.perf_counter() - run_start
        done = self.total - start
        result.images_per_s = done * schedule.batch_size * self.world / result.seconds if result.seconds > 0 else 0.0
        result.skipped_steps = self.state.skipped_steps
        return result

    def restore(self) -> None:
        """Continue from the resume checkpoint: weights, optimiser, LR schedule, scaler, RNG, log."""
        saved = _load_resume(self.out)
        self.task.module.load_state_dict(saved["module"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_cpu"])
        if saved.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        start = int(saved["iteration"])
        self.state = TrainState(iteration=start, best=float(saved["extra"].get("best", -1.0)),
                                skipped_steps=int(saved["extra"].get("skipped_steps", 0)), last_saved=start)
        self.log.trim(start)
        self.reporter.note(f"{self.stage}: resuming at iteration {start} of {self.total}")

    # ------------------------------------------------------------------ one step

    def step(self, iteration: int, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
             stop: "_StopRequest") -> _StepOutcome:
        """Forward, the non-finite check, backward and update (or a skipped step), LR step."""
        state = self.state
        state.in_step = True
        images, targets = _to_device(images, targets, self.device)
        if self._begin_iteration is not None:
            self._begin_iteration(iteration)
        with _autocast(self.device, self.use_amp):
            terms = self.forward(images, targets)
        loss = sum(terms.values())
        values = {k: float(v.detach()) for k, v in terms.items()}
        self.optimizer.zero_grad(set_to_none=True)
        bad = _nonfinite(values)
        # Every rank must take the same branch (a lone rank skipping its backward would hang the rest).
        bad_anywhere, stop_anywhere = distributed.any_rank([bad is not None, stop.signal_name is not None],
                                                           self.device)
        if bad_anywhere:
            what = f"loss term {bad}" if bad is not None else "a loss term on another process"
            self._skip_or_stop(what, values[bad] if bad is not None else float("nan"), iteration)
        else:
            self._update(loss, iteration)
            self.result.final_losses = values
        self.scheduler.step()  # skipped steps keep the schedule aligned with the data order
        state.iteration, state.in_step = iteration, False
        return _StepOutcome(loss, values, len(images), bad_anywhere, stop_anywhere)

    def _update(self, loss: torch.Tensor, iteration: int) -> None:
        """Backward, the gradient-norm check (and clipping), the optimiser step."""
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # Without clipping the norm is still taken (an infinite limit scales by
        # exactly 1), so a non-finite gradient is caught either way.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], self.schedule.grad_clip or math.inf))
        if scaler is not None:
            scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
            scaler.update()
        elif not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._skip_or_stop("the gradient norm", grad_norm, iteration)
        else:
            optimizer.step()
            self.state.consecutive_skips = 0

    def _skip_or_stop(self, what: str, value: float, at: int) -> None:
        """A non-finite loss term or gradient norm at iteration `at`: stop, or skip the step."""
        state, stage = self.state, self.stage
        kept = f"last good checkpoint: {self.resume_path}" if self.resume_path.is_file() else "no checkpoint written yet"
        if self.schedule.on_nonfinite == "stop":
            raise Ds2d2Error(f"{stage}: {what} is {value} at iteration {at}; stopped ({kept}; "
                             f"--set {self.schedule_key}.on_nonfinite=skip skips such steps)")
        state.consecutive_skips += 1
        state.skipped_steps += 1
        if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise Ds2d2Error(f"{stage}: {what} is {value} at iteration {at}, the {state.consecutive_skips}th "
                             f"non-finite step in a row; the run has diverged, stopped ({kept})")
        self.log.skipped_step(at, what, value)
        self.reporter.note(f"{stage}: {what} is {value} at iteration {at}; step skipped "
                           f"({state.skipped_steps} so far)")

    def _log_step(self, iteration: int, outcome: _StepOutcome) -> None:
        """Every `log_every` iterations (and the last): the mean of each term over all processes."""
        self._window_images += outcome.images * self.world
        if not outcome.skipped and (iteration % self.schedule.log_every == 0 or iteration == self.total):
            elapsed = time.perf_counter() - self._window_start
            speed = self._window_images / elapsed if elapsed > 0 else 0.0
            logged = distributed.mean_over_ranks({"loss": float(outcome.loss.detach()), **outcome.values},
                                                 self.device)
            self.log.step({
                "iter": iteration, "epoch": (iteration - 1) // self._iters_per_epoch,
                "lr": self.optimizer.param_groups[0]["lr"], **logged, "images_per_s": round(speed, 3),
            })
            self._window_images, self._window_start = 0, time.perf_counter()
        self.progress.update(1, loss=float(outcome.loss.detach()), lr=self.optimizer.param_groups[0]["lr"])

    def _at_step_boundary(self, iteration: int, outcome: _StepOutcome, stop: "_StopRequest") -> None:
        """Evaluate and checkpoint on schedule; stop here when a signal asked for it."""
        schedule = self.schedule
        evaluate_now = self._evaluate is not None and schedule.eval_every and iteration % schedule.eval_every == 0
        if evaluate_now and iteration != self.total:
            self.evaluate(iteration)
        if iteration % schedule.checkpoint_every == 0 or iteration == self.total:
            self.checkpoint(iteration)
        if outcome.stop_requested and iteration != self.total:
            if self.state.last_saved != iteration:
                self.checkpoint(iteration)
            raise TrainingInterrupted(stop.signal_name or "SIGTERM", stop.signal_number or signal.SIGTERM,
                                      iteration, self.resume_path)

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self, iteration: int) -> dict[str, Any]:
        """Score the model during training; a new best mAP goes to `on_best`."""
        metrics = self._evaluate()
        self.task.train_mode()
        self.result.evaluations.append({"iter": iteration, **metrics})
        self.log.evaluation(iteration, metrics)
        if self._on_best is not None and metrics.get("mAP", -1.0) > self.state.best:
            self.state.best = metrics["mAP"]
            self._on_best(metrics)
        return metrics

    def checkpoint(self, at: int) -> None:
        """The resume checkpoint for iteration `at` (rank 0 writes it, atomically)."""
        if self.main:
            _save_resume(self.out, at, self.task, self.optimizer, self.scheduler, self.scaler,
                         {"best": self.state.best, "skipped_steps": self.state.skipped_steps})
        self.state.last_saved = at

    def _abort(self) -> None:
        """A second Ctrl-C: keep a consistent checkpoint and report where the run can resume."""
        state = self.state
        # Raised mid-step the weights are half-updated: keep the last checkpoint.
        if not state.in_step and state.iteration != state.last_saved:
            self.checkpoint(state.iteration)
        raise TrainingInterrupted("SIGINT", signal.SIGINT, state.last_saved or 0,
                                  self.resume_path if state.last_saved is not None else None) from None


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
    metrics_log: MetricsLog | None = None,
) -> TrainResult:
    """Train `task` (see `Trainer`); `metrics_log` lets the caller keep writing the same log afterwards."""
    return Trainer(task, dataset, schedule, out, stage=stage, device=device, schedule_key=schedule_key,
                   reporter=reporter, evaluate=evaluate, on_best=on_best, metrics_log=metrics_log).run(resume=resume)
