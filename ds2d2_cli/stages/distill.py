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
from torchvision.models.detection import RetinaNet

from ds2d2_cli.checkpoint import Checkpoint, load_checkpoint, meta_for
from ds2d2_cli.config import RunConfig
from ds2d2_cli.distill import Adapter, explicit_losses, faster_rcnn_implicit_loss, fitnet_loss, high_frequency
from ds2d2_cli.distill import retinanet_implicit_loss
from ds2d2_cli.distill.implicit import sample_rois
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.amplifier import load_head
from ds2d2_cli.models.detectors import build_detector
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.stages.common import (
    load_stage_data, load_teacher, model_from_checkpoint, seed_everything, with_data_root,
)
from ds2d2_cli.stages.runner import StageResult, prepare_stage, run_stage
from ds2d2_cli.stages.teacher import DetectorTask


class Student(nn.Module):
    """What the optimiser trains and `--resume` restores: the student and its adapter."""

    def __init__(self, detector: nn.Module, adapter: nn.Module | None):
        super().__init__()
        self.detector = detector
        self.adapter = adapter


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


class DistillTask:
    """Detection loss + weighted DS2D2 (or FitNet) terms, each returned separately for the log."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: RunConfig,
                 amplifier_head: nn.Module | None = None):
        self.settings = config.distill
        self.streams = set(config.distill.streams)
        if amplifier_head is None:
            self.streams.discard("implicit-high")
        student_channels, teacher_channels = student.backbone.out_channels, teacher.backbone.out_channels
        self.uses_implicit = uses_implicit = (
            config.distill.method == "ds2d2" and bool(self.streams & {"implicit-full", "implicit-high"}))
        uses_explicit = config.distill.method == "ds2d2" and bool(self.streams & {"explicit-low", "explicit-high"})
        # The authors feed the student's raw features to the amplifiers; a student FPN of
        # another width cannot enter the teacher's head, so then the adapter bridges it.
        self.implicit_input = config.distill.implicit_input
        self.implicit_input_note = None
        if uses_implicit and self.implicit_input == "raw" and student_channels != teacher_channels:
            self.implicit_input = "adapted"
            self.implicit_input_note = (f"the student FPN has {student_channels} channels and the teacher's "
                                        f"{teacher_channels}: the implicit streams read the adapter's output")
        needs_adapter = (config.distill.method == "fitnet" or uses_explicit
                         or (uses_implicit and self.implicit_input == "adapted"))
        adapter = Adapter(student_channels, teacher_channels) if needs_adapter else None
        self.module = Student(student, adapter)
        self.teacher = _frozen(teacher)
        self.amplifier_head = _frozen(amplifier_head)
        # The teacher backbone only extracts features (no gradient): it may run in half precision.
        # The heads stay float32, since the implicit streams backpropagate through them.
        self.teacher_dtype = getattr(torch, config.distill.teacher_dtype)
        self.teacher.backbone.to(self.teacher_dtype)
        self.is_retinanet = isinstance(student, RetinaNet)

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
        implicit_student = adapted if self.implicit_input == "adapted" else features
        if self.is_retinanet:
            terms, implicit = self._retinanet(student, batch, targets, features, implicit_student, teacher_features)
        else:
            terms, implicit = self._faster_rcnn(student, batch, targets, features, implicit_student, teacher_features)
        weights = self.settings.weights
        if self.settings.method == "fitnet":
            terms["fitnet"] = weights.fitnet * fitnet_loss(list(adapted.values()), list(teacher_features.values()))
            return terms
        if self.streams & {"explicit-low", "explicit-high"}:
            low, high = explicit_losses(
                list(adapted.values()), list(teacher_features.values()), [t["boxes"] for t in targets],
                tuple(batch.tensors.shape[-2:]), wavelet=self.settings.wavelet, disw=self.settings.disw,
            )
            if "explicit-low" in self.streams:
                terms["explicit_low"] = weights.explicit_low * low
            if "explicit-high" in self.streams:
                terms["explicit_high"] = weights.explicit_high * high
        for stream, weight in (("implicit-full", weights.implicit_full), ("implicit-high", weights.implicit_high)):
            if stream in self.streams:
                kd = implicit(stream == "implicit-high")
                prefix = stream.replace("-", "_")
                terms[f"{prefix}_cls"] = weight * kd["cls"]
                terms[f"{prefix}_box"] = weight * kd["box"]
        return terms

    def _inputs(self, high: bool, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]):
        if not high:
            return student_features, teacher_features
        wavelet = self.settings.wavelet
        with torch.no_grad():
            teacher_hf = OrderedDict((k, high_frequency(f, wavelet)) for k, f in teacher_features.items())
        return OrderedDict((k, high_frequency(f, wavelet)) for k, f in student_features.items()), teacher_hf

    def _retinanet(self, student, batch, targets, features, implicit_student, teacher_features):
        feature_list = list(features.values())
        anchors = student.anchor_generator(batch, feature_list)
        terms = dict(student.compute_loss(targets, student.head(feature_list), anchors))
        needs_implicit = bool(self.streams & {"implicit-full", "implicit-high"}) and self.settings.method == "ds2d2"
        teacher_anchors = self.teacher.anchor_generator(batch, list(teacher_features.values())) if needs_implicit else None

        def implicit(high: bool) -> dict[str, Tensor]:
            s, t = self._inputs(high, implicit_student, teacher_features)
            head = self.amplifier_head if high else self.teacher.head
            return retinanet_implicit_loss(
                head, list(s.values()), list(t.values()), teacher_anchors, targets,
                box_coder=self.teacher.box_coder, matcher=self.teacher.proposal_matcher, beta=self.settings.qfl_beta,
                box_anchors=self.settings.box_kd_anchors, normalizer=self.settings.kd_normalizer,
            )

        return terms, implicit

    def _faster_rcnn(self, student, batch, targets, features, implicit_student, teacher_features):
        proposals, rpn_losses = student.rpn(batch, features, targets)
        _, roi_losses = student.roi_heads(features, proposals, batch.image_sizes, targets)
        terms = {**rpn_losses, **roi_losses}
        detached = [p.detach() for p in proposals]
        drawn: list[list[Tensor]] = []  # one RoI draw per step, shared by the full and high streams

        def implicit(high: bool) -> dict[str, Tensor]:
            s, t = self._inputs(high, implicit_student, teacher_features)
            roi_heads = self.amplifier_head if high else self.teacher.roi_heads
            if not drawn:
                drawn.append(sample_rois(self.teacher.roi_heads, detached, targets))
            return faster_rcnn_implicit_loss(
                roi_heads, s, t, detached, batch.image_sizes, targets,
                temperature=self.settings.kd_temperature, cls_weight=self.settings.kd_cls_weight, rois=drawn[0],
                roi_reduction=self.settings.roi_kd_reduction,
            )

        return terms, implicit


def _load_amplifier(path: Path, teacher: Checkpoint, teacher_model: nn.Module) -> nn.Module:
    checkpoint = load_checkpoint(path, "amplifier", option="--amplifier")
    if checkpoint.meta.teacher_sha256 != teacher.sha256:
        raise InputError(
            f"this amplifier was trained for another teacher (sha256 {str(checkpoint.meta.teacher_sha256)[:12]}..., "
            f"--teacher is {teacher.sha256[:12]}...); train one with `ds2d2 train-amplifier --teacher {teacher.path}`",
            path,
        )
    return load_head(teacher_model, checkpoint.tensors, path)


def distill(
    config: RunConfig,
    *,
    out: Path,
    teacher: Path | None = None,
    amplifier: Path | None = None,
    data_dir: Path | None = None,
    preset: str = "",
    device: torch.device | str = "cpu",
    resume: bool = False,
    reporter: Reporter | None = None,
) -> StageResult:
    """Train `config.student` with `config.distill.method` (ds2d2, fitnet, or none = the baseline)."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    method = config.distill.method
    config = with_data_root(config, data_dir)
    data = load_stage_data(config)
    if method != "none" and teacher is None:
        raise InputError(f"--method {method} needs --teacher T.safetensors (or use --method none for the baseline)")
    teacher_ckpt = load_teacher(teacher, config, data.classes, data.train.path) if method != "none" else None
    teacher_model = model_from_checkpoint(teacher_ckpt, device) if teacher_ckpt is not None else None
    amplifier_head = None
    if method == "ds2d2" and "implicit-high" in config.distill.streams:
        if amplifier is None and set(config.distill.streams) == {"implicit-high"}:
            raise InputError("--streams implicit-high needs --amplifier A.safetensors (without it no stream is "
                             "left and the run would be the undistilled baseline)")
        if amplifier is None:
            reporter.note("no --amplifier: the implicit high-frequency stream is off for this run")
        else:
            amplifier_head = _load_amplifier(amplifier, teacher_ckpt, teacher_model).to(device)
    elif amplifier is not None:
        reporter.note(f"--amplifier is not used by this run (method {method}, streams {', '.join(config.distill.streams)})")
    prepare_stage(config, out, resume)
    seed_everything(config.schedule("student").seed)
    student = build_detector(config.student, len(data.classes), config.input).to(device)
    if teacher_model is None:
        task: Any = DetectorTask(student)
        detector = student
    else:
        task = DistillTask(student, teacher_model, config, amplifier_head)
        task.module.to(device)
        detector = task.module.detector
        reporter.note(f"distill: method {method}, streams {', '.join(sorted(task.streams)) if method == 'ds2d2' else '-'}"
                      f", DISW {'on' if config.distill.disw else 'off'}, wavelet {config.distill.wavelet}")
        if task.implicit_input_note:
            reporter.note(task.implicit_input_note)
    extra = {"method": method, "teacher_sha256": teacher_ckpt.sha256 if teacher_ckpt else None}
    active = sorted(task.streams) if isinstance(task, DistillTask) and method == "ds2d2" else []
    implicit_input = task.implicit_input if isinstance(task, DistillTask) and task.uses_implicit else None
    return run_stage(
        task=task, scored=detector, weights=detector.state_dict,
        meta=lambda metrics: meta_for("student", config, "student", data.classes, preset, metrics=metrics, **extra),
        config=config, data=data, out=out, stage="student", device=device, resume=resume, reporter=reporter,
        extra_summary={"method": method, "streams": active, "disw": config.distill.disw,
                       "implicit_input": implicit_input,
                       "implicit_input_note": getattr(task, "implicit_input_note", None),
                       "wavelet": config.distill.wavelet, "teacher": str(teacher) if teacher else None,
                       "amplifier": str(amplifier) if amplifier_head is not None else None},
    )
