"""Faster R-CNN (method.md): FPN P2-P6, RPN with 3 ratios and one size per level, RoIAlign 7x7,
2-FC box head.

The authors' recipe (their MMDetection config) where torchvision's defaults differ, each a
`ModelConfig` setting: 1000 proposals per image in training (`rpn_post_nms_top_n_train`),
RoIAlign with adaptive sampling (`roi_sampling_ratio=0`) and half-pixel alignment
(`roi_aligned`). Everything else of the two stages is torchvision's default, which is theirs
(2000 per level before NMS in training, 1000 / 1000 at inference, NMS 0.7 and 0.5, 512 RoIs
at 25% positive, 100 detections).

Its implicit loss samples RoIs from the student's proposals and compares the amplifier box
head's outputs on student and teacher features; each amplifier draws its own RoIs (the
authors) or both share one draw (`distill.implicit_roi_draw`). The authors' high-frequency
amplifier trains RPN and RoI head on `HF(features)` (`amplifier_rpn="high_frequency"`);
`"frozen"` keeps the teacher's RPN on full features. DIST compares the student's RoI class
scores with the teacher's box head on the same sampled RoIs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _onnx_merge_levels, _setup_scales

from ds2d2_cli.config import DistillConfig, InputConfig, ModelConfig
from ds2d2_cli.distill.implicit import faster_rcnn_implicit_loss, sample_rois
from ds2d2_cli.distill.spectral import high_frequency
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.backbones import build_fpn_backbone
from ds2d2_cli.models.families._base import AmplifierRPN, ClassScores, DetectionStep, DetectorFamily, trainable_copy

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


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's FPN pooler (same level mapping and scales) with RoIAlign's `aligned` flag,
    which its own pooler never passes (always the legacy `aligned=False`). Scriptable and
    ONNX-traceable as the original (opset >= 16 for `aligned=True`)."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        scales, mapper = self.scales, self.map_levels
        assert scales is not None and mapper is not None  # set above (TorchScript needs the refinement)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, scales[0], self.sampling_ratio, self.aligned)
        levels = mapper(boxes)
        pooled = torch.zeros((rois.shape[0], features[0].shape[1]) + self.output_size, dtype=features[0].dtype,
                             device=features[0].device)
        per_level: List[Tensor] = []
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            out = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, self.aligned)
            if torchvision._is_tracing():  # ONNX cannot trace the indexed write below
                per_level.append(out.to(pooled.dtype))
            else:
                pooled[index] = out.to(pooled.dtype)  # levels may differ in dtype under autocast
        if torchvision._is_tracing():
            pooled = _onnx_merge_levels(levels, per_level)
        return pooled


def roi_pooler(cfg: ModelConfig) -> MultiScaleRoIAlign:
    """The box head's RoIAlign 7x7 on P2-P5 with `cfg`'s sampling; torchvision's own pooler
    when not aligned (what it builds by default with sampling ratio 2)."""
    names = ["0", "1", "2", "3"]
    if cfg.roi_aligned:
        return AlignedMultiScaleRoIAlign(names, 7, cfg.roi_sampling_ratio, aligned=True)
    return MultiScaleRoIAlign(names, 7, cfg.roi_sampling_ratio)


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
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, box_roi_pool=roi_pooler(cfg),
        )

    def detection_step(self, model, batch, targets, features) -> DetectionStep:
        proposals, rpn_losses = model.rpn(batch, features, targets)
        # RoIHeads.forward in training, spelled out (these detectors have a box branch only), so
        # that the sampled RoIs and their class logits stay for DIST: the same calls in the same
        # order, so the same RoI draw and the same losses
        roi_heads = model.roi_heads
        rois, _, labels, regression_targets = roi_heads.select_training_samples(proposals, targets)
        logits, deltas = roi_heads.box_predictor(
            roi_heads.box_head(roi_heads.box_roi_pool(features, rois, batch.image_sizes)))
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, deltas, labels, regression_targets)
        step = DetectionStep(batch, targets, {**rpn_losses, "loss_classifier": loss_classifier,
                                              "loss_box_reg": loss_box_reg})
        step.cache["proposals"] = [p.detach() for p in proposals]
        step.cache["sampled_rois"] = [r.detach() for r in rois]
        step.cache["roi_logits"] = logits
        return step

    def prediction_pair(self, step: DetectionStep, teacher: nn.Module,
                        teacher_features: dict[str, Tensor]) -> ClassScores:
        """DIST on the RoI head as MasKD's two-stage config has it
        (mmrazor/configs/distill/dist/dist_cascade_mask_rcnn_x101-fpn_x50_coco.py): the student's
        `fc_cls` logits on its sampled RoIs, and the teacher's box head on its own features for
        the same RoIs (its RoI extractor is handed the student's), softmax over the classes and
        background (`use_sigmoid` off)."""
        roi_heads = teacher.roi_heads
        with torch.no_grad():
            logits, _ = roi_heads.box_predictor(roi_heads.box_head(
                roi_heads.box_roi_pool(teacher_features, step.cache["sampled_rois"], step.batch.image_sizes)))
        return ClassScores([step.cache["roi_logits"]], [logits], "softmax")

    def implicit_loss(self, step: DetectionStep, teacher: nn.Module, head: nn.Module,
                      student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                      settings: DistillConfig) -> dict[str, Tensor]:
        proposals = step.cache["proposals"]
        draws = step.cache.setdefault("rois", [])  # every draw of the step, in order (tests read them)
        per_image = settings.implicit_rois
        if settings.implicit_roi_draw == "per_stream" or not draws:
            # per_stream: each amplifier assigns and samples anew, as the authors' implicit() does
            draws.append(sample_rois(teacher.roi_heads, proposals, step.targets, per_image=per_image))
        losses = faster_rcnn_implicit_loss(
            head, student_features, teacher_features, proposals, step.batch.image_sizes, step.targets,
            temperature=settings.kd_temperature, cls_weight=settings.kd_cls_weight, rois=draws[-1],
            roi_reduction=settings.roi_kd_reduction,
        )
        if per_image is not None and settings.roi_kd_reduction == "sum":
            # a sum over fewer RoIs: scaled back to the full draw's size, which the weights assume
            losses["cls"] = losses["cls"] * (teacher.roi_heads.fg_bg_sampler.batch_size_per_image / per_image)
        return losses

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
