"""Where a DS2D2 step's time goes: stream by stream, and op by op (torch.profiler).

For each detector family on its demo preset (the `tiny-synthetic` architectures, 128 px,
batch 8; randomly initialised models and random boxes as in `bench_distill_step.py`):

- streams: the step with no DS2D2 term (the student's detection loss plus the teacher
  backbone forward DistillTask always runs), with the explicit streams only, with each
  implicit stream alone, and with all four, in turns on the same batch and weights (medians).
  Each stream's cost is its step minus the bare step.
- ops: the full step (all four streams) under `torch.profiler`, the operators with the most
  self time (CPU time on CPU; CUDA kernel time as well on a GPU), and their share of it.

    OMP_NUM_THREADS=1 python benchmarks/run_all.py --only distill_profile [--quick] [--device cuda]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run_all loads us by path
    sys.path.append(str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import bench_distill_step as steps  # noqa: E402
from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.distill.registry import DS2D2_STREAMS  # noqa: E402
from ds2d2_cli.models.amplifier import amplifier_head  # noqa: E402
from ds2d2_cli.models.detectors import build_detector  # noqa: E402
from ds2d2_cli.stages.distill import DistillTask  # noqa: E402

CONFIGS = (("retinanet", "tiny-synthetic"), ("faster_rcnn", "tiny-synthetic-frcnn"))
STREAM_SETS = {
    "bare (detection + teacher backbone)": (),
    "explicit low + high": ("explicit-low", "explicit-high"),
    "implicit full": ("implicit-full",),
    "implicit high": ("implicit-high",),
    "all four (ds2d2)": DS2D2_STREAMS,
}
TOP_OPS = 15


def _tasks(preset: str, device: torch.device, batch: int, weights_dir: Path):
    config = steps._imagenet_like(load_config(preset), weights_dir)
    num_classes = len(get_class_set(config.data.classes))
    schedule = config.train.model_copy(update={"batch_size": batch})
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    teacher = build_detector(config.teacher, num_classes, config.input).to(device)
    student = build_detector(config.student, num_classes, config.input).to(device)
    amplifier = amplifier_head(teacher).to(device)
    images, targets = steps.random_batch(batch, config.input.size, num_classes, gen, device, config.input.channels)
    out = {}
    for label, streams in STREAM_SETS.items():
        distill = config.distill.model_copy(update={"method": "ds2d2", "streams": streams or ("explicit-low",)})
        task = DistillTask(student, teacher, config.model_copy(update={"distill": distill}), amplifier)
        if not streams:  # the step DistillTask runs before any term: detection loss + teacher backbone
            task.terms = []
        task.module.to(device)
        optimizer = steps.warmup_optimizer(task, schedule)
        out[label] = (task, steps.step_fn(task, optimizer, schedule, images, targets))
    return config, out


def profile_family(family: str, preset: str, *, device: torch.device, repeats: int, weights_dir: Path) -> dict:
    config, variants = _tasks(preset, device, 8, weights_dir)
    sync = steps._sync(device)
    times = steps.time_steps(variants, warmup=1, repeats=repeats, device=device)
    med = {label: statistics.median(t) for label, t in times.items()}
    bare = med["bare (detection + teacher backbone)"]

    task, step = variants["all four (ds2d2)"]
    task.train_mode()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    averages = prof.key_averages()
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in averages) or 1.0
    ops = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:TOP_OPS]
    top = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 1),
            "share": round(getattr(e, key) / total, 3)} for e in ops]
    streams = {label: {"step_s": round(t, 4), "over_bare_s": round(t - bare, 4), "vs_bare": round(t / bare, 3)}
               for label, t in med.items()}
    head = ", ".join(f"{o['op']} {o['share']:.0%}" for o in top[:4])
    return {
        "case": f"{family} {preset}",
        "family": family,
        "preset": preset,
        "input": config.input.size,
        "batch": 8,
        "repeats": repeats,
        "streams": streams,
        "profiled": "self device time" if cuda else "self CPU time",
        "top_ops": top,
        "summary": f"{family} ({preset}): bare {bare:.2f} s; "
                   + ", ".join(f"{label.split(' (')[0]} +{s['over_bare_s']:.2f} s" for label, s in streams.items()
                               if not label.startswith("bare"))
                   + f"; top ops: {head}",
    }


def run(quick: bool, device: str = "cpu") -> dict:
    dev = torch.device(device)
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="ds2d2-profile-") as tmp:
        cases = [profile_family(family, preset, device=dev, repeats=repeats, weights_dir=Path(tmp))
                 for family, preset in CONFIGS]
    return {"machine": steps.machine_info(device), "cases": cases}
