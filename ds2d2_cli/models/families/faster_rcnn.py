"""Faster R-CNN (method.md): FPN P2-P6, RPN with 3 ratios and one size per level, RoIAlign 7x7,
2-FC box head.

Its implicit loss samples RoIs from the student's proposals (one draw per step, shared by
both amplifiers) and compares the amplifier box head's outputs on student and teacher
features. The authors' high-frequency amplifier trains RPN and RoI head on `HF(features)`
(`amplifier_rpn="high_frequency"`); `"frozen"` keeps the teacher's RPN on full features.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ds2d2_cli.config import DistillConfig, InputConfig, ModelConfig
from ds2d2_cli.distill.implicit import faster_rcnn_implicit_loss, sample_rois
from ds2d2_cli.distill.spectral import high_frequency
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.backbones import build_fpn_backbone
from ds2d2_cli.models.families._base import AmplifierRPN, DetectionStep, DetectorFamily, trainable_copy

RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")


class HighFrequencyFeatures(nn.Module):
    """A backbone whose FPN levels come out as `high_frequency(...)` of each."""

    def __init__(self, backbone: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.out_channels
        self.wavelet = wavelet

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((name, high_frequency(f, self.wavelet)) for name, f in self.body(x).items())


class HighFrequencyRoIHeads(nn.Module):
    def __init__(self, roi_heads: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.roi_heads = roi_heads
        self.wavelet = wavelet

    def forward(self, features, proposals, image_shapes, targets=None):
        hf = OrderedDict((name, high_frequency(f, self.wavelet)) for name, f in features.items())
        return self.roi_heads(hf, proposals, image_shapes, targets)


class FasterRCNNFamily(DetectorFamily):
    name = "faster_rcnn"
    model_type = FasterRCNN
    amplifier_prefix = "roi_heads."

    def build(self, cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
        resolved = input_cfg.resolved  # concrete bands, mean and std (never `auto`)
        if len(cfg.rpn_anchor_sizes) != 5:
            raise InputError("faster_rcnn needs 5 rpn_anchor_sizes, one per FPN level P2-P6")
        backbone = build_fpn_backbone(cfg, (1, 2, 3, 4), lambda c: LastLevelMaxPool(), resolved.bands)
        sizes = tuple((s,) for s in cfg.rpn_anchor_sizes)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return FasterRCNN(
            backbone, num_classes + 1, rpn_anchor_generator=anchors, box_score_thresh=cfg.score_thresh,
            box_detections_per_img=cfg.detections_per_img, min_size=input_cfg.size, max_size=input_cfg.size,
            image_mean=list(resolved.mean), image_std=list(resolved.std),
        )

    def detection_step(self, model, batch, targets, features) -> DetectionStep:
        proposals, rpn_losses = model.rpn(batch, features, targets)
        _, roi_losses = model.roi_heads(features, proposals, batch.image_sizes, targets)
        step = DetectionStep(batch, targets, {**rpn_losses, **roi_losses})
        step.cache["proposals"] = [p.detach() for p in proposals]
        return step

    def implicit_loss(self, step: DetectionStep, teacher: nn.Module, head: nn.Module,
                      student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                      settings: DistillConfig) -> dict[str, Tensor]:
        proposals = step.cache["proposals"]
        if "rois" not in step.cache:  # one RoI draw per step, shared by the full and high streams
            step.cache["rois"] = sample_rois(teacher.roi_heads, proposals, step.targets)
        return faster_rcnn_implicit_loss(
            head, student_features, teacher_features, proposals, step.batch.image_sizes, step.targets,
            temperature=settings.kd_temperature, cls_weight=settings.kd_cls_weight, rois=step.cache["rois"],
            roi_reduction=settings.roi_kd_reduction,
        )

    def head(self, model: nn.Module) -> nn.Module:
        return model.roi_heads

    def amplify(self, teacher: nn.Module, head: nn.Module, wavelet: str, rpn: AmplifierRPN) -> dict[str, nn.Module]:
        if rpn == "frozen":
            teacher.roi_heads = HighFrequencyRoIHeads(head, wavelet)
            return {self.amplifier_prefix: head}
        teacher.backbone = HighFrequencyFeatures(teacher.backbone, wavelet)
        teacher.rpn = trainable_copy(teacher.rpn)
        teacher.roi_heads = head
        return {self.amplifier_prefix: head, "rpn.": teacher.rpn}

    def amplifier_untrained_losses(self, rpn: AmplifierRPN) -> tuple[str, ...]:
        # a frozen RPN's losses carry no gradient: the logged loss stays the amplifier's own
        return RPN_LOSSES if rpn == "frozen" else ()

    def amplifier_frozen_modules(self, model: nn.Module, rpn: AmplifierRPN) -> list[nn.Module]:
        return [model.backbone, model.rpn] if rpn == "frozen" else [model.backbone]

    def set_score_thresh(self, model: nn.Module, score_thresh: float) -> None:
        model.roi_heads.score_thresh = score_thresh
