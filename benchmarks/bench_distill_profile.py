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
    python benchmarks/bench_distill_profile.py --device cuda --size 800   # what a GPU step spends
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run_all loads us by path
    sys.path.append(str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import bench_distill_step as steps  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.distill.registry import DS2D2_STREAMS  # noqa: E402
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


def _tasks(preset: str, device: torch.device, batch: int, weights_dir: Path, size: int | None = None):
    overrides = [f"input.size={size}"] if size is not None else []
    config = steps._imagenet_like(load_config(preset, overrides), weights_dir)
    schedule = config.train.model_copy(update={"batch_size": batch})
    num_classes, teacher, student, amplifier = steps.models_for(config, device)
    gen = torch.Generator().manual_seed(0)
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


def profile_family(family: str, preset: str, *, device: torch.device, repeats: int, weights_dir: Path,
                   batch: int = 8, size: int | None = None) -> dict:
    config, variants = _tasks(preset, device, batch, weights_dir, size)
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
        "batch": batch,
        "repeats": repeats,
        "streams": streams,
        "profiled": "self device time" if cuda else "self CPU time",
        "top_ops": top,
        "summary": f"{family} ({preset}, {config.input.size} px, batch {batch}): bare {bare:.2f} s; "
                   + ", ".join(f"{label.split(' (')[0]} +{s['over_bare_s']:.2f} s" for label, s in streams.items()
                               if not label.startswith("bare"))
                   + f"; top ops: {head}",
    }


def run(quick: bool, device: str = "cpu", size: int | None = None, batch: int = 8) -> dict:
    """`size` replaces the presets' 128 px (on a GPU, 800 px shows what launch overhead hides)."""
    dev = torch.device(device)
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="ds2d2-profile-") as tmp:
        cases = [profile_family(family, preset, device=dev, repeats=repeats, weights_dir=Path(tmp),
                                batch=batch, size=size)
                 for family, preset in CONFIGS]
    return {"machine": steps.machine_info(device), "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed rounds instead of 5")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--size", type=int, default=None, help="input size in px (default: the presets' 128)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distill_profile.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    for option in ("size", "batch"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            parser.error(f"--{option} must be positive")
    start = time.perf_counter()
    results = run(args.quick, args.device, args.size, args.batch)
    steps.save_record("distill_profile", args.output, results, start, args.device, quick=args.quick,
                      size=args.size, batch=args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
