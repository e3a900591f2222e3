"""`distill`: the student trained with its detection loss plus the DS2D2 streams.

The student's torchvision forward pass is spelled out step by step (transform,
backbone+FPN, head / RPN+RoI heads) so the same features feed both its own detection
loss and the distillation losses, without hooks or monkey-patching. The teacher (and
amplifier) run frozen, in eval mode and without autograd, on the student's transformed
input batch, so boxes, features and DISW maps all share one coordinate frame.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ds2d2_cli import distributed
from ds2d2_cli.checkpoint import Checkpoint, lineage, load_checkpoint, meta_for
from ds2d2_cli.config import RunConfig
from ds2d2_cli.distill import Adapter, high_frequency
from ds2d2_cli.distill.registry import NEEDS_ADAPTER, NEEDS_ALIGNED, NEEDS_AMPLIFIER, NEEDS_IMPLICIT, PARTS
from ds2d2_cli.distill.registry import DistillStep, active_terms, get_method
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import read_json, write_json
from ds2d2_cli.models.amplifier import load_head
from ds2d2_cli.models.detectors import build_detector, model_from_checkpoint
from ds2d2_cli.models.families import family_of
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.stages.common import check_weights_fit, load_init_student, load_stage_data, load_teacher, seed_everything
from ds2d2_cli.stages.runner import StageResult, prepare_stage, run_stage
from ds2d2_cli.tasks import DetectorTask


class Student(nn.Module):
    """What the optimiser trains and `--resume` restores: the student, its adapter and the
    method's own trainable parts (MGD's generators, FGD's context blocks)."""

    def __init__(self, detector: nn.Module, adapter: nn.Module | None, parts: nn.ModuleDict | None = None):
        super().__init__()
        self.detector = detector
        self.adapter = adapter
        self.parts = parts

    def distill_parts(self) -> dict[str, Tensor]:
        """What trains beside the detector: saved with the run, never exported."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("detector.")}


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def needs_teacher(config: RunConfig) -> bool:
    """Whether a student run with these settings reads a teacher: its method's terms (the registry
    decides), or its start (`distill.init_student_from_teacher`, also for the baseline)."""
    return get_method(config.distill.method).needs_teacher or config.distill.init_student_from_teacher


def needs_amplifier(config: RunConfig) -> bool:
    """Whether one of its active terms reads the teacher's high-frequency amplifier."""
    terms = active_terms(get_method(config.distill.method), config.distill.streams)
    return any(NEEDS_AMPLIFIER in term.needs for term in terms)


class DistillTask:
    """Detection loss + the chosen method's weighted terms (`distill.registry`), each returned
    separately for the log."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: RunConfig,
                 amplifier_head: nn.Module | None = None):
        self.settings = config.distill
        self.family = family_of(student)
        self.oriented = bool(self.family.oriented)  # DISW / FGD masks from the rotated boxes
        method = get_method(config.distill.method)
        self.terms = active_terms(method, config.distill.streams, has_amplifier=amplifier_head is not None)
        self.streams = {t.name for t in self.terms} if method.ablatable else set()
        needs = set().union(*(t.needs for t in self.terms))
        student_channels, teacher_channels = student.backbone.out_channels, teacher.backbone.out_channels
        self.uses_implicit = NEEDS_IMPLICIT in needs
        # The authors feed the student's raw features to the amplifiers; a student FPN of
        # another width cannot enter the teacher's head, so then the adapter bridges it.
        self.implicit_input = config.distill.implicit_input
        self.implicit_input_note = None
        if self.uses_implicit and self.implicit_input == "raw" and student_channels != teacher_channels:
            self.implicit_input = "adapted"
            self.implicit_input_note = (f"the student FPN has {student_channels} channels and the teacher's "
                                        f"{teacher_channels}: the implicit streams read the adapter's output")
        self.same_width = student_channels == teacher_channels
        needs_adapter = (NEEDS_ADAPTER in needs or (self.uses_implicit and self.implicit_input == "adapted")
                         or (NEEDS_ALIGNED in needs and not self.same_width))
        adapter = Adapter(student_channels, teacher_channels) if needs_adapter else None
        wanted_parts = list(dict.fromkeys(t.parts for t in self.terms if t.parts is not None))
        parts = None
        if wanted_parts:
            level_names = _level_names(teacher)
            parts = nn.ModuleDict({name: PARTS[name](teacher_channels, level_names, config.distill)
                                   for name in wanted_parts})
        self.module = Student(student, adapter, parts)
        self.teacher = _frozen(teacher)
        self.amplifier_head = _frozen(amplifier_head) if NEEDS_AMPLIFIER in needs else None
        # The teacher backbone only extracts features (no gradient): it may run in half precision.
        # The heads stay float32, since the implicit streams backpropagate through them.
        self.teacher_dtype = getattr(torch, config.distill.teacher_dtype)
        self.teacher.backbone.to(self.teacher_dtype)
        self.implicit_every = config.distill.implicit_every
        self.iteration: int | None = None  # the engine's, through begin_iteration

    def begin_iteration(self, iteration: int) -> None:
        """The engine's 1-based iteration, before each step: `distill.implicit_every` keys on it,
        so a resumed run thins the same steps as an uninterrupted one."""
        self.iteration = iteration

    def _implicit_scale(self) -> float:
        """0 on the steps `implicit_every` skips, else the factor that keeps their average weight
        (1 at the paper's setting; outside a training loop every call is an implicit step)."""
        k = self.implicit_every
        if k == 1:
            return 1.0
        if self.iteration is not None and (self.iteration - 1) % k:
            return 0.0
        return float(k)

    def train_mode(self) -> None:
        self.module.train()
        self.teacher.eval()
        if self.amplifier_head is not None:
            self.amplifier_head.eval()

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        student = self.module.detector
        batch, targets = student.transform(images, targets)
        features = student.backbone(batch.tensors)
        with torch.no_grad():
            teacher_features = self.teacher.backbone(batch.tensors.to(self.teacher_dtype))
            if self.teacher_dtype != torch.float32:
                teacher_features = OrderedDict((k, f.float()) for k, f in teacher_features.items())
        adapter = self.module.adapter
        adapted = OrderedDict((name, adapter(f)) for name, f in features.items()) if adapter is not None else None
        detection = self.family.detection_step(student, batch, targets, features)
        terms = detection.terms

        def implicit(high: bool) -> dict[str, Tensor]:
            s, t = self._inputs(high, step.implicit_features, teacher_features)
            head = self.amplifier_head if high else self.family.head(self.teacher)
            return self.family.implicit_loss(detection, self.teacher, head, s, t, self.settings)

        step = DistillStep(
            student_features=features, teacher_features=teacher_features, adapted=adapted,
            implicit_features=adapted if self.implicit_input == "adapted" else features,
            boxes=[t["boxes"] for t in targets], input_hw=tuple(batch.tensors.shape[-2:]),
            rboxes=[t["rboxes"] for t in targets] if self.oriented else None,
            settings=self.settings, implicit=implicit,
            predictions=lambda: self.family.prediction_pair(detection, self.teacher, teacher_features),
            aligned=features if self.same_width else adapted,
            image_sizes=[tuple(size) for size in batch.image_sizes],
            parts=dict(self.module.parts.items()) if self.module.parts is not None else {},
        )
        weights = self.settings.weights
        implicit_scale = self._implicit_scale()
        for term in self.terms:
            weight = getattr(weights, term.weight)
            if term.implicit and implicit_scale != 1.0:
                if implicit_scale == 0.0:  # a thinned step: no head passes, zeros in the log
                    terms.update({name: features[next(iter(features))].new_zeros(()) for name in term.outputs})
                    continue
                weight = weight * implicit_scale
            for name, value in term.compute(step).items():
                terms[name] = weight * value
        return terms

    def _inputs(self, high: bool, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]):
        if not high:
            return student_features, teacher_features
        wavelet = self.settings.wavelet
        with torch.no_grad():
            teacher_hf = OrderedDict((k, high_frequency(f, wavelet)) for k, f in teacher_features.items())
        return OrderedDict((k, high_frequency(f, wavelet)) for k, f in student_features.items()), teacher_hf


def _level_names(detector: nn.Module) -> list[str]:
    """The FPN's level names, finest first, from a forward pass on a small blank input of the
    detector's bands (in eval mode: batch-norm statistics must not see it)."""
    parameter = next(detector.backbone.parameters())
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            bands = len(detector.transform.image_mean)
            probe = torch.zeros((1, bands, 64, 64), device=parameter.device, dtype=parameter.dtype)
            return list(detector.backbone(probe))
    finally:
        detector.train(was_training)


def _load_amplifier(path: Path, teacher: Checkpoint, teacher_model: nn.Module) -> nn.Module:
    checkpoint = load_checkpoint(path, "amplifier", option="--amplifier")
    if checkpoint.meta.teacher_sha256 != teacher.sha256:
        raise InputError(
            f"this amplifier was trained for another teacher (sha256 {str(checkpoint.meta.teacher_sha256)[:12]}..., "
            f"--teacher is {teacher.sha256[:12]}...); train one with `ds2d2 train-amplifier --teacher {teacher.path}`",
            path,
        )
    return load_head(teacher_model, checkpoint.tensors, path)


# The backbone body stays the student's own: FGD's `init_student` skips the teacher's `backbone.`
# (MMDetection's backbone = torchvision's backbone.body; its neck, the FPN, is copied).
TEACHER_INIT_SKIPPED = "backbone.body."
INIT_STUDENT_RECORD = "init_student.json"  # the run folder's record of --init-student, read by --resume


def teacher_init_names(teacher: dict[str, Tensor], student: dict[str, Tensor]) -> list[str]:
    """The teacher tensors `distill.init_student_from_teacher` copies into the student: every one
    outside the backbone body whose name and shape the student has, as FGD's `init_student` does
    (yzd-v/FGD, mmdet/distillation/distillers/detection_distiller.py: the teacher checkpoint's state
    dict without `backbone.*` loaded non-strictly, so tensors of another shape stay the student's)."""
    return [name for name, value in teacher.items()
            if not name.startswith(TEACHER_INIT_SKIPPED) and name in student
            and tuple(student[name].shape) == tuple(value.shape)]


def _init_student_lineage(init_student: Path | None, out: Path, resume: bool, config: RunConfig,
                          classes: list[str], data_path: Path) -> tuple[Checkpoint | None, dict[str, Any] | None]:
    """The `--init-student` checkpoint (fresh runs) and the lineage the run records. A resumed run
    reads the lineage from its folder, so `--resume` needs no `--init-student`; given, it must be
    the same file (by hash) the run started from."""
    checkpoint = load_init_student(init_student, config, classes, data_path) if init_student is not None else None
    if not resume:
        return checkpoint, lineage(checkpoint) if checkpoint is not None else None
    record = Path(out) / INIT_STUDENT_RECORD
    recorded = read_json(record) if record.is_file() else None
    if checkpoint is not None:
        if recorded is None:
            raise InputError("--resume with --init-student: this run did not start from a student "
                             "(drop --init-student)", out)
        if recorded.get("sha256") != checkpoint.sha256:
            raise InputError(f"--resume with --init-student: this run started from another student (sha256 "
                             f"{str(recorded.get('sha256'))[:12]}..., --init-student is {checkpoint.sha256[:12]}...)",
                             init_student)
    return None, recorded


def distill(
    config: RunConfig,
    *,
    out: Path,
    teacher: Path | None = None,
    amplifier: Path | None = None,
    init_student: Path | None = None,
    data_dir: Path | None = None,
    preset: str = "",
    device: torch.device | str = "cpu",
    resume: bool = False,
    reporter: Reporter | None = None,
) -> StageResult:
    """Train `config.student` with `config.distill.method` (ds2d2, fitnet, or none = the baseline).

    `init_student`: a student checkpoint whose detector weights start this student (optimizer and
    schedule fresh; a fresh run only), recorded as its lineage in the new checkpoint's metadata."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    method = config.distill.method
    chosen = get_method(method)
    data = load_stage_data(config, data_dir)
    config = data.config  # classes resolved: the run records the list
    if chosen.needs_teacher and teacher is None:
        raise InputError(f"--method {method} needs --teacher T.safetensors (or use --method none for the baseline)")
    from_teacher = config.distill.init_student_from_teacher
    if from_teacher and teacher is None:
        raise InputError("distill.init_student_from_teacher copies the teacher's neck and heads: it needs "
                         "--teacher T.safetensors")
    if teacher is not None and not needs_teacher(config):
        reporter.note(f"--teacher is not used by this run (method {method}, no distill.init_student_from_teacher)")
    # With method none and a start from the teacher, the teacher's tensors are read, never run.
    teacher_ckpt = load_teacher(teacher, config, data.classes, data.train.path) if needs_teacher(config) else None
    teacher_model = model_from_checkpoint(teacher_ckpt, device) if chosen.needs_teacher else None
    amplifier_head = None
    wanted = active_terms(chosen, config.distill.streams)
    if any(NEEDS_AMPLIFIER in term.needs for term in wanted):
        if amplifier is None and not active_terms(chosen, config.distill.streams, has_amplifier=False):
            raise InputError("--streams implicit-high needs --amplifier A.safetensors (without it no stream is "
                             "left and the run would be the undistilled baseline)")
        if amplifier is None:
            reporter.note("no --amplifier: the implicit high-frequency stream is off for this run")
        else:
            amplifier_head = _load_amplifier(amplifier, teacher_ckpt, teacher_model).to(device)
    elif amplifier is not None:
        reporter.note(f"--amplifier is not used by this run (method {method}, streams {', '.join(config.distill.streams)})")
    running = active_terms(chosen, config.distill.streams, has_amplifier=amplifier is not None)
    if config.distill.implicit_every != 1 and not any(term.implicit for term in running):
        raise InputError(f"distill.implicit_every={config.distill.implicit_every} thins the implicit streams, and "
                         f"this run has none (method {method}, streams {', '.join(config.distill.streams)}); "
                         "leave it at 1")
    if config.distill.implicit_rois is not None and (config.student.detector != "faster_rcnn"
                                                     or not any(term.implicit for term in running)):
        raise InputError(f"distill.implicit_rois={config.distill.implicit_rois} thins the RoIs of Faster R-CNN's "
                         f"implicit streams, and this run has none (student {config.student.detector}, method "
                         f"{method}, streams {', '.join(config.distill.streams)}); leave it unset")
    if from_teacher and init_student is not None:
        raise InputError("--init-student and distill.init_student_from_teacher both set the student's start; "
                         "choose one")
    init_ckpt, init_lineage = _init_student_lineage(init_student, out, resume, config, data.classes,
                                                    data.train.path)
    # Built before the run folder is made, so a start that does not fit leaves nothing behind.
    seed_everything(config.schedule("student").seed)
    student = build_detector(config.student, len(data.classes), config.input).to(device)
    student_state = student.state_dict()
    copied: list[str] = []
    if init_ckpt is not None:
        check_weights_fit(init_ckpt.tensors, student_state, init_ckpt.path, "--init-student")
    if from_teacher:
        copied = teacher_init_names(teacher_ckpt.tensors, student_state)
    prepare_stage(config, out, resume)
    if not resume:  # a resumed run restores its own weights
        record = Path(out) / INIT_STUDENT_RECORD
        if distributed.is_main():  # a fresh run's own record, or none (not one a failed start left)
            record.unlink(missing_ok=True)
        if init_ckpt is not None:
            student.load_state_dict(init_ckpt.tensors, strict=True)
            if distributed.is_main():
                write_json(record, init_lineage, indent=2)
            reporter.note(f"distill: the student starts from {init_ckpt.path} (sha256 {init_ckpt.sha256[:12]}..., "
                          f"method {init_ckpt.meta.method})")
        if from_teacher:
            student.load_state_dict({k: teacher_ckpt.tensors[k] for k in copied}, strict=False)
            narrower = (f"; the student's FPN ({config.student.fpn_channels} channels) is not the teacher's "
                        f"({teacher_ckpt.meta.model.fpn_channels}), so only tensors of that width match"
                        if config.student.fpn_channels != teacher_ckpt.meta.model.fpn_channels else "")
            reporter.note(f"distill: {len(copied)} tensors copied from the teacher (init_student_from_teacher): "
                          f"{', '.join(copied) or '-'}{narrower}")
    if teacher_model is None:
        task: Any = DetectorTask(student)
        detector = student
    else:
        task = DistillTask(student, teacher_model, config, amplifier_head)
        task.module.to(device)
        detector = task.module.detector
        if chosen.ablatable:
            reporter.note(f"distill: method {method}, streams {', '.join(sorted(task.streams)) or '-'}"
                          f", DISW {'on' if config.distill.disw else 'off'}, wavelet {config.distill.wavelet}")
        else:
            reporter.note(f"distill: method {method}, terms {', '.join(t.name for t in task.terms)}")
        if task.implicit_input_note:
            reporter.note(task.implicit_input_note)
    extra = {"method": method, "teacher_sha256": teacher_ckpt.sha256 if teacher_ckpt else None,
             "init_student": init_lineage}
    active = sorted(task.streams) if isinstance(task, DistillTask) else []
    implicit_input = task.implicit_input if isinstance(task, DistillTask) and task.uses_implicit else None
    parts = task.module.distill_parts if isinstance(task, DistillTask) and task.module.distill_parts() else None
    return run_stage(
        task=task, scored=detector, weights=detector.state_dict, side_weights=parts,
        meta=lambda metrics: meta_for("student", config, "student", data.classes, preset, metrics=metrics, **extra),
        config=config, data=data, out=out, stage="student", device=device, resume=resume, reporter=reporter,
        extra_summary={"method": method, "streams": active, "disw": config.distill.disw,
                       "implicit_input": implicit_input,
                       "implicit_input_note": getattr(task, "implicit_input_note", None),
                       "wavelet": config.distill.wavelet, "implicit_every": config.distill.implicit_every,
                       "implicit_rois": config.distill.implicit_rois,
                       "teacher": str(teacher) if teacher else None,
                       "amplifier": str(amplifier) if amplifier_head is not None else None,
                       "init_student": init_lineage,
                       "init_from_teacher": copied if from_teacher else None},
    )
