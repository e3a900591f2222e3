"""The DS2D2 training step of the authors' implementation against ours, in one process.

The authors' MMDetection 3.3 fork (their `DS2D2_RetinaNet` / `DS2D2_FasterRCNN` distillers, built
from `configs/distillation/ds2d2_retinanet_r18_fpn_2x_dior.py` / `ds2d2_faster-rcnn_r18_fpn_2x_dior.py`
with the teacher and amplifier checkpoints left out, so both are randomly initialised) is imported
and run as it is; nothing of it is copied here. Ours is `DistillTask` with the shipped presets
`retina-dior` / `frcnn-dior` (R101-FPN teacher -> R18-FPN student, DIOR's 20 classes), built as
`bench_distill_step.py` builds them (random weights, the pretrained runs' frozen BN statistics and
3 trainable backbone stages). Both sides get the same two random images (`--size`, default 512 px,
no resize on either side) and the same 8 ground-truth boxes per image, each in its own format,
fp32, one torch thread, on the same CPU.

Variants, per case, each timed once per round (the order rotates every round; one warm-up round
first, not timed):

- `theirs ds2d2`: `model.train_step(data, optim_wrapper)` of their distiller, what mmengine's
  training loop runs per iteration: `DetDataPreprocessor` (normalise, pad to 32), `loss()` (student
  detection loss, teacher features, explicit low/high, implicit full through the teacher head and
  high through the amplifier head), `parse_losses`, backward, SGD step (no gradient clipping).
- `ours ds2d2`: `DistillTask.losses` (transform, all four streams) + backward + SGD step, as
  `engine.train` runs it (`bench_distill_step.step_fn`).
- `theirs student` / `ours student`: the plain student step: their `configs/retinanet/
  retinanet_r18_fpn_2x_dior.py` / `configs/faster_rcnn/faster-rcnn_r18_fpn_2x_dior.py` (the same
  student without distillation) through `train_step`; ours `DetectorTask` (method none).
- `theirs teacher` / `ours teacher`: one teacher forward on the step's preprocessed batch, as
  each distiller runs its teacher: backbone + FPN and the teacher's own head on its features
  (RetinaNet: the head on every level; Faster R-CNN: the box head on 512 RoIs per image sampled
  by the student's RoI sampler from the same 1000 random proposals per image on both sides).
  Theirs without a no_grad block, as their `loss()` calls it (the teacher's parameters are frozen
  and its input needs no gradient, so no graph is recorded); ours under `torch.no_grad`.

Reported per case: the median of each variant's rounds, `ours / theirs` per variant per round and
the median of those paired ratios, and each side's DS2D2 step over its own floor (its student step
+ its teacher forward, per round, median).

Differences between the two sides that this benchmark cannot remove (also in the JSON, `differences`):

- the step wrapper: theirs mmengine's `DetDataPreprocessor` on uint8 BGR images and `parse_losses`
  (which logs every loss with `.item()`); ours torchvision's `GeneralizedRCNNTransform` on float
  images (a resize at scale 1);
- their optimiser holds the frozen teacher/amplifier parameters too (SGD skips them: no gradients);
- the learning rate is each side's first warm-up iteration's (theirs: the config's lr x LinearLR's
  start_factor 0.001; ours: the preset's lr scaled to batch 2 x warmup_ratio 0.001): no work changes;
- the random weights are not the same (theirs: mmdet's init for the student, PyTorch defaults for
  teacher and amplifier; ours: torchvision's, with a random backbone file). On both sides every
  backbone's batch-norm statistics are then set from the batch (`calibrate_bn`), so activations have
  a trained network's scale: with unit statistics a random R101's features grow by orders of
  magnitude, our Faster R-CNN step's explicit loss starts near 1e11 and diverges (1e25 after one
  step), the weights soon go non-finite and the step then does less work (far fewer RoIs). Loss
  values still differ from a trained run's and between the sides; denormals are flushed to zero on
  both sides for the timing;
- class outputs: our RetinaNet has 21 classification slots per anchor (torchvision's 1-based labels,
  slot 0 silenced) against their 20; our Faster R-CNN box predictor 21 x 4 deltas against their 20 x 4;
- the libraries under each (mmcv's RoIAlign and NMS, mmdet's anchor generators, assigners and
  samplers, against torchvision's) are part of what is compared: on a CPU their Faster R-CNN step
  spends much of its time in mmcv's CPU RoIAlign, which a GPU run would weigh differently.

How to run (the authors' environment, not the project's venv: there `run` returns "skipped";
`benchmarks/authors_env.sh TARGET DS2D2_SOURCE` builds it):
an environment with torch, mmcv 2.1.0 with its C++ ops built from source against that same torch
(`mmcv.ops` must import: RoIAlign, nms), mmengine 0.10, `pytorch_wavelets`, the authors' fork
installed editable (`pip install --no-deps -e DS2D2`; it provides `mmdet`), and ds2d2 importable
(installed, or PYTHONPATH=<this checkout>). With that environment's python as `$ENV/bin/python`
(on the development machine, /work/mmenv):

    $ENV/bin/python benchmarks/bench_vs_authors.py --quick          # smoke: 1 round at 256 px
    $ENV/bin/python benchmarks/bench_vs_authors.py                  # 5 rounds at 512 px, both cases
    PYTHONPATH=$PWD $ENV/bin/python benchmarks/bench_vs_authors.py --cases retina --rounds 9
    $ENV/bin/python benchmarks/run_all.py --only vs_authors

`DS2D2_AUTHORS` points to the fork's checkout (default /work/mmenv/DS2D2, else the `mmdet`
package's parent folder); its commit is read from `../PATCHES.md` beside it when recorded there.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # run from a checkout without installing; the step benchmark's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_distill_step import _imagenet_like, machine_info, save_record, step_fn, warmup_optimizer  # noqa: E402

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.models.amplifier import amplifier_head  # noqa: E402
from ds2d2_cli.models.detectors import build_detector  # noqa: E402
from ds2d2_cli.models.families import family_of  # noqa: E402
from ds2d2_cli.stages.distill import DistillTask  # noqa: E402
from ds2d2_cli.tasks import DetectorTask  # noqa: E402

BATCH = 2
BOXES_PER_IMAGE = 8
PROPOSALS_PER_IMAGE = 1000  # the authors' rpn_proposal max_per_img (frcnn-dior: rpn_post_nms_top_n_train)
EXPORTED_COMMIT = "6cce4ad8732f32cad7f3659700f91f05f2a9c0c7"  # the fork's commit this project was checked against
DEFAULT_AUTHORS = Path(os.environ.get("DS2D2_AUTHORS", "/work/mmenv/DS2D2"))
# case: (our preset, their distiller config, their plain student config), theirs relative to the fork
CASES = {
    "retina": ("retina-dior", "configs/distillation/ds2d2_retinanet_r18_fpn_2x_dior.py",
               "configs/retinanet/retinanet_r18_fpn_2x_dior.py"),
    "frcnn": ("frcnn-dior", "configs/distillation/ds2d2_faster-rcnn_r18_fpn_2x_dior.py",
              "configs/faster_rcnn/faster-rcnn_r18_fpn_2x_dior.py"),
}
SIDES = ("theirs", "ours")
PARTS = ("ds2d2", "student", "teacher")
VARIANTS = tuple(f"{side} {part}" for part in PARTS for side in SIDES)
DIFFERENCES = [
    "step wrapper: theirs mmengine train_step (DetDataPreprocessor on uint8 BGR: float cast, BGR->RGB, "
    "normalise, pad to 32; parse_losses with .item() per logged loss); ours GeneralizedRCNNTransform on float "
    "RGB in [0,1] (normalise, resize at scale 1, pad to 32)",
    "optimiser: SGD momentum 0.9, weight decay 1e-4 on both; theirs holds every parameter of the model "
    "(frozen teacher/amplifier ones get no gradient and are skipped), ours the trainable ones only",
    "learning rate: each side's first warm-up iteration (theirs config lr x 0.001; ours preset lr x 2/16 x "
    "0.001); no effect on the work done",
    "initialisation: random on both sides but not the same weights (theirs mmdet init_weights for the "
    "student, PyTorch defaults for teacher and amplifier; ours torchvision init and a random backbone file)",
    "teacher forward: theirs without torch.no_grad as their loss() runs it (frozen parameters, no graph "
    "recorded); ours under torch.no_grad as DistillTask runs it",
    "class outputs: our RetinaNet classifies 21 sigmoid slots per anchor (torchvision's 1-based labels; the "
    "unused slot 0 is silenced), theirs 20: 189 vs 180 channels in the classification conv of each level; our "
    "Faster R-CNN box predictor regresses 21 x 4 deltas (background included, torchvision), theirs 20 x 4",
    "random weights on both sides, every backbone's batch-norm running statistics set from the shared batch "
    "(calibrate_bn: activations at a trained network's scale; without it our Faster R-CNN step's explicit loss "
    "starts near 1e11 and diverges, the weights go non-finite and the step does less work); "
    "random weights give loss values unlike a trained run's (the JSON's loss_terms, one untimed call per side); "
    "denormal floats are flushed to zero on both sides for the timing, so that random activations cannot hit the "
    "CPU's slow denormal path on one side only",
    "libraries: mmcv RoIAlign/NMS and mmdet's anchor generators, assigners and samplers against torchvision's: "
    "part of what is compared",
]


def authors_available() -> str | None:
    """None when the authors' fork and mmcv's compiled ops import here, else why not."""
    try:
        importlib.import_module("mmcv")
        ops = importlib.import_module("mmcv.ops")
        ops.RoIAlign, ops.nms  # noqa: B018 -- the compiled extension, not only the Python package
        importlib.import_module("mmengine")
        importlib.import_module("mmdet")
        importlib.import_module("mmdet.models.distillation.ds2d2_retinanet")
        importlib.import_module("mmdet.models.distillation.ds2d2_faster_rcnn")
    except Exception as exc:  # ImportError, or mmcv's extension failing to load
        return (f"needs the authors' MMDetection fork (mmdet) and mmcv 2.1.0 with its compiled ops (mmcv.ops), "
                f"which this environment cannot import ({type(exc).__name__}: {exc}); run it with the "
                f"python of an environment that has them (see this file's docstring)")
    return None


def authors_root() -> Path:
    if (DEFAULT_AUTHORS / "configs" / "distillation").is_dir():
        return DEFAULT_AUTHORS
    import mmdet
    return Path(mmdet.__file__).resolve().parent.parent


def authors_commit(root: Path) -> dict:
    """The fork's commit: from its git metadata, or as recorded in PATCHES.md beside the checkout."""
    head = root / ".git" / "HEAD"
    if head.is_file():
        ref = head.read_text().strip()
        if ref.startswith("ref: ") and (root / ".git" / ref[5:]).is_file():
            ref = (root / ".git" / ref[5:]).read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", ref):
            return {"commit": ref, "source": str(head)}
    for notes in (root.parent / "PATCHES.md", root / "PATCHES.md"):
        if notes.is_file():
            match = re.search(r"commit ([0-9a-f]{40})", notes.read_text(encoding="utf-8"))
            if match:
                return {"commit": match.group(1), "source": str(notes)}
    return {"commit": EXPORTED_COMMIT, "source": "not recorded in the checkout: the exported commit, stated"}


# -- the shared batch -------------------------------------------------------------------------

def shared_batch(size: int, num_classes: int, seed: int = 0):
    """Two uint8 RGB images and 8 boxes (xyxy px) with 1-based labels per image: the one batch both sides get."""
    gen = torch.Generator().manual_seed(seed)
    images, boxes, labels = [], [], []
    for _ in range(BATCH):
        images.append(torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8))
        centre = 0.1 * size + torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * 0.8 * size
        wh = size * (0.04 + 0.2 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen))
        b = torch.cat([centre - wh / 2, centre + wh / 2], dim=1).clamp(0, size)
        boxes.append(b)
        labels.append(torch.randint(1, num_classes + 1, (BOXES_PER_IMAGE,), generator=gen))
    gen_p = torch.Generator().manual_seed(seed + 1)
    proposals = []
    for _ in range(BATCH):  # random training proposals for the Faster R-CNN teacher forward
        xy = torch.rand(PROPOSALS_PER_IMAGE, 2, generator=gen_p) * size
        wh = 8 + torch.rand(PROPOSALS_PER_IMAGE, 2, generator=gen_p) * (size / 3)
        proposals.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
    return images, boxes, labels, proposals


def calibrate_bn(backbone: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Set the running statistics of every batch-norm layer in `backbone` from `inputs` (one eval
    forward, each layer from the input it gets once the layers before it are set), so random weights
    give activations of a trained network's scale: unit-statistics buffers make a random R101's
    features grow by orders of magnitude, and a distillation loss on them overflows within a step.
    Returns how many layers were set."""
    layers = [m for m in backbone.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)
              and isinstance(getattr(m, "running_var", None), torch.Tensor)]

    def hook(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(inputs)
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    return len(layers)


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# -- theirs -----------------------------------------------------------------------------------

def _their_data(images, boxes, labels):
    """mmdet's packed inputs: uint8 BGR images, DetDataSamples with 0-based labels (as PackDetInputs makes)."""
    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes

    inputs, samples = [], []
    for i, (image, b, lab) in enumerate(zip(images, boxes, labels)):
        h, w = image.shape[-2:]
        inputs.append(image.flip(0).contiguous())  # RGB -> BGR, as LoadImageFromFile reads it
        sample = DetDataSample(metainfo=dict(img_id=i, img_path=f"random-{i}.png", ori_shape=(h, w), img_shape=(h, w),
                                             scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        sample.gt_instances = InstanceData(bboxes=HorizontalBoxes(b.clone()), labels=(lab - 1).clone())
        sample.ignored_instances = InstanceData(bboxes=HorizontalBoxes(torch.zeros(0, 4)),
                                                labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def _their_model(root: Path, config_path: str, distiller: bool, lr_factor: float):
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    if not MMLogger.check_instance_created("ds2d2_vs_authors"):  # init_weights' per-tensor INFO lines: off
        MMLogger.get_instance("ds2d2_vs_authors", log_level="WARNING")
    cfg = Config.fromfile(str(root / config_path))
    model_cfg = cfg.model
    model_cfg.backbone.init_cfg = None  # no torchvision download: random student backbone
    if distiller:  # their teacher/amplifier configs by absolute path, and no checkpoints: random weights
        model_cfg.teacher_config = str(root / model_cfg.teacher_config)
        model_cfg.amplifier_config = str(root / model_cfg.amplifier_config)
        model_cfg.teacher_weights = None
        model_cfg.amplifier_weights = None
    model = MODELS.build(model_cfg)
    model.init_weights()  # the student's own init (teacher and amplifier are marked initialised by the distiller)
    optimizer = cfg.optim_wrapper.optimizer.to_dict()
    optimizer["lr"] = optimizer["lr"] * lr_factor
    wrapper = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=optimizer))
    return cfg, model, wrapper


def _their_start_factor(cfg) -> float:
    """LinearLR's start_factor from the schedule: the lr of the first warm-up iteration."""
    for scheduler in cfg.get("param_scheduler", []):
        if scheduler.get("type") == "LinearLR":
            return float(scheduler.get("start_factor", 1.0))
    return 1.0


def _their_teacher_forward(model, data, proposals, two_stage: bool) -> Callable[[], None]:
    """Their teacher as their distiller's loss() runs it: extract_feat, then its head on its features."""
    from mmengine.structures import InstanceData
    from mmdet.models.utils import unpack_gt_instances
    from mmdet.structures.bbox import bbox2roi

    model.train()
    with torch.no_grad():
        packed = model.data_preprocessor({"inputs": list(data["inputs"]), "data_samples": data["data_samples"]},
                                         True)
    inputs, samples = packed["inputs"], packed["data_samples"]
    teacher = model.teacher
    if not two_stage:
        def forward() -> None:
            teacher.bbox_head(teacher.extract_feat(inputs))
        return forward
    gts, ignores, _ = unpack_gt_instances(samples)
    roi_head = model.roi_head  # their implicit() samples with the student's RoI head's assigner and sampler

    def forward() -> None:
        feats = teacher.extract_feat(inputs)
        drawn = []
        for i, p in enumerate(proposals):
            rpn = InstanceData(priors=p.clone())
            assigned = roi_head.bbox_assigner.assign(rpn, gts[i], ignores[i])
            drawn.append(roi_head.bbox_sampler.sample(assigned, rpn, gts[i], feats=[f[i][None] for f in feats]))
        teacher.roi_head._bbox_forward(feats, bbox2roi([d.priors for d in drawn]))

    return forward


def _their_step(model, wrapper, data) -> Callable[[], None]:
    def step() -> None:
        model.train_step({"inputs": list(data["inputs"]), "data_samples": data["data_samples"]}, wrapper)
    return step


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- ours -------------------------------------------------------------------------------------

def _our_teacher_forward(task: DistillTask, images, targets, proposals) -> Callable[[], None]:
    """Our teacher as DistillTask runs it: frozen, eval mode, no_grad, on the student's transformed batch."""
    teacher = task.teacher
    batch, tgts = task.module.detector.transform(images, [dict(t) for t in targets])
    head = family_of(teacher).head(teacher)
    two_stage = hasattr(teacher, "roi_heads")

    def forward() -> None:
        with torch.no_grad():
            features = teacher.backbone(batch.tensors.to(task.teacher_dtype))
            if not two_stage:
                head(list(features.values()))
                return
            rois, _, _, _ = head.select_training_samples([p.clone() for p in proposals], tgts)
            pooled = head.box_roi_pool(features, rois, batch.image_sizes)
            head.box_predictor(head.box_head(pooled))

    return forward


# -- one case ---------------------------------------------------------------------------------

def bench_case(case: str, size: int, rounds: int, warmup: int, weights_dir: Path, root: Path) -> dict:
    from mmengine.config import Config

    preset, their_config, their_student_config = CASES[case]
    overrides = [f"input.size={size}", f"train.batch_size={BATCH}"]
    config = _imagenet_like(load_config(preset, overrides), weights_dir)
    num_classes = len(get_class_set(config.data.classes))
    two_stage = config.student.detector == "faster_rcnn"
    images_u8, boxes, labels, proposals = shared_batch(size, num_classes)

    # ours: teacher, DS2D2 student + amplifier head, and a plain student
    schedule = config.train
    torch.manual_seed(0)
    teacher = build_detector(config.teacher, num_classes, config.input)
    student = build_detector(config.student, num_classes, config.input)
    amp = amplifier_head(teacher)
    plain_student = build_detector(config.student, num_classes, config.input)
    task = DistillTask(student, teacher, config, amp)
    plain = DetectorTask(plain_student)
    images = [im.float() / 255 for im in images_u8]
    targets = [{"boxes": b.clone(), "labels": lab.clone()} for b, lab in zip(boxes, labels)]
    ours_opt, plain_opt = warmup_optimizer(task, schedule), warmup_optimizer(plain, schedule)

    # theirs: distiller and plain student, each with its config's optimiser at the first warm-up lr
    factor = _their_start_factor(Config.fromfile(str(root / their_config)))
    torch.manual_seed(0)
    their_cfg, distiller, their_opt = _their_model(root, their_config, True, factor)
    torch.manual_seed(0)
    student_cfg, their_student, their_student_opt = _their_model(root, their_student_config, False, factor)
    data = _their_data(images_u8, boxes, labels)
    student_data = _their_data(images_u8, boxes, labels)

    modes = {
        "theirs ds2d2": distiller.train, "theirs student": their_student.train, "theirs teacher": distiller.train,
        "ours ds2d2": task.train_mode, "ours student": plain.train_mode, "ours teacher": task.train_mode,
    }
    fns = {
        "theirs ds2d2": _their_step(distiller, their_opt, data),
        "ours ds2d2": step_fn(task, ours_opt, schedule, images, targets),
        "theirs student": _their_step(their_student, their_student_opt, student_data),
        "ours student": step_fn(plain, plain_opt, schedule, images, targets),
        "theirs teacher": _their_teacher_forward(distiller, data, proposals, two_stage),
        "ours teacher": _our_teacher_forward(task, images, targets, proposals),
    }
    # what each side's step feeds its networks: the size and batch overrides on both sides
    distiller.train()
    with torch.no_grad():
        packed = {"inputs": list(data["inputs"]), "data_samples": data["data_samples"]}
        their_input = distiller.data_preprocessor(packed, True)["inputs"]
        our_input = task.module.detector.transform(images, [dict(t) for t in targets])[0].tensors
    calibrated = {  # every backbone's BN statistics from the shared batch, before anything runs
        "theirs": sum(calibrate_bn(m, their_input) for m in (distiller.teacher.backbone, distiller.backbone,
                                                             their_student.backbone)),
        "ours": sum(calibrate_bn(m, our_input.to(dtype)) for m, dtype in (
            (task.teacher.backbone.body, task.teacher_dtype), (student.backbone.body, torch.float32),
            (plain_student.backbone.body, torch.float32))),
    }
    # the loss terms each DS2D2 step computes (and that they are finite), from one untimed call each
    distiller.train()
    with torch.no_grad():
        packed = distiller.data_preprocessor({"inputs": list(data["inputs"]), "data_samples": data["data_samples"]},
                                             True)
        their_terms = distiller.loss(packed["inputs"], packed["data_samples"])
        task.train_mode()
        our_terms = task.losses(images, targets)

    def _value(v) -> float:
        return float(sum(x.sum() for x in v)) if isinstance(v, (list, tuple)) else float(v)

    names = list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            modes[name]()
            start = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)

    finite = {"theirs ds2d2": _finite(distiller), "theirs student": _finite(their_student),
              "ours ds2d2": _finite(task.module), "ours student": _finite(plain_student)}
    if not all(finite.values()):
        print(f"[vs_authors] warning: non-finite weights after timing: {finite} (the times may not be comparable)")
    med = {v: statistics.median(t) for v, t in times.items()}
    paired = {part: [o / t for o, t in zip(times[f"ours {part}"], times[f"theirs {part}"])] for part in PARTS}
    ratio = {part: round(statistics.median(p), 3) for part, p in paired.items()}
    over_floor = {side: round(statistics.median(
        d / (s + t) for d, s, t in zip(times[f"{side} ds2d2"], times[f"{side} student"], times[f"{side} teacher"])), 3)
        for side in SIDES}
    name = f"{'retinanet' if case == 'retina' else 'faster_rcnn'} {preset}@{size}"
    return {
        "config": name,
        "case": case,
        "preset": preset,
        "overrides": overrides,
        "authors_config": their_config,
        "authors_student_config": their_student_config,
        "teacher": f"{config.teacher.backbone}-FPN{config.teacher.fpn_channels}",
        "student": f"{config.student.backbone}-FPN{config.student.fpn_channels}",
        "input": size,
        "batch": BATCH,
        "boxes_per_image": BOXES_PER_IMAGE,
        "proposals_per_image_teacher_forward": PROPOSALS_PER_IMAGE if two_stage else None,
        "dtype": "float32",
        "network_input": {"theirs": list(their_input.shape), "ours": list(our_input.shape),
                          "same_pixels": bool(torch.allclose(their_input, our_input, atol=1e-4))},
        "settings": {
            "ours": {"lr": ours_opt.param_groups[0]["lr"], "grad_clip": schedule.grad_clip,
                     "weights": config.distill.weights.model_dump(include={"explicit_low", "explicit_high",
                                                                           "implicit_full", "implicit_high"}),
                     "teacher_dtype": config.distill.teacher_dtype, "implicit_input": task.implicit_input,
                     "streams": sorted(task.streams),
                     "trainable_params": {"ds2d2": _trainable(task.module), "student": _trainable(plain_student)}},
            "theirs": {"lr": their_opt.optimizer.param_groups[0]["lr"], "grad_clip": their_cfg.optim_wrapper.get(
                           "clip_grad"),
                       "dist_cfg": {k: v for k, v in their_cfg.model.dist_cfg.to_dict().items()
                                    if k.startswith("distloss_")},
                       "trainable_params": {"ds2d2": _trainable(distiller), "student": _trainable(their_student)}},
        },
        "bn_layers_calibrated": calibrated,
        "weights_finite_after_timing": finite,
        "loss_terms": {"theirs": {k: round(_value(v), 5) for k, v in their_terms.items()},
                       "ours": {k: round(float(v), 5) for k, v in our_terms.items()}},
        "warmup": warmup,
        "rounds": rounds,
        "median_s": {v: round(t, 4) for v, t in med.items()},
        "times_s": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "paired_ratio_ours_vs_theirs": ratio,
        "paired_ratios_ours_vs_theirs_per_round": {p: [round(x, 3) for x in v] for p, v in paired.items()},
        "ratio_ds2d2_vs_student_plus_teacher": over_floor,
        "summary": f"{name} (batch {BATCH}, {rounds} round(s)): "
                   + "; ".join(f"{part} theirs {med[f'theirs {part}']:.3f} s, ours {med[f'ours {part}']:.3f} s, "
                               f"ours/theirs x{ratio[part]:.2f}" for part in PARTS)
                   + f"; ds2d2/(student+teacher) theirs x{over_floor['theirs']:.2f}, ours x{over_floor['ours']:.2f}",
    }


def run(quick: bool, device: str = "cpu", rounds: int | None = None, size: int | None = None,
        cases: list[str] | None = None) -> dict:
    """Both cases (`cases` to choose), `rounds` timed rounds after one warm-up (quick: 1 round at 256 px)."""
    if device != "cpu":
        message = f"CPU only (the authors' mmcv ops here are built for the CPU), not run on {device}"
        print(f"[vs_authors] skipped: {message}")
        return {"skipped": message, "cases": [{"summary": f"skipped on {device}: {message}"}]}
    missing = authors_available()
    if missing:
        print(f"[vs_authors] skipped: {missing}")
        return {"skipped": missing, "cases": [{"summary": f"skipped: {missing}"}]}
    import mmcv
    import mmdet
    import mmengine

    size = size or (256 if quick else 512)
    rounds = rounds or (1 if quick else 5)
    cases = cases or list(CASES)
    root = authors_root()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    try:
        machine = {**machine_info(device), "mmcv": mmcv.__version__, "mmdet": mmdet.__version__,
                   "mmengine": mmengine.__version__}
        results = []
        with tempfile.TemporaryDirectory(prefix="ds2d2-bench-") as tmp:
            for case in cases:
                results.append(bench_case(case, size, rounds, 1, Path(tmp), root))
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    machine["flush_denormal"] = flushed
    return {
        "machine": machine,
        "authors": {"repo": "DS2D2 authors' MMDetection 3.3 fork", "path": str(root), **authors_commit(root),
                    "mmdet_from": str(Path(mmdet.__file__).resolve().parent)},
        "variants": list(VARIANTS),
        "differences": DIFFERENCES,
        "cases": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds after one warm-up (default 5; --quick 1)")
    parser.add_argument("--size", type=int, default=None, help="input size in px (default 512; --quick 256)")
    parser.add_argument("--cases", default="retina,frcnn", help="comma-separated: retina, frcnn (default both)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round at 256 px")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vs_authors.json")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    for option in ("rounds", "size"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option} must be positive")
    if args.size is not None and args.size % 32:
        parser.error("--size must be a multiple of 32 (their preprocessor pads to 32: the inputs would differ)")
    missing = authors_available()
    if missing:
        print(f"skipped: {missing}")
        return 0
    start = time.perf_counter()
    results = run(quick=args.quick, device="cpu", rounds=args.rounds, size=args.size, cases=cases)
    save_record("vs_authors", args.out, results, start, "cpu", quick=args.quick, rounds=args.rounds,
                size=args.size, cases=cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
