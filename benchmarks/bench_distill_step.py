"""Training-step cost of DS2D2 (the overhead method.md lists as an open problem).

For RetinaNet and Faster R-CNN, randomly initialised teacher/student (and an amplifier
head copied from the teacher, frozen as `DistillTask` freezes it), on random images with
random ground-truth boxes, the wall time of one optimiser step (losses + backward + grad
clip + SGD step, as `engine.train` does) for:

- `ds2d2`: `DistillTask.losses` with all four streams (explicit low/high with DISW,
  implicit full/high through the teacher head and the amplifier head);
- `student+teacher`: a plain student step (`DetectorTask`) plus one frozen teacher forward
  under no_grad: `teacher.backbone` and its head (RetinaNet: the head on every level;
  Faster R-CNN: the box head on 512 RoIs per image sampled from the proposals a training
  RPN keeps, 1000 in the authors' recipe, as the implicit stream does) -- what any teacher-based KD costs at the least;
- `fitnet`, `cwd`, `pkd`, `mgd`, `fgd`, `dist`: the study's baselines (`DistillTask` with that
  method, its reference settings for the detector family: what `ds2d2 study` trains);
- `ds2d2-dist`: DS2D2's four streams plus DIST's term;
- `student`: the plain student step alone (`none`).
- `minimum`: what DS2D2 cannot avoid without changing its losses: the plain student step, the
  teacher backbone forward, and each implicit stream's own pass (the frozen head on the
  student's features -- for the high stream on their high-frequency part -- forward and
  backward to those features, and the head on the teacher's features; Faster R-CNN: RoI
  pooling and box head on the sampled RoIs) run on the step's features. `ds2d2 / minimum`
  is the overhead the implementation adds on top of the method (the explicit streams, the
  loss arithmetic, anything done twice).
- `ds2d2-every-2`: DS2D2 with `distill.implicit_every=2` (an approximation), two steps timed
  together, one with the implicit streams and one without, reported per step.
- `ds2d2-rois-128` (Faster R-CNN): DS2D2 with `distill.implicit_rois=128` (an approximation).

Variants are interleaved (the order rotates every repeat) on the same batch and the
same student weights; times are medians after warm-up. Ratios: ds2d2 / (student+teacher)
is the overhead of the DS2D2 streams themselves, ds2d2 / student the whole price of
distilling. The main rows use the `tiny-synthetic` presets' architectures and input size
(R34-FPN64 teacher -> R18-FPN64 student, 128 px, batch 8); `--full` adds the paper's `retina-dior` / `frcnn-dior`
architectures (R101 teacher / R18 student, FPN 256, frozen BN and 3 trainable stages as
with ImageNet weights) at a reduced 512 px input and batch 2.

    python benchmarks/bench_distill_step.py --quick
    python benchmarks/bench_distill_step.py --full --threads 1
    python benchmarks/bench_distill_step.py --device cuda --quick --full --size 800   # the GPU check's call
    python benchmarks/run_all.py --only distill_step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import RunConfig, load_config  # noqa: E402
from ds2d2_cli.distill.registry import get_method  # noqa: E402
from ds2d2_cli.engine import build_optimizer  # noqa: E402
from ds2d2_cli.models.amplifier import amplifier_head  # noqa: E402
from ds2d2_cli.models.detectors import build_detector, build_resnet_body  # noqa: E402
from ds2d2_cli.stages.distill import DistillTask  # noqa: E402
from ds2d2_cli.tasks import DetectorTask  # noqa: E402

BOXES_PER_IMAGE = 50
METHOD_VARIANTS = ("ds2d2", "fitnet", "cwd", "pkd", "mgd", "fgd", "dist", "ds2d2-dist")  # DistillTask with that method
# ds2d2-every-2: distill.implicit_every=2, timed as two steps (one with the implicit streams,
# one without) and reported per step: the average cost of the approximation.
# ds2d2-rois-128 (Faster R-CNN only): distill.implicit_rois=128.
VARIANTS = (*METHOD_VARIANTS, "ds2d2-every-2", "ds2d2-rois-128", "student+teacher", "minimum", "student")
FASTER_RCNN_ONLY = ("ds2d2-rois-128",)

# (row name, preset, --set overrides, batch); "full" rows only with --full.
MAIN_CONFIGS = (
    ("retinanet tiny-synthetic", "tiny-synthetic", [], 8),
    ("faster_rcnn tiny-synthetic", "tiny-synthetic-frcnn", [], 8),
)
FULL_CONFIGS = (
    ("retinanet retina-dior@512", "retina-dior", ["input.size=512"], 2),
    ("faster_rcnn frcnn-dior@512", "frcnn-dior", ["input.size=512"], 2),
)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def random_batch(n_images: int, size: int, num_classes: int, gen: torch.Generator, device: torch.device,
                 bands: int = 3):
    """Noise images of `bands` bands with ~50 mostly small boxes each (remote-sensing-like box sizes)."""
    images, targets = [], []
    for _ in range(n_images):
        images.append(torch.rand(bands, size, size, generator=gen).to(device))
        centre = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * size
        wh = size * (0.02 + 0.2 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen).pow(2))
        wh = wh.clamp(min=4.0)
        boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1).clamp(0, size)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        labels = torch.randint(1, num_classes + 1, (BOXES_PER_IMAGE,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def _imagenet_like(config: RunConfig, weights_dir: Path) -> RunConfig:
    """Random local "backbone weights" in place of ImageNet ones (offline): same frozen BN and
    trainable stages as a pretrained run, so the step does the work the real run does."""
    updates = {}
    for role in ("teacher", "student"):
        cfg = getattr(config, role)
        if not cfg.pretrained:
            continue
        path = weights_dir / f"{cfg.backbone}.pt"
        if not path.is_file():
            body = build_resnet_body(cfg.model_copy(update={"pretrained": False, "norm": "bn"}))
            torch.save(body.state_dict(), path)
        updates[role] = cfg.model_copy(update={"pretrained": False, "backbone_weights": path})
    return config.model_copy(update=updates)


def step_fn(task, optimizer, schedule, images, targets, extra: Callable[[], object] | None = None):
    """One training step as `engine.train` runs it (fp32), optionally followed by `extra()`."""

    def step() -> None:
        terms = task.losses(images, targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], schedule.grad_clip)
        optimizer.step()
        if extra is not None:
            extra()

    return step


def teacher_forward_fn(teacher, images, targets, is_retinanet: bool, gen: torch.Generator, proposals_per_image: int):
    """Frozen teacher backbone + head under no_grad on the batch (the minimum a KD method pays)."""
    batch, tgts = teacher.transform(images, [dict(t) for t in targets])
    proposals = None
    if not is_retinanet:  # as many proposals per image as a training-mode RPN hands the RoI heads
        h, w = batch.tensors.shape[-2:]
        proposals = []
        for _ in images:
            xy = torch.rand(proposals_per_image, 2, generator=gen) * torch.tensor([w, h])
            wh = 8 + torch.rand(proposals_per_image, 2, generator=gen) * (min(h, w) / 3)
            proposals.append(torch.cat([xy, xy + wh], 1).to(batch.tensors.device))

    def forward() -> None:
        with torch.no_grad():
            features = teacher.backbone(batch.tensors)
            if is_retinanet:
                teacher.head(list(features.values()))
            else:
                heads = teacher.roi_heads
                rois, _, _, _ = heads.select_training_samples(proposals, tgts)
                pooled = heads.box_roi_pool(features, rois, batch.image_sizes)
                heads.box_predictor(heads.box_head(pooled))

    return forward


def implicit_passes_fn(task: DistillTask, images, targets):
    """Both implicit streams of `task` (ds2d2) on features computed once, outside the timing:
    the heads' forward on student and teacher features and the backward to the student's."""
    student = task.module.detector
    with torch.no_grad():
        batch, tgts = student.transform(images, [dict(t) for t in targets])
        features = student.backbone(batch.tensors)
        teacher_features = OrderedDict((k, f.float()) for k, f in
                                       task.teacher.backbone(batch.tensors.to(task.teacher_dtype)).items())
        detection = task.family.detection_step(student, batch, tgts, features)
    if task.implicit_input != "raw":
        raise SystemExit("minimum: the benchmark's presets feed raw student features to the amplifiers")

    def passes() -> None:
        inputs = OrderedDict((k, f.detach().requires_grad_()) for k, f in features.items())
        total = None
        for high in (False, True):
            s, t = task._inputs(high, inputs, teacher_features)
            head = task.amplifier_head if high else task.family.head(task.teacher)
            kd = task.family.implicit_loss(detection, task.teacher, head, s, t, task.settings)
            loss = kd["cls"] + kd["box"]
            total = loss if total is None else total + loss
        total.backward()

    return passes


def teacher_backbone_fn(task: DistillTask, images):
    batch, _ = task.teacher.transform(images, None)

    def forward() -> None:
        with torch.no_grad():
            task.teacher.backbone(batch.tensors.to(task.teacher_dtype))

    return forward


def warmup_optimizer(task, schedule):
    """The task's optimizer at a run's first (warm-up) step's lr, which keeps random models finite."""
    optimizer = build_optimizer(task.module, schedule)
    for group in optimizer.param_groups:
        group["lr"] *= schedule.warmup_ratio
    return optimizer


def time_steps(steps: dict, *, warmup: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per round of each `(task, step)` variant. The order rotates every round, so every
    variant runs in every position under the same background load; warm-up rounds are dropped."""
    sync = _sync(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            task, step = steps[name]
            task.train_mode()
            sync()
            start = time.perf_counter()
            step()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def save_record(benchmark: str, output: Path, results: dict, started: float, device: str, **options) -> dict:
    """Write `results` in the layout run_all.py writes (with this script's options) and print its summaries."""
    record = {
        "benchmark": benchmark,
        **options,
        "torch": torch.__version__,
        "device": device,
        "device_name": results["machine"].get("gpu") or
        f"{results['machine']['processor']} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 2),
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"[{benchmark}]")
    for case in results["cases"]:
        print("  " + case["summary"])
    print(f"  -> {output} ({record['wall_s']} s)")
    return record


def models_for(config: RunConfig, device: torch.device):
    """The class count, teacher, student and amplifier head every step benchmark times, seeded
    the same way so that each benchmark's variants share weights."""
    num_classes = len(get_class_set(config.data.classes))
    torch.manual_seed(0)
    teacher = build_detector(config.teacher, num_classes, config.input).to(device)
    student = build_detector(config.student, num_classes, config.input).to(device)
    return num_classes, teacher, student, amplifier_head(teacher).to(device)


def bench_config(name: str, preset: str, overrides: list[str], batch: int, *, warmup: int, repeats: int,
                 device: torch.device, weights_dir: Path) -> dict:
    config = _imagenet_like(load_config(preset, overrides), weights_dir)
    size = config.input.size
    schedule = config.train.model_copy(update={"batch_size": batch})
    num_classes, teacher, student, amp_head = models_for(config, device)
    gen = torch.Generator().manual_seed(0)

    tasks = {}
    for method in METHOD_VARIANTS:  # the same student weights; each method its own adapter and parts
        method_cfg = config.model_copy(update={"distill": config.distill.model_copy(update={"method": method})})
        tasks[method] = DistillTask(student, teacher, method_cfg, amp_head if get_method(method).needs_amplifier else None)
        tasks[method].module.to(device)
    ds2d2 = tasks["ds2d2"]
    plain = DetectorTask(student)
    images, targets = random_batch(batch, size, num_classes, gen, device, config.input.channels)
    teacher_forward = teacher_forward_fn(teacher, images, targets, config.student.detector == "retinanet", gen,
                                         config.student.rpn_post_nms_top_n_train)

    def optimizer_for(task):
        return warmup_optimizer(task, schedule)

    steps = {method: (task, step_fn(task, optimizer_for(task), schedule, images, targets))
             for method, task in tasks.items()}
    steps["student+teacher"] = (plain, step_fn(plain, optimizer_for(plain), schedule, images, targets,
                                               teacher_forward))
    steps["student"] = (plain, step_fn(plain, optimizer_for(plain), schedule, images, targets))
    teacher_backbone, passes = teacher_backbone_fn(ds2d2, images), implicit_passes_fn(ds2d2, images, targets)
    steps["minimum"] = (plain, step_fn(plain, optimizer_for(plain), schedule, images, targets,
                                       lambda: (teacher_backbone(), passes())))
    every_cfg = config.model_copy(update={"distill": config.distill.model_copy(update={"implicit_every": 2})})
    every = DistillTask(student, teacher, every_cfg, amp_head)
    every.module.to(device)
    every_step = step_fn(every, optimizer_for(every), schedule, images, targets)

    def two_steps() -> None:
        for iteration in (1, 2):
            every.begin_iteration(iteration)
            every_step()

    steps["ds2d2-every-2"] = (every, two_steps)
    frcnn = config.student.detector == "faster_rcnn"
    if frcnn:
        fewer_cfg = config.model_copy(update={"distill": config.distill.model_copy(update={"implicit_rois": 128})})
        fewer = DistillTask(student, teacher, fewer_cfg, amp_head)
        fewer.module.to(device)
        steps["ds2d2-rois-128"] = (fewer, step_fn(fewer, optimizer_for(fewer), schedule, images, targets))
    variants = [v for v in VARIANTS if frcnn or v not in FASTER_RCNN_ONLY]
    sync = _sync(device)
    times = time_steps(steps, warmup=warmup, repeats=repeats, device=device)
    times["ds2d2-every-2"] = [t / 2 for t in times["ds2d2-every-2"]]
    # Teacher forward alone (not interleaved: a small term, for the breakdown only).
    teacher_forward()
    t_teacher = []
    for _ in range(max(3, repeats // 2)):
        sync()
        start = time.perf_counter()
        teacher_forward()
        sync()
        t_teacher.append(time.perf_counter() - start)

    ds2d2.train_mode()
    terms = sorted(ds2d2.losses(images, targets))
    med = {v: statistics.median(t) for v, t in times.items()}
    ratio_kd = med["ds2d2"] / med["student+teacher"]
    ratio_student = med["ds2d2"] / med["student"]
    ratio_fitnet = med["ds2d2"] / med["fitnet"]
    ratio_minimum = med["ds2d2"] / med["minimum"]
    vs_student = {v: round(med[v] / med["student"], 3) for v in variants}
    # Per-repeat ratios (same repeat, adjacent in time) show how stable the medians are.
    paired = [a / b for a, b in zip(times["ds2d2"], times["student+teacher"])]
    return {
        "config": name,
        "preset": preset,
        "overrides": overrides,
        "detector": config.student.detector,
        "teacher": f"{config.teacher.backbone}-FPN{config.teacher.fpn_channels}",
        "student": f"{config.student.backbone}-FPN{config.student.fpn_channels}",
        "norm": "frozen_bn, 3 trainable stages" if config.student.backbone_weights else "bn, all trainable",
        "input": size,
        "batch": batch,
        "boxes_per_image": BOXES_PER_IMAGE,
        "streams": sorted(ds2d2.streams),
        "ds2d2_loss_terms": terms,
        "warmup": warmup,
        "repeats": repeats,
        "median_s": {v: round(t, 4) for v, t in med.items()},
        "teacher_forward_s": round(statistics.median(t_teacher), 4),
        "times_s": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "ratio_ds2d2_vs_student_plus_teacher": round(ratio_kd, 3),
        "ratio_ds2d2_vs_student": round(ratio_student, 3),
        "ratio_ds2d2_vs_fitnet": round(ratio_fitnet, 3),
        "ratio_ds2d2_vs_minimum": round(ratio_minimum, 3),
        "ratio_minimum_vs_student_plus_teacher": round(med["minimum"] / med["student+teacher"], 3),
        "ratio_vs_student": vs_student,
        "paired_ratio_vs_student_plus_teacher_min_max": [round(min(paired), 3), round(max(paired), 3)],
        "summary": f"{name} ({size} px, batch {batch}): student {med['student']:.3f} s; per step vs student: "
                   + ", ".join(f"{v} x{vs_student[v]:.2f}" for v in variants if v != "student")
                   + f"; ds2d2/(student+teacher) x{ratio_kd:.2f}; ds2d2/minimum x{ratio_minimum:.2f}",
    }


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _resized(name: str, overrides: list[str], batch: int, size: int | None,
             batch_override: int | None) -> tuple[str, list[str], int]:
    """A configuration at another input size and batch (`--size`, `--batch`), named accordingly."""
    if size is not None:
        overrides = [o for o in overrides if not o.startswith("input.size=")] + [f"input.size={size}"]
        name = f"{name.split('@')[0]}@{size}"
    return name, overrides, batch_override or batch


def run(quick: bool, device: str = "cpu", full: bool = False, size: int | None = None,
        batch: int | None = None, repeats: int | None = None) -> dict:
    """`size` / `batch` replace every configuration's input size and images per step, `repeats` the
    timed rounds (None: their own)."""
    dev = torch.device(device)
    warmup, default_repeats = (1, 5) if quick else (2, 11)
    main_repeats, full_repeats = repeats or default_repeats, repeats or max(3, default_repeats // 2)
    cases = []
    with tempfile.TemporaryDirectory(prefix="ds2d2-bench-") as tmp:
        for name, preset, overrides, n in MAIN_CONFIGS:
            name, overrides, n = _resized(name, overrides, n, size, batch)
            cases.append(bench_config(name, preset, overrides, n, warmup=warmup, repeats=main_repeats,
                                      device=dev, weights_dir=Path(tmp)))
        if full:
            for name, preset, overrides, n in FULL_CONFIGS:
                name, overrides, n = _resized(name, overrides, n, size, batch)
                cases.append(bench_config(name, preset, overrides, n, warmup=1, repeats=full_repeats,
                                          device=dev, weights_dir=Path(tmp)))
    return {"machine": machine_info(device), "variants": list(VARIANTS), "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="also the paper's R101->R18 FPN-256 architectures at 512 px, batch 2 (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--size", type=int, default=None,
                        help="input size in px of every configuration (default: 128 for the tiny presets, 512 "
                             "with --full; 800 is the paper presets' own)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step of every configuration (default: 8 tiny presets, 2 with --full)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds of every variant (default: 5 with --quick, else 11; --full rows half)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; 1 is steadier on a busy machine)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distill_step.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    start = time.perf_counter()
    for option in ("size", "batch", "repeats"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            parser.error(f"--{option} must be positive")
    results = run(quick=args.quick, device=args.device, full=args.full, size=args.size, batch=args.batch,
                  repeats=args.repeats)
    save_record("distill_step", args.output, results, start, args.device, quick=args.quick, full=args.full,
                size=args.size, batch=args.batch, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
