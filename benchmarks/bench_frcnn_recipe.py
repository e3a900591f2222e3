"""What the Faster R-CNN recipe settings cost per DS2D2 training step (README, "Faithful to the
authors' code").

The authors' recipe (1000 proposals per image in training, RoIAlign with adaptive sampling and
half-pixel alignment, each implicit stream drawing its own RoIs) against each setting turned
back to what ds2d2 did before it (torchvision's 2000 proposals, sampling ratio 2, legacy
alignment, one RoI draw shared by both streams) and all four at once. One optimiser step of
`DistillTask` (all four DS2D2 streams, fp32) as `bench_distill_step.py` times it: randomly
initialised teacher, student and amplifier head built from the preset with the setting
changed (same seed, so the same weights), the same random batch, variants interleaved,
medians after warm-up; the ratios are medians of each round's ratio to the authors' step.
The parts a setting touches are also timed alone (interleaved medians, steadier than whole
steps on a busy machine): the box head's RoIAlign forward + backward on one RoI draw, and
the training RPN with one RoI draw from the proposals it keeps.
Random RPNs keep about as many proposals as they are allowed, which is where the proposal
count costs most.

    python benchmarks/bench_frcnn_recipe.py --quick --threads 1
    python benchmarks/bench_frcnn_recipe.py --full --threads 1    # + frcnn-dior's R101 -> R18 at 512 px
    python benchmarks/run_all.py --only frcnn_recipe
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # run from a checkout without installing; the step benchmark's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import interleaved_medians  # noqa: E402
from bench_distill_step import (  # noqa: E402
    _imagenet_like, machine_info, random_batch, save_record, step_fn, time_steps, warmup_optimizer,
)

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.distill.implicit import sample_rois  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.models.amplifier import amplifier_head  # noqa: E402
from ds2d2_cli.models.detectors import build_detector  # noqa: E402
from ds2d2_cli.stages.distill import DistillTask  # noqa: E402

BEFORE = {"proposals": "rpn_post_nms_top_n_train=2000", "sampling": "roi_sampling_ratio=2",
          "aligned": "roi_aligned=false"}
# (variant, --set overrides on top of the preset); model settings go to teacher and student.
VARIANTS = (
    ("authors", []),
    ("2000 proposals", [f"{role}.{BEFORE['proposals']}" for role in ("teacher", "student")]),
    ("sampling ratio 2", [f"{role}.{BEFORE['sampling']}" for role in ("teacher", "student")]),
    ("not aligned", [f"{role}.{BEFORE['aligned']}" for role in ("teacher", "student")]),
    ("shared draw", ["distill.implicit_roi_draw=shared"]),
    ("all as before", [f"{role}.{v}" for role in ("teacher", "student") for v in BEFORE.values()]
     + ["distill.implicit_roi_draw=shared"]),
)
MAIN_CONFIGS = (("faster_rcnn tiny-synthetic", "tiny-synthetic-frcnn", [], 8),)
FULL_CONFIGS = (("faster_rcnn frcnn-dior@512", "frcnn-dior", ["input.size=512"], 2),)


def _variant(preset: str, overrides: list[str], extra: list[str], weights_dir: Path, num_classes: int,
             device: torch.device):
    config = _imagenet_like(load_config(preset, [*overrides, *extra]), weights_dir)
    torch.manual_seed(0)  # every variant starts from the same weights
    teacher = build_detector(config.teacher, num_classes, config.input).to(device)
    student = build_detector(config.student, num_classes, config.input).to(device)
    task = DistillTask(student, teacher, config, amplifier_head(teacher).to(device))
    task.module.to(device)
    return config, task


def _proposals_per_image(task: DistillTask, images, targets) -> float:
    """Mean proposals the student's RPN hands its RoI head in training on this batch."""
    student = task.module.detector
    task.train_mode()
    with torch.no_grad():
        batch, tgts = student.transform(images, [dict(t) for t in targets])
        proposals, _ = student.rpn(batch, student.backbone(batch.tensors), tgts)
    return statistics.mean(p.shape[0] for p in proposals)


def _components(task: DistillTask, images, targets) -> dict[str, Callable[[], object]]:
    """The parts of a step the settings touch, on the student: `roi_align` is the box head's
    pooler forward + backward on one RoI draw (a step runs it for the student's own loss and
    both amplifiers), `proposals` the training RPN (NMS, the kept proposals) and one RoI draw
    from what it keeps."""
    student = task.module.detector
    task.train_mode()
    batch, tgts = student.transform(images, [dict(t) for t in targets])
    with torch.no_grad():
        features = student.backbone(batch.tensors)
        proposals, _ = student.rpn(batch, features, tgts)
    rois = sample_rois(student.roi_heads, proposals, tgts)
    leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in features.items())

    def roi_align() -> None:
        student.roi_heads.box_roi_pool(leaves, rois, batch.image_sizes).sum().backward()

    def propose() -> None:
        with torch.no_grad():
            kept, _ = student.rpn(batch, features, tgts)
            sample_rois(student.roi_heads, kept, tgts)

    return {"roi_align": roi_align, "proposals": propose}


def bench_config(name: str, preset: str, overrides: list[str], batch: int, *, warmup: int, repeats: int,
                 device: torch.device, weights_dir: Path) -> dict:
    base = load_config(preset, overrides)
    num_classes = len(get_class_set(base.data.classes))
    gen = torch.Generator().manual_seed(0)
    images, targets = random_batch(batch, base.input.size, num_classes, gen, device, base.input.channels)
    steps, proposals = {}, {}
    for variant, extra in VARIANTS:
        config, task = _variant(preset, overrides, extra, weights_dir, num_classes, device)
        schedule = config.train.model_copy(update={"batch_size": batch})
        optimizer = warmup_optimizer(task, schedule)
        proposals[variant] = _proposals_per_image(task, images, targets)
        steps[variant] = (task, step_fn(task, optimizer, schedule, images, targets))
    names = [v for v, _ in VARIANTS]
    times = time_steps({v: steps[v] for v in names}, warmup=warmup, repeats=repeats, device=device)
    parts = {v: _components(steps[v][0], images, targets) for v in names}
    component = {  # interleaved medians, ms: each part for the variants that change it
        "roi_align": {v: parts[v]["roi_align"] for v in ("authors", "sampling ratio 2", "not aligned")},
        "proposals": {v: parts[v]["proposals"] for v in ("authors", "2000 proposals")},
    }
    component_ms = {part: {v: round(1000 * t, 2) for v, t in interleaved_medians(fns, 4 * repeats, device.type).items()}
                    for part, fns in component.items()}
    med = {v: statistics.median(t) for v, t in times.items()}
    # Each round's ratio to the authors' step of the same round (adjacent in time), then the
    # median: steadier than a ratio of medians on a machine whose load drifts.
    vs_authors = {v: round(statistics.median(a / b for a, b in zip(times[v], times["authors"])), 3) for v in names}
    return {
        "config": name, "preset": preset, "overrides": overrides, "input": base.input.size, "batch": batch,
        "variants": {v: extra for v, extra in VARIANTS},
        "warmup": warmup, "repeats": repeats,
        "proposals_per_image": {v: round(p, 1) for v, p in proposals.items()},
        "component_ms": component_ms,
        "median_s": {v: round(t, 4) for v, t in med.items()},
        "times_s": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "paired_ratio_vs_authors": vs_authors,
        "ratio_of_medians_vs_authors": {v: round(med[v] / med["authors"], 3) for v in names},
        "summary": f"{name} ({base.input.size} px, batch {batch}): DS2D2 step with the authors' recipe "
                   f"{med['authors']:.3f} s; vs it: "
                   + ", ".join(f"{v} x{vs_authors[v]:.2f}" for v in names if v != "authors")
                   + "; " + "; ".join(f"{part} " + ", ".join(f"{v} {t} ms" for v, t in ms.items())
                                      for part, ms in component_ms.items()),
    }


def run(quick: bool, device: str = "cpu", full: bool = False) -> dict:
    dev = torch.device(device)
    warmup, repeats = (1, 5) if quick else (2, 9)
    cases = []
    with tempfile.TemporaryDirectory(prefix="ds2d2-bench-") as tmp:
        for name, preset, overrides, batch in MAIN_CONFIGS:
            cases.append(bench_config(name, preset, overrides, batch, warmup=warmup, repeats=repeats,
                                      device=dev, weights_dir=Path(tmp)))
        for name, preset, overrides, batch in FULL_CONFIGS if full else ():
            cases.append(bench_config(name, preset, overrides, batch, warmup=1, repeats=max(3, repeats // 2),
                                      device=dev, weights_dir=Path(tmp)))
    return {"machine": machine_info(device), "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="also frcnn-dior's R101 -> R18 FPN-256 at 512 px, batch 2 (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "frcnn_recipe.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    start = time.perf_counter()
    results = run(quick=args.quick, device=args.device, full=args.full)
    save_record("frcnn_recipe", args.output, results, start, args.device, quick=args.quick, full=args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
