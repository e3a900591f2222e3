"""Oriented RetinaNet (`retinanet_obb`): MMRotate's rotated RetinaNet, OBB variant, angle version le90.

The reference is MMRotate's `configs/rotated_retinanet/rotated_retinanet_obb_r50_fpn_1x_dota_le90.py`
(main branch; the 1.x config says the same) and the code it names:

* body, FPN (P3-P7, P6 from C5), anchor sizes (`anchor_base` x stride x 2^(i/3)), 3 ratios and the
  two four-conv towers are those of `retinanet.py`; the box branch predicts 5 values per anchor.
* Anchors are horizontal rotated boxes (cx, cy, w, h, 0): like MMRotate's RotatedAnchorGenerator
  they keep w and h as drawn, so ratio-2 anchors are taller than wide (not le90 normalised).
* Assignment (MaxIoUAssigner on rotated IoU, PseudoSampler): an anchor whose best IoU is >= 0.5 is
  positive for that box, < 0.4 negative, in between ignored; then each box takes every anchor of
  its own highest IoU when that IoU is >= `min_pos_iou` (0: always), later boxes winning ties.
* Box deltas (DeltaXYWHAOBBoxCoder, le90, norm_factor None, means 0, stds 1, and the config's
  `edge_swap=True`, `proj_xy=True`): see `OrientedBoxCoder`.
* Losses: sigmoid focal loss (gamma 2, alpha 0.25) over every anchor not ignored and every class,
  L1 on the 5 deltas of positive anchors; both are sums over the batch divided by
  sum_i max(1, positives of image i) (MMDetection's normaliser; torchvision's RetinaNet averages
  per image instead).
* Test: on each level the `nms_pre` (2000) anchors of highest class score are decoded (centres
  clamped into the image); every (anchor, class) scoring above `score_thresh` (0.05) goes to
  rotated NMS per class at IoU `nms_thresh` (0.1); the best `detections_per_img` are kept
  (MMRotate keeps 2000; `ModelConfig.detections_per_img` sets it here).

Deliberate differences, none of which changes training on square patches:

* Labels follow the other families: K + 1 score slots per anchor, slot 0 never a target (its bias
  starts at -20) and labels 1..K; MMRotate has K slots and labels 0..K-1. Slot 0 is never reported.
* Anchor sizes are rounded to whole pixels (`retinanet.anchor_sizes`) and torchvision's
  AnchorGenerator rounds each anchor's corners; MMRotate keeps them fractional.
* Every anchor is valid (MMRotate marks anchors over one image's padding invalid when the images
  of a batch differ in size; ours are square patches of one size, where the two agree).
* Resizing (`RotatedTransform`) scales rboxes as MMRotate's RResize does: cx by the x ratio, cy by
  the y ratio, w and h by the geometric mean of the two, the angle unchanged. That is exact for
  one ratio, which torchvision's aspect-keeping resize gives up to the rounding of the output size
  (a non-uniform stretch would turn a rotated rectangle into a parallelogram); detections are
  mapped back to input pixels by the inverse rule.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ds2d2_cli.config import DistillConfig, InputConfig, ModelConfig
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.backbones import build_fpn_backbone
from ds2d2_cli.models.families._base import AmplifierRPN, ClassScores, DetectionStep, DetectorFamily
from ds2d2_cli.models.families.retinanet import (
    HighFrequencyRetinaNetHead,
    anchor_sizes,
    dense_class_scores,
    head_norm_layer,
    silence_no_class_slot,
)
from ds2d2_cli.distill.implicit import oriented_matches, oriented_retinanet_implicit_loss
from ds2d2_cli.rotated import batched_rotated_nms, normalize_le90, rbox_envelope, rotated_box_iou, wrap_angle

# MMRotate's anchor ratios (h / w) and test settings of the reference config.
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
NMS_PRE = 2000
NMS_THRESH = 0.1

BELOW_LOW_THRESHOLD = det_utils.Matcher.BELOW_LOW_THRESHOLD  # -1: negative anchor
BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS  # -2: ignored anchor


# --------------------------------------------------------------------------- geometry of the head


def scale_rboxes(rboxes: Tensor, ratio_x: float, ratio_y: float) -> Tensor:
    """Rotated boxes `[N, 5]` of an image resized by (ratio_x, ratio_y), as MMRotate's RResize:
    cx, cy by their axis' ratio, w and h by sqrt(ratio_x * ratio_y), the angle kept."""
    scale = rboxes.new_tensor([ratio_x, ratio_y, math.sqrt(ratio_x * ratio_y), math.sqrt(ratio_x * ratio_y), 1.0])
    return rboxes * scale


def horizontal_rboxes(boxes: Tensor) -> Tensor:
    """XYXY boxes `[N, 4]` as rotated boxes (cx, cy, w, h, 0), w and h as they are."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([centre, size, boxes.new_zeros(len(boxes), 1)], dim=1)


@dataclass(frozen=True)
class OrientedBoxCoder:
    """MMRotate's DeltaXYWHAOBBoxCoder with angle range le90, no angle norm factor, means 0, stds 1.

    With anchor a = (ax, ay, aw, ah, at) and box g = (gx, gy, gw, gh, gt):

    * dx, dy: the centre offset over (aw, ah), in the anchor's own axes with `proj_xy`
      ((cos at, sin at) and (-sin at, cos at)), in image axes without; anchors at angle 0
      make the two the same;
    * da = le90(gt - at); with `edge_swap` also db = le90(gt - at + pi/2), and when |db| <= |da|
      the box is read with its sides swapped (w' = gh, h' = gw, angle difference db), so the
      target turns the anchor by at most 45 degrees;
    * dw = log(w' / aw), dh = log(h' / ah).

    Decoding inverts this with dw, dh clamped to |log(wh_ratio_clip)| and the angle brought back
    into le90; with `edge_swap` the longer side becomes w (for a square the angle then lies in
    [-pi/2, pi/2), MMRotate's rule; `normalize_le90` makes it the repository's [-pi/4, pi/4)).
    The reference config sets edge_swap and proj_xy to True (the class defaults are False).
    """

    edge_swap: bool = True
    proj_xy: bool = True
    wh_ratio_clip: float = 16 / 1000

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """Deltas `[N, 5]` taking `anchors [N, 5]` to `boxes [N, 5]` (aligned pairs)."""
        ax, ay, aw, ah, at = anchors.float().unbind(-1)
        gx, gy, gw, gh, gt = boxes.float().unbind(-1)
        if self.proj_xy:
            cos, sin = torch.cos(at), torch.sin(at)
            dx = (cos * (gx - ax) + sin * (gy - ay)) / aw
            dy = (-sin * (gx - ax) + cos * (gy - ay)) / ah
        else:
            dx, dy = (gx - ax) / aw, (gy - ay) / ah
        da = wrap_angle(gt - at)
        if self.edge_swap:
            db = wrap_angle(gt - at + math.pi / 2)
            keep = da.abs() < db.abs()
            gw, gh = torch.where(keep, gw, gh), torch.where(keep, gh, gw)
            da = torch.where(keep, da, db)
        return torch.stack([dx, dy, torch.log(gw / aw), torch.log(gh / ah), da], dim=-1)

    def decode(self, anchors: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """Boxes `[N, 5]` from `anchors [N, 5]` moved by `deltas [N, 5]`; centres clamped into an
        image of `max_shape` (h, w) when given."""
        ax, ay, aw, ah, at = anchors.unbind(-1)
        dx, dy, dw, dh, da = deltas.unbind(-1)
        limit = abs(math.log(self.wh_ratio_clip))
        gw = aw * dw.clamp(-limit, limit).exp()
        gh = ah * dh.clamp(-limit, limit).exp()
        if self.proj_xy:
            cos, sin = torch.cos(at), torch.sin(at)
            gx = dx * aw * cos - dy * ah * sin + ax
            gy = dx * aw * sin + dy * ah * cos + ay
        else:
            gx, gy = ax + dx * aw, ay + dy * ah
        gt = wrap_angle(at + da)
        if max_shape is not None:
            gx = gx.clamp(0, max_shape[1] - 1)
            gy = gy.clamp(0, max_shape[0] - 1)
        if self.edge_swap:
            wide = gw > gh
            gw, gh = torch.where(wide, gw, gh), torch.where(wide, gh, gw)
            gt = torch.where(wide, gt, wrap_angle(gt + math.pi / 2))
        return torch.stack([gx, gy, gw, gh, gt], dim=-1)


@dataclass(frozen=True)
class RotatedMaxIoUAssigner:
    """MMDetection's MaxIoUAssigner over rotated IoU (MMRotate's RBboxOverlaps2D), as configured
    for rotated RetinaNet: no ignore regions (ignore_iof_thr -1), low-quality matches on, every
    anchor of a box's highest IoU taken (gt_max_assign_all).

    Returns, per anchor, the index of its box, BELOW_LOW_THRESHOLD (-1, negative) or
    BETWEEN_THRESHOLDS (-2, ignored). With `min_pos_iou` 0 a box that overlaps no anchor at all
    would take every anchor (the reference's behaviour, kept); boxes inside the image always
    overlap some anchor.
    """

    pos_iou: float = 0.5
    neg_iou: float = 0.4
    min_pos_iou: float = 0.0

    def __call__(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        matched = torch.full((len(anchors),), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
        if len(boxes) == 0 or len(anchors) == 0:
            return matched
        iou = rotated_box_iou(boxes.float(), anchors.float())  # [G, A]: the hot path of training
        best, best_box = iou.max(dim=0)
        matched[best >= self.neg_iou] = BETWEEN_THRESHOLDS
        positive = best >= self.pos_iou
        matched[positive] = best_box[positive]
        box_best = iou.max(dim=1).values  # [G]
        takes = (iou == box_best[:, None]) & (box_best >= self.min_pos_iou)[:, None]
        box_index, anchor_index = takes.nonzero(as_tuple=True)
        # the reference loops over boxes in order, so the last box taking an anchor keeps it
        last = torch.full_like(matched, -1).scatter_reduce(0, anchor_index, box_index, "amax")
        return torch.where(last >= 0, last, matched)


# --------------------------------------------------------------------------- modules


class OrientedRegressionHead(nn.Module):
    """torchvision's RetinaNet regression tower (4 convs, same init) ending in 5 deltas per anchor."""

    def __init__(self, in_channels: int, num_anchors: int, norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.conv = nn.Sequential(*(misc_nn_ops.Conv2dNormActivation(in_channels, in_channels, norm_layer=norm_layer)
                                    for _ in range(4)))
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 5, kernel_size=3, stride=1, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: list[Tensor]) -> Tensor:
        out = []
        for features in x:
            deltas = self.bbox_reg(self.conv(features))
            n, _, h, w = deltas.shape
            out.append(deltas.view(n, -1, 5, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 5))  # [N, HWA, 5]
        return torch.cat(out, dim=1)


class OrientedRetinaNetHead(nn.Module):
    """torchvision's RetinaNet classification head beside `OrientedRegressionHead`."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes,
                                                               norm_layer=norm_layer)
        self.regression_head = OrientedRegressionHead(in_channels, num_anchors, norm_layer=norm_layer)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(x), "bbox_regression": self.regression_head(x)}


class RotatedTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise that also resizes `target["rboxes"]` (`scale_rboxes`)
    and maps detections' rboxes back to input pixels (their "boxes" become the envelopes).

    torchvision resizes `target["boxes"]` too; a target without them gets the rboxes' envelopes
    first (the detector never reads them; feature-based distillation does)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        height, width = image.shape[-2:]
        if target is not None and "rboxes" in target and "boxes" not in target:
            target["boxes"] = rbox_envelope(target["rboxes"])
        image, target = super().resize(image, target)
        if target is not None and "rboxes" in target:
            new_height, new_width = image.shape[-2:]
            target["rboxes"] = scale_rboxes(target["rboxes"], new_width / width, new_height / height)
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for prediction, (height, width), (old_height, old_width) in zip(result, image_shapes, original_image_sizes):
            rboxes = scale_rboxes(prediction["rboxes"], old_width / width, old_height / height)
            prediction["rboxes"] = rboxes
            prediction["boxes"] = rbox_envelope(rboxes)
        return result


class OrientedRetinaNet(nn.Module):
    """Rotated RetinaNet (see the module docstring), built from torchvision parts like `RetinaNet`.

    forward(images, targets): images are `[C, H, W]` floats; in training each target holds
    "rboxes" float `[N, 5]` (le90, input pixels) and "labels" int64 `[N]` in 1..K (other keys,
    such as the envelopes in "boxes", are carried along), and the result is the loss dict
    {"classification", "bbox_regression"}. In eval the result is one dict per image: "rboxes"
    `[D, 5]` le90 and "boxes" `[D, 4]` their XYXY envelopes, in input pixels, "scores" `[D]`
    best first and "labels" `[D]` in 1..K.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
                 head: nn.Module, *, min_size: int, max_size: int, image_mean: list[float], image_std: list[float],
                 box_coder: OrientedBoxCoder | None = None, assigner: RotatedMaxIoUAssigner | None = None,
                 score_thresh: float = 0.05, nms_thresh: float = NMS_THRESH, detections_per_img: int = 2000,
                 nms_pre: int = NMS_PRE, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes  # score slots, slot 0 included
        self.anchor_generator = anchor_generator
        self.head = head
        self.transform = RotatedTransform(min_size, max_size, image_mean, image_std)
        self.box_coder = box_coder or OrientedBoxCoder()
        self.assigner = assigner or RotatedMaxIoUAssigner()
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.nms_pre = nms_pre
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def anchors(self, batch: ImageList, features: list[Tensor]) -> list[Tensor]:
        """One `[A, 5]` tensor of horizontal rotated anchors per image, in the head's order."""
        return [horizontal_rboxes(a) for a in self.anchor_generator(batch, features)]

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor]) -> dict[str, Tensor]:
        cls_logits, deltas = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        cls_sum = cls_logits.new_zeros(())
        box_sum = deltas.new_zeros(())
        normaliser = 0
        for logits, predicted, image_anchors, target in zip(cls_logits, deltas, anchors, targets):
            rboxes, labels = target["rboxes"], target["labels"]
            matched = self.assigner(image_anchors, rboxes)
            positive = matched >= 0
            counted = matched != BETWEEN_THRESHOLDS
            wanted = torch.zeros_like(logits)
            wanted[positive, labels[matched[positive]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(logits[counted], wanted[counted], alpha=self.focal_alpha,
                                                   gamma=self.focal_gamma, reduction="sum")
            if positive.any():
                goal = self.box_coder.encode(image_anchors[positive], rboxes[matched[positive]])
                box_sum = box_sum + (predicted[positive] - goal).abs().sum()
            normaliser += max(1, int(positive.sum()))
        return {"classification": cls_sum / normaliser, "bbox_regression": box_sum / normaliser}

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image, from per-level head outputs and anchors: see the module docstring (Test)."""
        return [select_oriented(found["rboxes"], found["scores"], self.score_thresh, self.nms_thresh,
                                self.detections_per_img)
                for found in self.candidates_from_head(head_outputs, anchors, image_sizes)]

    def candidates_from_head(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                             image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image, what goes into rotated NMS before any score cut-off: on each level the `nms_pre`
        anchors of highest class score, decoded (centres clamped into the image), levels concatenated:
        "rboxes" `[M, 5]` (le90 up to `normalize_le90`), "scores" `[M, K]` (sigmoid of slots 1..K) and
        "anchors" `[M]` (each row's index among the image's anchors, levels in order)."""
        found = []
        for index, (height, width) in enumerate(image_sizes):
            boxes, scores, rows = [], [], []
            offset = 0
            for logits, deltas, level_anchors in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                                     anchors[index]):
                level_scores = torch.sigmoid(logits[index][:, 1:])  # slot 0 is no class
                level_deltas = deltas[index]
                count = len(level_scores)
                if count > self.nms_pre:
                    top = level_scores.max(dim=1).values.topk(self.nms_pre).indices
                    level_scores, level_deltas, level_anchors = level_scores[top], level_deltas[top], level_anchors[top]
                else:
                    top = torch.arange(count, device=level_scores.device)
                boxes.append(self.box_coder.decode(level_anchors, level_deltas, max_shape=(height, width)))
                scores.append(level_scores)
                rows.append(top + offset)
                offset += count
            found.append({"rboxes": torch.cat(boxes), "scores": torch.cat(scores), "anchors": torch.cat(rows)})
        return found

    def candidates(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """`candidates_from_head` of images (eval): what `forward` gives `select_oriented`, in the
        detector's resized pixels (the input pixels when an image already has the input size)."""
        batch, _ = self.transform(images, None)
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        split, anchors = self._per_level(self.head(features), self.anchors(batch, features), features)
        return self.candidates_from_head(split, anchors, batch.image_sizes)

    @staticmethod
    def _per_level(head_outputs: dict[str, Tensor], anchors: list[Tensor],
                   features: list[Tensor]) -> tuple[dict[str, list[Tensor]], list[list[Tensor]]]:
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        per_location = head_outputs["cls_logits"].shape[1] // sum(per_level)
        sizes = [n * per_location for n in per_level]
        split = {name: list(value.split(sizes, dim=1)) for name, value in head_outputs.items()}
        return split, [list(a.split(sizes)) for a in anchors]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training:
            if targets is None:
                raise InputError("training an oriented detector needs targets")
            for index, target in enumerate(targets):
                _check_target(target, index, self.num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchors(batch, features)
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors)
        split, level_anchors = self._per_level(head_outputs, anchors, features)
        detections = self.postprocess_detections(split, level_anchors, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def select_oriented(rboxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float,
                    detections_per_img: int) -> dict[str, Tensor]:
    """Detections from `OrientedRetinaNet.candidates_from_head`'s rboxes `[M, 5]` and scores `[M, K]`:
    every (row, class) scoring above `score_thresh`, rotated NMS per class at `nms_thresh`
    (`batched_rotated_nms`), the best `detections_per_img`, angles by `normalize_le90`.
    The detector's own last step, and the one an ONNX export (which stops before it) leaves to
    its caller. Returns "rboxes", their envelopes "boxes", "scores" (best first), "labels" 1..K."""
    row, column = (scores > score_thresh).nonzero(as_tuple=True)
    score, label = scores[row, column], column + 1
    keep = batched_rotated_nms(rboxes[row], score, label, nms_thresh)[:detections_per_img]
    kept = normalize_le90(rboxes[row][keep])
    return {"rboxes": kept, "boxes": rbox_envelope(kept), "scores": score[keep], "labels": label[keep]}


def _check_target(target: dict[str, Tensor], index: int, num_slots: int) -> None:
    rboxes, labels = target.get("rboxes"), target.get("labels")
    if not isinstance(rboxes, Tensor) or rboxes.dim() != 2 or rboxes.shape[-1] != 5:
        raise InputError(f"target {index} needs rboxes as a [N, 5] tensor (cx, cy, w, h, theta; le90)")
    if not isinstance(labels, Tensor) or labels.shape != rboxes.shape[:1]:
        raise InputError(f"target {index} needs one label per rotated box")
    small = (rboxes[:, 2] <= 0) | (rboxes[:, 3] <= 0)
    if small.any():
        raise InputError(f"target {index} has a rotated box without area: {rboxes[small][0].tolist()}")
    if len(labels) and (int(labels.min()) < 1 or int(labels.max()) >= num_slots):
        raise InputError(f"target {index} has labels outside 1..{num_slots - 1}: {labels.unique().tolist()}")


# --------------------------------------------------------------------------- the family


class OrientedRetinaNetFamily(DetectorFamily):
    name = "retinanet_obb"
    oriented = True
    model_type = OrientedRetinaNet
    amplifier_prefix = "head."

    def build(self, cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
        resolved = input_cfg.resolved  # concrete bands, mean and std (never `auto`)
        backbone = build_fpn_backbone(cfg, (2, 3, 4), lambda c: LastLevelP6P7(c[3], cfg.fpn_channels), resolved.bands)
        sizes = anchor_sizes(cfg.anchor_base)
        anchors = AnchorGenerator(sizes, (ANCHOR_RATIOS,) * len(sizes))
        num_anchors = anchors.num_anchors_per_location()[0]
        head = OrientedRetinaNetHead(cfg.fpn_channels, num_anchors, num_classes + 1, norm_layer=head_norm_layer(cfg))
        silence_no_class_slot(head.classification_head.cls_logits, num_anchors)
        return OrientedRetinaNet(
            backbone, num_classes + 1, anchors, head, min_size=input_cfg.size, max_size=input_cfg.size,
            image_mean=list(resolved.mean), image_std=list(resolved.std), score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img,
        )

    def detection_step(self, model, batch, targets, features) -> DetectionStep:
        feature_list = list(features.values())
        anchors = model.anchors(batch, feature_list)
        outputs = model.head(feature_list)
        step = DetectionStep(batch, targets, model.compute_loss(targets, outputs, anchors))
        step.cache["anchors"] = anchors
        step.cache["cls_logits"] = outputs["cls_logits"]  # what DIST compares with the teacher's
        return step

    def implicit_loss(self, step: DetectionStep, teacher: nn.Module, head: nn.Module,
                      student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                      settings: DistillConfig) -> dict[str, Tensor]:
        levels = list(teacher_features.values())
        if "teacher_anchors" not in step.cache:  # anchors depend on shapes only: one set per step
            step.cache["teacher_anchors"] = teacher.anchors(step.batch, levels)
            step.cache["teacher_matches"] = oriented_matches(  # both amplifiers: one match
                step.cache["teacher_anchors"], step.targets, teacher.assigner)
        return oriented_retinanet_implicit_loss(
            head, list(student_features.values()), levels, step.cache["teacher_anchors"], step.targets,
            box_coder=teacher.box_coder, assigner=teacher.assigner, beta=settings.qfl_beta,
            box_anchors=settings.box_kd_anchors, normalizer=settings.kd_normalizer,
            matched=step.cache["teacher_matches"],
        )

    def prediction_pair(self, step: DetectionStep, teacher: nn.Module,
                        teacher_features: dict[str, Tensor]) -> ClassScores:
        """The horizontal RetinaNet's: the same classification head, so the same matrices."""
        return dense_class_scores(step, teacher.head.classification_head, teacher_features)

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def amplify(self, teacher: nn.Module, head: nn.Module, wavelet: str, rpn: AmplifierRPN) -> dict[str, nn.Module]:
        teacher.head = HighFrequencyRetinaNetHead(head, wavelet)
        return {self.amplifier_prefix: head}

    def set_score_thresh(self, model: nn.Module, score_thresh: float) -> None:
        model.score_thresh = score_thresh
