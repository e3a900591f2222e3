"""Implicit stream: knowledge amplifiers (method.md, "Implicit stream").

A feature gap that looks small can move predictions a lot once a head reads it, so the
student is also taught through a frozen detection head (the "amplifier") that reads both
the student's and the teacher's FPN features: the teacher's own head (full-frequency
amplifier, fed the raw features) or the head trained by `train-amplifier` on `HF(...)`
(high-frequency amplifier, fed `high_frequency(...)` of each level). The caller chooses
the head and the features; these functions only compare the head's two outputs.

The head runs with autograd on the student features (gradients reach them; the head's
own parameters are whatever the caller made them, they are simply not optimised here)
and under `no_grad` on the teacher features. Student features must have the teacher's
channel count: the authors feed the student's RAW FPN features (the adapter belongs to
the explicit stream); only a student FPN of another width needs the adapter's output.
Everything that torchvision provides is reused (Matcher, BoxCoder,
`generalized_box_iou_loss`, `RoIHeads.select_training_samples`, the RoI pooler, box head
and predictor); losses are computed in float32 even under autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou, generalized_box_iou_loss

from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.rotated import kld_loss

__all__ = ["faster_rcnn_implicit_loss", "oriented_matches", "oriented_retinanet_implicit_loss", "retinanet_implicit_loss",
           "retinanet_matches", "sample_rois"]

BoxAnchors = Literal["all", "not_ignored"]
Normalizer = Literal["per_image", "batch"]
RoIReduction = Literal["sum", "mean"]


def _level_list(feats: Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
    return list(feats.values()) if isinstance(feats, Mapping) else list(feats)


@torch.no_grad()
def retinanet_matches(
    anchors: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], matcher: det_utils.Matcher
) -> list[Tensor]:
    """Per image, the matched GT index of every anchor (as `RetinaNet.compute_loss` does).

    Both amplifiers of a step read the same anchors and boxes: match once, pass `matched`."""
    matched = []
    for anchors_per_image, target in zip(anchors, targets):
        gt = target["boxes"]
        if gt.numel() == 0:  # the Matcher cannot run on an empty matrix: all negatives
            matched.append(
                torch.full((anchors_per_image.shape[0],), matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64,
                           device=anchors_per_image.device)
            )
        else:
            matched.append(matcher(box_iou(gt.to(anchors_per_image.dtype), anchors_per_image)))
    return matched


@torch.no_grad()
def oriented_matches(anchors: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                     assigner: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
    """Per image, the rotated assigner's GT index of every rotated anchor (-1 negative, -2 ignored)."""
    return [assigner(a, t["rboxes"].to(a.dtype)) for a, t in zip(anchors, targets)]


def retinanet_implicit_loss(
    head: RetinaNetHead,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    anchors: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    box_coder: det_utils.BoxCoder,
    matcher: det_utils.Matcher,
    beta: float = 1.0,
    box_anchors: BoxAnchors = "all",
    normalizer: Normalizer = "per_image",
    matched: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """{"cls", "box"}: RetinaNet amplifier KD between student and teacher FPN features.

    head: the frozen amplifier head (teacher's `model.head`, or the trained HF head).
    student_feats / teacher_feats: FPN levels `[N, C_t, h, w]` (a list, or a dict in
        `.values()` order), student raw (or adapted when its width differs); for the HF
        amplifier pass `high_frequency` of each level.
    anchors: `model.anchor_generator(image_list, features)`, one `[A, 4]` per image.
    targets: one dict per image with "boxes" `[K, 4]` xyxy in padded-input pixels.
    box_coder / matcher: the RetinaNet model's `box_coder` and `proposal_matcher`.
    beta: exponent of the quality-focal factor.

    cls: sum over the anchors the matcher does not ignore (IoU between its thresholds) and
        classes of `BCEWithLogits(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta`;
    box: sum over anchors of `GIoU_loss(decode(s_reg), decode(t_reg)) * max_k sigmoid(t)`.
        box_anchors "all" (the authors: they pass no ignore mask to the box term) or
        "not_ignored" (the classification term's anchors).
    Both sums run over the whole batch and are divided by the number of positive anchors:
    normalizer "per_image" `sum_i max(1, #pos_i)` (the authors: MMDetection clamps each
    image's sampling result) or "batch" `max(1, sum_i #pos_i)`; they differ only when an
    image has no positive. (torchvision's own RetinaNet loss normalises per image and
    averages images.)
    matched: `retinanet_matches(anchors, targets, matcher)` when the caller already has it
        (the other amplifier of the step); computed here otherwise.
    """
    _check_targets(anchors, targets)
    if matched is None:
        matched = retinanet_matches(anchors, targets, matcher)
    return _dense_amplifier_kd(
        head, student_feats, teacher_feats, anchors, matched, decode=box_coder.decode_single,
        box_loss=lambda s, t: generalized_box_iou_loss(s, t, reduction="none"), beta=beta, box_anchors=box_anchors,
        normalizer=normalizer)


def oriented_retinanet_implicit_loss(
    head: torch.nn.Module,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    anchors: list[Tensor],
    targets: list[dict[str, Tensor]],
    *,
    box_coder: Any,
    assigner: Callable[[Tensor, Tensor], Tensor],
    beta: float = 1.0,
    box_anchors: BoxAnchors = "all",
    normalizer: Normalizer = "per_image",
    matched: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """{"cls", "box"}: `retinanet_implicit_loss` for the oriented RetinaNet (`retinanet_obb`).

    anchors: one `[A, 5]` set of rotated anchors per image; targets hold "rboxes" `[K, 5]` (le90);
    box_coder / assigner: the teacher's `OrientedBoxCoder` and `RotatedMaxIoUAssigner`.
    The classification term is the horizontal one on the rotated assigner's anchors; the box term
    is `rotated.kld_loss` between the decoded student and teacher boxes in place of GIoU: GIoU has
    no rotated form, a rotated IoU has no gradient once the boxes are apart and jumps at the le90
    angle boundary, while KLD is smooth in every parameter, the same for every representation of a
    box, and is MMRotate's loss of choice for rotated RetinaNet (its KLD le90 config, log1p, tau 1).
    matched: `oriented_matches(anchors, targets, assigner)`, or None to assign here.
    """
    _check_targets(anchors, targets)
    if matched is None:
        matched = oriented_matches(anchors, targets, assigner)
    return _dense_amplifier_kd(
        head, student_feats, teacher_feats, anchors, matched, decode=lambda d, a: box_coder.decode(a, d),
        box_loss=kld_loss, beta=beta, box_anchors=box_anchors, normalizer=normalizer)


def _check_targets(anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
    if len(anchors) != len(targets):
        raise Ds2d2Error(f"{len(anchors)} anchor sets but {len(targets)} targets")


def _dense_amplifier_kd(
    head: torch.nn.Module,
    student_feats: Sequence[Tensor] | Mapping[str, Tensor],
    teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
    anchors: list[Tensor],
    matched: list[Tensor],
    *,
    decode: Callable[[Tensor, Tensor], Tensor],
    box_loss: Callable[[Tensor, Tensor], Tensor],
    beta: float,
    box_anchors: BoxAnchors,
    normalizer: Normalizer,
) -> dict[str, Tensor]:
    """The dense (per-anchor) amplifier KD both RetinaNets share, given each anchor's match
    (box index, -1 negative, -2 ignored): see `retinanet_implicit_loss`."""
    student, teacher = _level_list(student_feats), _level_list(teacher_feats)
    if len(student) != len(teacher) or not student:
        raise Ds2d2Error(f"student has {len(student)} FPN levels, teacher {len(teacher)}")
    if len(anchors) != len(matched) or len(anchors) != student[0].shape[0]:
        raise Ds2d2Error(f"{len(anchors)} anchor sets, {len(matched)} targets for a batch of {student[0].shape[0]}")

    s_out = head(student)
    with torch.no_grad():
        t_out = head(teacher)
    s_cls, s_reg = s_out["cls_logits"].float(), s_out["bbox_regression"].float()
    t_cls, t_reg = t_out["cls_logits"].float(), t_out["bbox_regression"].float()
    for i, a in enumerate(anchors):
        if a.shape[0] != s_cls.shape[1]:
            raise Ds2d2Error(f"image {i}: {a.shape[0]} anchors but the head predicts {s_cls.shape[1]}")

    with torch.no_grad():
        keep = torch.stack([m != det_utils.Matcher.BETWEEN_THRESHOLDS for m in matched])  # [N, A]
        positives = torch.stack([(m >= 0).sum() for m in matched]).float()
        if normalizer == "per_image":
            num_pos = positives.clamp_min(1).sum()
        elif normalizer == "batch":
            num_pos = positives.sum().clamp_min(1)
        else:
            raise Ds2d2Error(f"unknown normalizer {normalizer!r} (per_image or batch)")
        if box_anchors not in ("all", "not_ignored"):
            raise Ds2d2Error(f"unknown box_anchors {box_anchors!r} (all or not_ignored)")
        box_keep = keep if box_anchors == "not_ignored" else torch.ones_like(keep)
        # Row-major boolean indexing of [N, A, ...] keeps image 0's anchors first, like this cat.
        box_anchor_boxes = torch.cat([a[k] for a, k in zip(anchors, box_keep)]).float()

    s_logits, t_logits = s_cls[keep], t_cls[keep]  # [V, K]
    t_prob = t_logits.sigmoid()
    quality = (s_logits.sigmoid() - t_prob).abs().pow(beta)
    cls = (F.binary_cross_entropy_with_logits(s_logits, t_prob, reduction="none") * quality).sum() / num_pos

    s_boxes = decode(s_reg[box_keep], box_anchor_boxes)
    with torch.no_grad():
        t_boxes = decode(t_reg[box_keep], box_anchor_boxes)
        box_prob = t_cls[box_keep].sigmoid()
        box_weight = box_prob.max(dim=1).values if box_prob.shape[1] else box_prob.new_zeros(box_prob.shape[0])
    box = (box_loss(s_boxes, t_boxes) * box_weight).sum() / num_pos
    return {"cls": cls, "box": box}


def sample_rois(roi_heads: RoIHeads, proposals: list[Tensor], targets: list[dict[str, Tensor]],
                per_image: int | None = None) -> list[Tensor]:
    """RoIs as the RoI head samples them in training (512 per image, 25% positive, GT added);
    `per_image` draws that many instead, at the same positive fraction (`distill.implicit_rois`)."""
    if per_image is None:
        with torch.no_grad():
            return roi_heads.select_training_samples([p.detach() for p in proposals], targets)[0]
    sampler = roi_heads.fg_bg_sampler
    roi_heads.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(per_image, sampler.positive_fraction)
    try:
        with torch.no_grad():
            return roi_heads.select_training_samples([p.detach() for p in proposals], targets)[0]
    finally:
        roi_heads.fg_bg_sampler = sampler


def faster_rcnn_implicit_loss(
    roi_heads: RoIHeads,
    student_feats: dict[str, Tensor],
    teacher_feats: dict[str, Tensor],
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
    *,
    temperature: float = 3.0,
    cls_weight: float = 0.5,
    rois: list[Tensor] | None = None,
    roi_reduction: RoIReduction = "sum",
) -> dict[str, Tensor]:
    """{"cls", "box"}: Faster R-CNN amplifier KD on RoIs sampled from the student's proposals.

    roi_heads: the frozen amplifier's RoIHeads (the teacher's `model.roi_heads` for the
        full-frequency amplifier).
    student_feats / teacher_feats: FPN dicts ("0".."3", "pool"), student raw (or adapted
        when its width differs); for the HF amplifier pass `high_frequency` of each level.
    proposals: the student's RPN proposals, one `[P, 4]` per image (detached here).
    image_sizes: the `ImageList.image_sizes` of the batch.
    targets: one dict per image with "boxes" and "labels".

    RoIs come from `roi_heads.select_training_samples` (its sampler: 512 per image, 25%
    positive, GT boxes appended; it draws from torch's global RNG). It is a plain method,
    so it works with the module in eval mode too.
    cls: `cls_weight * T^2 * KL(softmax(t/T) || softmax(s/T))`, summed over classes, then
        over the sampled RoIs of the batch: roi_reduction "sum" is what the authors' code
        computes (it hands the RoI count to the loss as its per-sample weight, so the
        per-RoI mean is multiplied by the number of RoIs, 1024 for their 2 images per
        GPU; their 1e-5 implicit weights were tuned at that scale, and it grows with the
        images per process); "mean" divides by the RoI count, as the paper's formula reads.
    box: L1 between student and teacher class-specific deltas of the teacher's most likely
        foreground class c* = argmax_{k>=1} softmax(t)_k, weighted by that probability
        p* (at T = 1), normalised by `4 * sum(p*)` (clamped away from 0).
    rois: RoIs already drawn with `sample_rois` (None: drawn here). The authors draw anew for
        each amplifier; passing one draw to both (`distill.implicit_roi_draw=shared`) makes
        both streams compare predictions on the same boxes.
    """
    if list(student_feats) != list(teacher_feats):
        raise Ds2d2Error(f"student FPN levels {list(student_feats)} do not match teacher {list(teacher_feats)}")
    if rois is None:
        rois = sample_rois(roi_heads, proposals, targets)

    s_logits, s_deltas = roi_heads.box_predictor(
        roi_heads.box_head(roi_heads.box_roi_pool(student_feats, rois, image_sizes))
    )
    with torch.no_grad():
        t_logits, t_deltas = roi_heads.box_predictor(
            roi_heads.box_head(roi_heads.box_roi_pool(teacher_feats, rois, image_sizes))
        )
    s_logits, s_deltas = s_logits.float(), s_deltas.float()
    t_logits, t_deltas = t_logits.float(), t_deltas.float()
    num_rois, num_classes = s_logits.shape  # num_classes includes background (index 0)
    if num_classes < 2:
        raise Ds2d2Error("the amplifier's box predictor has no foreground class")

    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(s_logits / t, dim=1), F.log_softmax(t_logits / t, dim=1), reduction="sum", log_target=True
    )
    if roi_reduction == "mean":
        kl = kl / max(num_rois, 1)
    elif roi_reduction != "sum":
        raise Ds2d2Error(f"unknown roi_reduction {roi_reduction!r} (sum or mean)")
    cls = cls_weight * (t * t) * kl

    with torch.no_grad():
        fg_prob, fg_idx = t_logits.softmax(dim=1)[:, 1:].max(dim=1)
        fg_idx = fg_idx + 1
    rows = torch.arange(num_rois, device=s_deltas.device)
    s_sel = s_deltas.reshape(num_rois, num_classes, 4)[rows, fg_idx]
    t_sel = t_deltas.reshape(num_rois, num_classes, 4)[rows, fg_idx]
    l1 = (s_sel - t_sel).abs().sum(dim=1) * fg_prob
    box = l1.sum() / (4 * fg_prob.sum()).clamp_min(torch.finfo(l1.dtype).eps)
    return {"cls": cls, "box": box}
