"""RetinaNet (method.md): FPN on C3-C5 with P6/P7 from C5, 3 scales x 3 ratios of anchors per
level (size = anchor_base x stride x 2^(i/3), strides 8-128), focal loss, L1 box loss.

Its amplifier is a copy of the head reading `high_frequency(...)` of each level; the
implicit loss is `retinanet_implicit_loss` on the teacher's anchors and assigner. DIST reads
the classification head's sigmoid scores of student and teacher, level by level.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ds2d2_cli.config import DistillConfig, InputConfig, ModelConfig
from ds2d2_cli.distill.implicit import retinanet_implicit_loss, retinanet_matches
from ds2d2_cli.distill.spectral import high_frequency
from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.models.backbones import build_fpn_backbone
from ds2d2_cli.models.families._base import AmplifierRPN, ClassScores, DetectionStep, DetectorFamily

STRIDES = (8, 16, 32, 64, 128)


def anchor_sizes(anchor_base: float) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(max(1, round(anchor_base * s * 2 ** (i / 3))) for i in range(3)) for s in STRIDES)


def head_norm_layer(cfg: ModelConfig) -> Callable[[int], nn.Module] | None:
    """The head convs' normalisation: GroupNorm with `head_norm: group`, none otherwise."""
    if cfg.head_norm != "group":
        return None
    # up to 32 groups, at least 2 channels each: P7 of a small input is 1x1, and a
    # one-value group would normalise to a constant (and breaks the ONNX export)
    groups = math.gcd(32, max(1, cfg.fpn_channels // 2))
    return functools.partial(nn.GroupNorm, groups)


def silence_no_class_slot(cls_logits: nn.Conv2d, num_anchors: int) -> None:
    """Slot 0 of each anchor's scores is no class: start its bias far below any score threshold."""
    with torch.no_grad():
        cls_logits.bias.view(num_anchors, -1)[:, 0] = -20.0


def dense_class_scores(step: DetectionStep, classification_head: nn.Module,
                       teacher_features: dict[str, Tensor]) -> ClassScores:
    """DIST's matrices for a RetinaNet head, as MasKD builds them: its DIST config
    (mmrazor/configs/distill/dist/dist_retinanet_x101-retinanet-r50_coco.py) hooks
    `bbox_head.retina_cls`, one `[N, A*K, H, W]` output per FPN level, and its loss
    (mmrazor/models/losses/dist_kd.py, `use_sigmoid=True`) makes each a `[N*H*W, A*K]`
    matrix of sigmoid scores: a row per location, its anchors' class scores side by side, a
    loss per level, summed. Slot 0 of each anchor (no class, `silence_no_class_slot`) is left
    out: an MMDetection sigmoid head has no such slot. The student's logits are those of its
    detection loss (`step.cache["cls_logits"]`); the teacher's come from `classification_head`
    on `teacher_features`, without autograd."""
    levels = list(teacher_features.values())
    student = step.cache["cls_logits"]  # [N, sum over levels of H*W*A, K + 1], level by level
    with torch.no_grad():
        teacher = classification_head(levels)
    if teacher.shape != student.shape:
        raise Ds2d2Error(f"DIST: the student's head predicts {tuple(student.shape)} class scores, the teacher's "
                         f"{tuple(teacher.shape)} (the same anchors per location and classes are needed)")
    images, total, slots = student.shape
    cells = [level.shape[-2] * level.shape[-1] for level in levels]
    anchors, rest = divmod(total, sum(cells))
    if rest or not anchors:
        raise Ds2d2Error(f"DIST: {total} anchors do not divide into the {sum(cells)} locations of the FPN levels")
    pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
    start = 0
    for count in cells:
        stop = start + count * anchors
        for logits, matrices in zip((student, teacher), pairs):
            matrices.append(logits[:, start:stop, 1:].reshape(images * count, anchors * (slots - 1)))
        start = stop
    return ClassScores(pairs[0], pairs[1], "sigmoid")


class HighFrequencyRetinaNetHead(nn.Module):
    def __init__(self, head: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.head = head
        self.wavelet = wavelet

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return self.head([high_frequency(f, self.wavelet) for f in features])

    def compute_loss(self, *args, **kwargs):
        return self.head.compute_loss(*args, **kwargs)


class RetinaNetFamily(DetectorFamily):
    name = "retinanet"
    model_type = RetinaNet
    amplifier_prefix = "head."

    def build(self, cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
        resolved = input_cfg.resolved  # concrete bands, mean and std (never `auto`)
        # P6/P7 from C5 (LastLevelP6P7 switches to P5 only if C5 already has FPN width).
        backbone = build_fpn_backbone(cfg, (2, 3, 4), lambda c: LastLevelP6P7(c[3], cfg.fpn_channels), resolved.bands)
        sizes = anchor_sizes(cfg.anchor_base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        num_anchors = anchors.num_anchors_per_location()[0]
        head = RetinaNetHead(cfg.fpn_channels, num_anchors, num_classes + 1, norm_layer=head_norm_layer(cfg))
        silence_no_class_slot(head.classification_head.cls_logits, num_anchors)
        return RetinaNet(
            backbone, num_classes + 1, anchor_generator=anchors, head=head, score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img, min_size=input_cfg.size, max_size=input_cfg.size,
            image_mean=list(resolved.mean), image_std=list(resolved.std),
        )

    def detection_step(self, model, batch, targets, features) -> DetectionStep:
        feature_list = list(features.values())
        anchors = model.anchor_generator(batch, feature_list)
        outputs = model.head(feature_list)
        step = DetectionStep(batch, targets, dict(model.compute_loss(targets, outputs, anchors)))
        step.cache["cls_logits"] = outputs["cls_logits"]  # what DIST compares with the teacher's
        return step

    def implicit_loss(self, step: DetectionStep, teacher: nn.Module, head: nn.Module,
                      student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                      settings: DistillConfig) -> dict[str, Tensor]:
        levels = list(teacher_features.values())
        if "teacher_anchors" not in step.cache:  # anchors depend on shapes only: one set per step
            step.cache["teacher_anchors"] = teacher.anchor_generator(step.batch, levels)
            step.cache["teacher_matches"] = retinanet_matches(  # both amplifiers: one match
                step.cache["teacher_anchors"], step.targets, teacher.proposal_matcher)
        return retinanet_implicit_loss(
            head, list(student_features.values()), levels, step.cache["teacher_anchors"], step.targets,
            box_coder=teacher.box_coder, matcher=teacher.proposal_matcher, beta=settings.qfl_beta,
            box_anchors=settings.box_kd_anchors, normalizer=settings.kd_normalizer,
            matched=step.cache["teacher_matches"],
        )

    def prediction_pair(self, step: DetectionStep, teacher: nn.Module,
                        teacher_features: dict[str, Tensor]) -> ClassScores:
        return dense_class_scores(step, teacher.head.classification_head, teacher_features)

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def amplify(self, teacher: nn.Module, head: nn.Module, wavelet: str, rpn: AmplifierRPN) -> dict[str, nn.Module]:
        teacher.head = HighFrequencyRetinaNetHead(head, wavelet)
        return {self.amplifier_prefix: head}

    def set_score_thresh(self, model: nn.Module, score_thresh: float) -> None:
        model.score_thresh = score_thresh
