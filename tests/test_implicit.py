"""Implicit stream (method.md, "Implicit stream"): RetinaNet and Faster R-CNN amplifier KD.

Exact values on hand-built cases (a stub head that returns given predictions), the
batch normalisation, ignored anchors, zero for identical features, gradients into
(adapted) student features only, and integration with real torchvision heads."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou, generalized_box_iou

from ds2d2_cli.distill.explicit import Adapter
from ds2d2_cli.distill.implicit import faster_rcnn_implicit_loss, retinanet_implicit_loss

LN3 = math.log(3.0)


def _retina_kit():
    # RetinaNet's own box coder and matcher (torchvision defaults)
    return {"box_coder": BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)), "matcher": Matcher(0.5, 0.4, True)}


def _kept_batch_kit():
    """The settings before the fidelity pass: box KD on non-ignored anchors, one batch-wide divisor."""
    return {**_retina_kit(), "box_anchors": "not_ignored", "normalizer": "batch"}


class _GivenPredictions(nn.Module):
    """A 'head' whose input is [cls_logits, bbox_regression]: full control of predictions."""

    def forward(self, x):
        return {"cls_logits": x[0], "bbox_regression": x[1]}


# Four anchors against the GT box [0, 0, 10, 10]:
# a0 = GT (IoU 1, positive), a1 disjoint (IoU 0, negative),
# a2 IoU 100/120 = 0.83 (positive), a3 IoU 100/220 = 0.45 (between 0.4 and 0.5: ignored).
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 12], [0, 0, 10, 22]])
GT = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}


def _hand_case():
    s_cls = torch.zeros(1, 4, 1)  # sigmoid 0.5 -> BCE(0, p) = log 2 for every p
    t_cls = torch.tensor([LN3, -LN3, 0.0, 5.0]).reshape(1, 4, 1)  # sigmoid 0.75, 0.25, 0.5, ~1
    s_reg = torch.zeros(1, 4, 4)  # decodes to the anchors
    t_reg = torch.zeros(1, 4, 4)
    t_reg[0, 0, 0] = 0.1  # a0 shifted 1 px right: GIoU loss 1 - 90/110 = 2/11
    t_reg[0, 3] = torch.tensor([1.0, 1.0, 0.5, 0.5])  # ignored anchor: must not count
    return s_cls, s_reg, t_cls, t_reg


def test_retinanet_hand_computed() -> None:
    s_cls, s_reg, t_cls, t_reg = _hand_case()
    out = retinanet_implicit_loss(
        _GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT], **_kept_batch_kit()
    )
    # cls: log 2 * (|0.5 - 0.75| + |0.5 - 0.25| + 0) over a0..a2, / 2 positives
    assert out["cls"].item() == pytest.approx(math.log(2) * 0.5 / 2, rel=1e-6)
    # box: only a0 differs, weight = teacher max score 0.75, / 2 positives
    assert out["box"].item() == pytest.approx(0.75 * (2 / 11) / 2, rel=1e-5)
    # beta = 2 squares the quality factor
    out2 = retinanet_implicit_loss(
        _GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT], beta=2.0, **_kept_batch_kit()
    )
    assert out2["cls"].item() == pytest.approx(math.log(2) * 2 * 0.0625 / 2, rel=1e-6)


def test_retinanet_ignored_anchor_does_not_count() -> None:
    s_cls, s_reg, t_cls, t_reg = _hand_case()

    def loss():
        return retinanet_implicit_loss(
            _GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT], **_kept_batch_kit()
        )

    base = loss()
    s_cls[0, 3], s_reg[0, 3], t_cls[0, 3] = -7.0, torch.tensor([-0.3, 0.2, -1.0, 0.4]), -2.0
    moved = loss()
    assert moved["cls"].item() == base["cls"].item() and moved["box"].item() == base["box"].item()
    # ... whereas the same change on a negative anchor does count
    s_cls[0, 1] = -7.0
    moved = loss()
    assert moved["cls"].item() != base["cls"].item()


def test_retinanet_batch_normalisation_and_empty_image() -> None:
    s_cls, s_reg, t_cls, t_reg = _hand_case()
    # image 2 has no GT: all 4 anchors negative (a3 included), no positives.
    s2_cls = torch.zeros(1, 4, 1)
    t2_cls = torch.tensor([LN3, LN3, LN3, LN3]).reshape(1, 4, 1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = retinanet_implicit_loss(
        _GivenPredictions(),
        [torch.cat([s_cls, s2_cls]), torch.cat([s_reg, s_reg])],
        [torch.cat([t_cls, t2_cls]), torch.cat([t_reg, torch.zeros(1, 4, 4)])],
        [ANCHORS, ANCHORS],
        [GT, empty],
        **_kept_batch_kit(),
    )
    # batch sum / total positives (2): (log2 * 0.5 + log2 * 4 * 0.25) / 2
    assert out["cls"].item() == pytest.approx(math.log(2) * 1.5 / 2, rel=1e-6)
    assert out["box"].item() == pytest.approx(0.75 * (2 / 11) / 2, rel=1e-5)
    # no positive anywhere: divided by max(1, 0) = 1
    only_empty = retinanet_implicit_loss(
        _GivenPredictions(), [s2_cls, s_reg], [t2_cls, torch.zeros(1, 4, 4)], [ANCHORS], [empty], **_kept_batch_kit()
    )
    assert only_empty["cls"].item() == pytest.approx(math.log(2) * 4 * 0.25, rel=1e-6)
    assert only_empty["box"].item() == 0.0


def test_retinanet_box_term_covers_ignored_anchors_by_default() -> None:
    """The authors pass no ignore mask to the box KD: the ignored a3 counts there, not in cls."""
    s_cls, s_reg, t_cls, t_reg = _hand_case()
    t_reg[0, 3] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # a3 (10 x 22) shifted 1 px: GIoU loss 2/11 too
    out = retinanet_implicit_loss(_GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT],
                                  **_retina_kit())
    assert out["cls"].item() == pytest.approx(math.log(2) * 0.5 / 2, rel=1e-6)  # a3 still ignored here
    # a0 (weight 0.75) and a3 (weight sigmoid(5)), each GIoU loss 2/11, over 2 positives
    expected = (0.75 + 1 / (1 + math.exp(-5.0))) * (2 / 11) / 2
    assert out["box"].item() == pytest.approx(expected, rel=1e-5)
    kept = retinanet_implicit_loss(_GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT],
                                   box_anchors="not_ignored", **_retina_kit())
    assert kept["box"].item() == pytest.approx(0.75 * (2 / 11) / 2, rel=1e-5)


def test_retinanet_normaliser_clamps_each_image() -> None:
    """sum_i max(1, pos_i): an image without positives adds 1 to the divisor (2 + 1 = 3)."""
    s_cls, s_reg, t_cls, _ = _hand_case()
    t_reg = torch.zeros(1, 4, 4)
    t_reg[0, 0, 0] = 0.1  # a0 only: GIoU loss 2/11, weight 0.75
    s2_cls = torch.zeros(1, 4, 1)
    t2_cls = torch.tensor([LN3, LN3, LN3, LN3]).reshape(1, 4, 1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    args = (_GivenPredictions(), [torch.cat([s_cls, s2_cls]), torch.cat([s_reg, s_reg])],
            [torch.cat([t_cls, t2_cls]), torch.cat([t_reg, torch.zeros(1, 4, 4)])], [ANCHORS, ANCHORS], [GT, empty])
    out = retinanet_implicit_loss(*args, **_retina_kit())
    assert out["cls"].item() == pytest.approx(math.log(2) * 1.5 / 3, rel=1e-6)
    assert out["box"].item() == pytest.approx(0.75 * (2 / 11) / 3, rel=1e-5)
    batch = retinanet_implicit_loss(*args, normalizer="batch", **_retina_kit())
    assert batch["cls"].item() == pytest.approx(math.log(2) * 1.5 / 2, rel=1e-6)


def test_retinanet_unknown_settings_are_refused() -> None:
    s_cls, s_reg, t_cls, t_reg = _hand_case()
    args = (_GivenPredictions(), [s_cls, s_reg], [t_cls, t_reg], [ANCHORS], [GT])
    with pytest.raises(Exception, match="normalizer"):
        retinanet_implicit_loss(*args, normalizer="per_batch", **_retina_kit())
    with pytest.raises(Exception, match="box_anchors"):
        retinanet_implicit_loss(*args, box_anchors="positives", **_retina_kit())


def test_retinanet_raw_and_adapted_student_features_get_different_gradients() -> None:
    """The authors' wiring (raw features into the head) is not the adapter's: other gradients."""
    head, teacher, anchors, targets = _retina_setup(2)
    adapter = Adapter(8, 8)
    raw = [(t + 0.3 * torch.randn_like(t)).requires_grad_() for t in teacher]
    grads = {}
    for wiring in ("raw", "adapted"):
        student = raw if wiring == "raw" else [adapter(s) for s in raw]
        out = retinanet_implicit_loss(head, student, teacher, anchors, targets, **_retina_kit())
        grads[wiring] = torch.autograd.grad(out["cls"] + out["box"], raw)
        assert all(g.abs().sum() > 0 for g in grads[wiring])
    assert not all(torch.allclose(a, b) for a, b in zip(grads["raw"], grads["adapted"]))


def _retina_setup(seed: int = 0):
    torch.manual_seed(seed)
    head = RetinaNetHead(in_channels=8, num_anchors=9, num_classes=3).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    anchor_gen = AnchorGenerator(((16, 20, 25), (32, 40, 50)), ((0.5, 1.0, 2.0),) * 2)
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (60, 64)])
    teacher = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    anchors = anchor_gen(images, teacher)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 24.0, 20.0], [30, 30, 62, 60]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return head, teacher, anchors, targets


def test_retinanet_identical_features_give_zero() -> None:
    head, teacher, anchors, targets = _retina_setup()
    out = retinanet_implicit_loss(head, [t.clone() for t in teacher], teacher, anchors, targets, **_retina_kit())
    assert out["cls"].item() == 0.0 and out["box"].item() == 0.0


def test_retinanet_adapted_student_gets_gradients_head_and_teacher_do_not() -> None:
    head, teacher, anchors, targets = _retina_setup()
    for p in head.parameters():  # even a head left trainable gets no gradient from the teacher pass
        p.requires_grad_(True)
    adapter = Adapter(4, 8)
    student = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    teacher = [t.requires_grad_() for t in teacher]
    out = retinanet_implicit_loss(head, [adapter(s) for s in student], teacher, anchors, targets, **_retina_kit())
    assert out["cls"].item() > 0 and out["box"].item() > 0
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    (out["cls"] + out["box"]).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert adapter.conv.weight.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher)


def test_retinanet_matches_direct_computation() -> None:
    """The formula transcribed on the real head, with the assignment rules written out (no Matcher)."""
    head, teacher, anchors, targets = _retina_setup(1)
    student = [t + 0.3 * torch.randn_like(t) for t in teacher]
    out = retinanet_implicit_loss(head, student, teacher, anchors, targets, **_kept_batch_kit())
    s, t = head(student), head(teacher)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    cls_sum = box_sum = 0.0
    n_pos = 0
    for i in range(2):
        gt = targets[i]["boxes"]
        if gt.numel():
            q = box_iou(gt, anchors[i])  # [G, A]
            best, _ = q.max(0)
            pos = best >= 0.5
            pos |= (q == q.max(1, keepdim=True).values).any(0)  # low-quality matches
            keep = pos | (best < 0.4)
        else:
            pos = torch.zeros(anchors[i].shape[0], dtype=torch.bool)
            keep = ~pos
        n_pos += int(pos.sum())
        ls, lt = s["cls_logits"][i][keep], t["cls_logits"][i][keep]
        ps, pt = ls.sigmoid(), lt.sigmoid()
        bce = -(pt * torch.log(ps) + (1 - pt) * torch.log(1 - ps))
        cls_sum += (bce * (ps - pt).abs()).sum()
        bs = coder.decode_single(s["bbox_regression"][i][keep], anchors[i][keep])
        bt = coder.decode_single(t["bbox_regression"][i][keep], anchors[i][keep])
        g = torch.diagonal(generalized_box_iou(bs, bt))
        box_sum += ((1 - g) * pt.max(1).values).sum()
    assert n_pos > 0
    torch.testing.assert_close(out["cls"], cls_sum / n_pos, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["box"], box_sum / n_pos, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- Faster R-CNN


class _GivenRoIHeads(nn.Module):
    """RoIHeads stand-in: 'features' {"x": [R, K1 + 4 K1]} are the predictions themselves."""

    def __init__(self, num_classes_with_bg: int):
        super().__init__()
        self.k1 = num_classes_with_bg

    def select_training_samples(self, proposals, targets):
        return proposals, None, None, None

    def box_roi_pool(self, feats, rois, image_sizes):
        return feats["x"]

    def box_head(self, x):
        return x

    def box_predictor(self, x):
        return x[:, : self.k1], x[:, self.k1 :]


def test_faster_rcnn_hand_computed() -> None:
    k1 = 3  # background + 2 classes
    t_logits = torch.tensor([[0.0, LN3, 0.0], [math.log(4.0), 0.0, math.log(2.0)]])
    # teacher probs: row 0 [1/5, 3/5, 1/5] -> fg class 1, p 0.6;
    #                row 1 [4/7, 1/7, 2/7] -> fg class 2 (background ignored), p 2/7
    s_logits = torch.zeros(2, 3)
    t_deltas = torch.zeros(2, k1, 4)
    s_deltas = torch.full((2, k1, 4), 9.0)  # other classes: large but unused
    s_deltas[0, 1] = torch.tensor([1.0, -1.0, 0.5, 0.0])  # L1 2.5
    s_deltas[1, 2] = torch.tensor([0.7, 0.0, 0.0, 0.0])  # L1 0.7
    student = {"x": torch.cat([s_logits, s_deltas.flatten(1)], 1)}
    teacher = {"x": torch.cat([t_logits, t_deltas.flatten(1)], 1)}
    out = faster_rcnn_implicit_loss(_GivenRoIHeads(k1), student, teacher, [torch.zeros(2, 4)], [(8, 8)], [{}],
                                    roi_reduction="mean")
    T = 3.0
    kl = 0.0
    for row in t_logits:
        p = (row / T).softmax(0)
        kl += float((p * (p.log() - math.log(1 / 3))).sum())  # student softmax is uniform
    assert out["cls"].item() == pytest.approx(0.5 * T * T * kl / 2, rel=1e-5)
    w0, w1 = 0.6, 2 / 7
    assert out["box"].item() == pytest.approx((w0 * 2.5 + w1 * 0.7) / (4 * (w0 + w1)), rel=1e-5)
    out = faster_rcnn_implicit_loss(
        _GivenRoIHeads(k1), student, teacher, [torch.zeros(2, 4)], [(8, 8)], [{}], temperature=1.0, cls_weight=1.0,
        roi_reduction="mean",
    )
    kl1 = float(F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction="batchmean"))
    assert out["cls"].item() == pytest.approx(kl1, rel=1e-5)


def test_faster_rcnn_cls_kd_sums_over_rois_by_default() -> None:
    """The authors' effective term: the per-RoI mean times the RoI count (here 5 RoIs)."""
    k1 = 3
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(5, k1), torch.randn(5, k1)
    deltas = torch.zeros(5, 4 * k1)
    student = {"x": torch.cat([s_logits, deltas], 1)}
    teacher = {"x": torch.cat([t_logits, deltas], 1)}
    args = (_GivenRoIHeads(k1), student, teacher, [torch.zeros(5, 4)], [(8, 8)], [{}])
    summed = faster_rcnn_implicit_loss(*args)
    mean = faster_rcnn_implicit_loss(*args, roi_reduction="mean")
    T = 3.0
    per_roi = [float((p * (p.log() - q.log())).sum()) for p, q in zip((t_logits / T).softmax(1), (s_logits / T).softmax(1))]
    assert summed["cls"].item() == pytest.approx(0.5 * T * T * sum(per_roi), rel=1e-5)
    assert summed["cls"].item() == pytest.approx(5 * mean["cls"].item(), rel=1e-6)
    assert summed["box"].item() == mean["box"].item()  # the box term keeps its weighted mean
    with pytest.raises(Exception, match="roi_reduction"):
        faster_rcnn_implicit_loss(*args, roi_reduction="avg")


def _frcnn_setup(channels: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        TwoMLPHead(channels * 7 * 7, 32),
        FastRCNNPredictor(32, 4),
        0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100,  # torchvision FasterRCNN defaults
    ).eval()
    for p in roi_heads.parameters():
        p.requires_grad_(False)
    sizes = {"0": 16, "1": 8, "2": 4, "3": 2, "pool": 1}  # 64x64 input, strides 4..64
    teacher = OrderedDict((k, torch.randn(2, channels, n, n)) for k, n in sizes.items())
    xy = torch.rand(2, 300, 2) * 48
    wh = 4 + torch.rand(2, 300, 2) * 30
    proposals = [torch.cat([xy[i], (xy[i] + wh[i]).clamp(max=64)], 1) for i in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 24.0, 20.0], [30, 30, 62, 60]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return roi_heads, teacher, proposals, [(64, 64), (64, 64)], targets


def test_faster_rcnn_identical_features_give_zero() -> None:
    roi_heads, teacher, proposals, sizes, targets = _frcnn_setup()
    student = OrderedDict((k, v.clone()) for k, v in teacher.items())
    out = faster_rcnn_implicit_loss(roi_heads, student, teacher, proposals, sizes, targets)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-7) and out["box"].item() == 0.0


def test_faster_rcnn_matches_direct_computation_and_gradients() -> None:
    roi_heads, teacher, proposals, sizes, targets = _frcnn_setup()
    adapter = Adapter(5, 8)
    raw = OrderedDict((k, torch.randn(2, 5, *v.shape[-2:], requires_grad=True)) for k, v in teacher.items())
    student = OrderedDict((k, adapter(v)) for k, v in raw.items())

    torch.manual_seed(123)
    out = faster_rcnn_implicit_loss(roi_heads, student, teacher, proposals, sizes, targets, roi_reduction="mean")
    torch.manual_seed(123)  # same RoI sampling
    rois, _, labels, _ = roi_heads.select_training_samples([p.clone() for p in proposals], targets)
    assert sum(r.shape[0] for r in rois) > 0 and any((lab > 0).any() for lab in labels)
    with torch.no_grad():
        s_logits, s_deltas = roi_heads.box_predictor(roi_heads.box_head(roi_heads.box_roi_pool(student, rois, sizes)))
        t_logits, t_deltas = roi_heads.box_predictor(roi_heads.box_head(roi_heads.box_roi_pool(teacher, rois, sizes)))
    T = 3.0
    kl = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
    torch.testing.assert_close(out["cls"], 0.5 * T * T * kl)
    prob = t_logits.softmax(1)
    w, c = prob[:, 1:].max(1)
    r = torch.arange(len(c))
    l1 = (s_deltas.view(-1, 4, 4)[r, c + 1] - t_deltas.view(-1, 4, 4)[r, c + 1]).abs().sum(1)
    torch.testing.assert_close(out["box"], (l1 * w).sum() / (4 * w.sum()))
    assert out["cls"].item() > 0 and out["box"].item() > 0

    (out["cls"] + out["box"]).backward()
    # small RoIs (< 112 px) all pool from level "0" (MultiScaleRoIAlign level mapping)
    assert raw["0"].grad is not None and raw["0"].grad.abs().sum() > 0
    assert raw["pool"].grad is None or raw["pool"].grad.abs().sum() == 0  # not pooled from
    assert adapter.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in roi_heads.parameters())
