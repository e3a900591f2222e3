"""ds2d2_cli.rotated: the le90 convention, its conversions, polygon and rotated-box IoU, rotated NMS.

Hand-checked values where the geometry allows; shapely (a dev-only dependency) is the polygon
reference elsewhere, and a plain greedy loop the NMS reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds2d2_cli.rotated import (
    batched_rotated_nms,
    from_torchvision,
    normalize_le90,
    overlapping_envelopes,
    poly_to_rbox,
    polygon_iou_pairs,
    rbox_envelope,
    rbox_to_poly,
    rotated_box_iou,
    rotated_iou_pairs,
    rotated_nms,
    shoelace,
    to_torchvision,
)

shapely = pytest.importorskip("shapely")
from shapely.geometry import Polygon  # noqa: E402

PI = math.pi


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def random_boxes(n: int, seed: int, scene: float = 100.0, dtype=torch.float64) -> torch.Tensor:
    """Boxes of 1-60 px, any angle (not normalised), in a small scene so that many overlap."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * scene
    wh = 1 + torch.rand(n, 2, generator=gen) * 59
    theta = (torch.rand(n, 1, generator=gen) - 0.5) * 4 * PI
    return torch.cat([xy, wh, theta], dim=1).to(dtype)


def shapely_iou(p: np.ndarray, q: np.ndarray) -> float:
    a, b = Polygon(p), Polygon(q)
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("given, expected", [
    ((0, 0, 4, 2, 0.3), (0, 0, 4, 2, 0.3)),  # already le90
    ((0, 0, 2, 4, 0.0), (0, 0, 4, 2, -PI / 2)),  # w < h: swap, +pi/2, then wrap pi/2 -> -pi/2
    ((0, 0, 2, 4, -0.5), (0, 0, 4, 2, PI / 2 - 0.5)),
    ((0, 0, 4, 2, PI / 2), (0, 0, 4, 2, -PI / 2)),  # the upper end wraps
    ((0, 0, 4, 2, -PI / 2), (0, 0, 4, 2, -PI / 2)),  # the lower end stays
    ((0, 0, 4, 2, 3.0), (0, 0, 4, 2, 3.0 - PI)),
    ((0, 0, 4, 2, -7.0), (0, 0, 4, 2, -7.0 + 2 * PI)),
    ((0, 0, 3, 3, PI / 4), (0, 0, 3, 3, -PI / 4)),  # squares: [-pi/4, pi/4)
    ((0, 0, 3, 3, 1.0), (0, 0, 3, 3, 1.0 - PI / 2)),
    ((0, 0, 3, 3, -PI / 4), (0, 0, 3, 3, -PI / 4)),
])
def test_normalize_le90_hand_cases(given, expected):
    out = normalize_le90(boxes(given))[0]
    assert torch.allclose(out, boxes(expected)[0], atol=1e-12)


def test_normalize_le90_keeps_the_same_corners():
    b = random_boxes(200, seed=1)
    n = normalize_le90(b)
    assert ((n[:, 2] >= n[:, 3]) & (n[:, 4] >= -PI / 2) & (n[:, 4] < PI / 2)).all()
    for p, q in zip(rbox_to_poly(b).numpy(), rbox_to_poly(n).numpy()):
        assert Polygon(p).equals_exact(Polygon(q), 1e-9) or Polygon(p).symmetric_difference(Polygon(q)).area < 1e-9


def test_rbox_to_poly_hand_corners():
    # theta 0: u = (2, 0), v = (0, 1) -> c-u-v, c+u-v, c+u+v, c-u+v
    assert rbox_to_poly(boxes((10, 20, 4, 2, 0))).tolist() == [[[8, 19], [12, 19], [12, 21], [8, 21]]]
    # theta pi/2: u = (0, 2), v = (-1, 0)
    corners = rbox_to_poly(boxes((10, 20, 4, 2, PI / 2)))[0]
    assert torch.allclose(corners, boxes((11, 18), (11, 22), (9, 22), (9, 18)), atol=1e-12)
    assert shoelace(corners) == pytest.approx(8.0)  # positive order, area w*h
    # theta pi/6: u = (sqrt3, 1), v = (-1/2, sqrt3/2)
    s = math.sqrt(3)
    corners = rbox_to_poly(boxes((0, 0, 4, 2, PI / 6)))[0]
    expected = boxes((-s + 0.5, -1 - s / 2), (s + 0.5, 1 - s / 2), (s - 0.5, 1 + s / 2), (-s - 0.5, -1 + s / 2))
    assert torch.allclose(corners, expected, atol=1e-12)


def test_rbox_envelope():
    s = math.sqrt(3)
    env = rbox_envelope(boxes((0, 0, 4, 2, PI / 6)))[0]
    assert torch.allclose(env, boxes((-s - 0.5, -1 - s / 2, s + 0.5, 1 + s / 2))[0], atol=1e-12)


@pytest.mark.parametrize("theta", [-PI / 2, -1.2, -PI / 4, -0.3, 0.0, 0.2, PI / 3, 1.5])
def test_poly_to_rbox_recovers_rectangles(theta):
    box = boxes((350.5, 120.25, 80, 30, theta))
    got = poly_to_rbox(rbox_to_poly(box)[0].numpy())
    assert np.allclose(got, box[0].numpy(), atol=1e-9)
    # a square's two sides come out equal only up to rounding, so its angle may be either form:
    # the same four corners is what counts
    square = boxes((10, 20, 7, 7, theta))
    got = poly_to_rbox(rbox_to_poly(square)[0].numpy()[::-1])  # either order
    assert got[2] == pytest.approx(7) and got[3] == pytest.approx(7) and -PI / 2 <= got[4] < PI / 2
    corners = rbox_to_poly(torch.from_numpy(got))
    assert torch.cdist(corners, rbox_to_poly(square)[0]).min(dim=1).values.max() < 1e-9


def test_poly_to_rbox_minimum_area_rectangle_of_a_quad():
    quad = np.array([[0, 0], [10, 1], [12, 7], [1, 5]], dtype=np.float64)
    box = poly_to_rbox(quad)
    reference = Polygon(quad).minimum_rotated_rectangle
    assert box[2] * box[3] == pytest.approx(reference.area, rel=1e-12)
    assert box[2] >= box[3] and -PI / 2 <= box[4] < PI / 2
    rect = Polygon(rbox_to_poly(torch.from_numpy(box)).numpy())
    assert rect.buffer(1e-9).contains(Polygon(quad))
    assert rect.symmetric_difference(reference).area < 1e-9


def test_poly_to_rbox_degenerate():
    assert np.allclose(poly_to_rbox([[0, 0], [4, 0], [2, 0]]), [2, 0, 4, 0, 0])  # a segment: h = 0
    assert np.allclose(poly_to_rbox([[0, 0], [0, 4]]), [0, 2, 4, 0, -PI / 2])  # vertical: theta -pi/2
    assert np.allclose(poly_to_rbox([[1, 2], [1, 2], [1, 2]]), [1, 2, 0, 0, 0])  # a point


def test_torchvision_round_trip_and_corners():
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    # le90 theta = -30 degrees is 30 degrees counter-clockwise on screen
    assert torch.allclose(to_torchvision(boxes((10, 20, 4, 2, -PI / 6))), boxes((10, 20, 4, 2, 30.0)))
    b = normalize_le90(random_boxes(50, seed=2) + torch.tensor([200.0, 200, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(from_torchvision(to_torchvision(b)), b, atol=1e-9)
    tv = tv_tensors.BoundingBoxes(to_torchvision(b), format="CXCYWHR", canvas_size=(1000, 1000))
    theirs = F.convert_bounding_box_format(tv, new_format="XYXYXYXY").as_subclass(torch.Tensor).reshape(-1, 4, 2)
    ours = rbox_to_poly(b)
    for p, q in zip(ours, theirs):  # the same four points, in whatever order
        assert torch.cdist(p, q).min(dim=1).values.max() < 1e-9


# --------------------------------------------------------------------------- rotated-box IoU


def test_rotated_box_iou_matches_shapely_on_random_boxes():
    a, b = random_boxes(120, seed=3), random_boxes(90, seed=4)
    iou = rotated_box_iou(a, b)
    pa, pb = rbox_to_poly(a).numpy(), rbox_to_poly(b).numpy()
    expected = np.array([[shapely_iou(p, q) for q in pb] for p in pa])
    assert (expected > 0).sum() > 500  # the scene is crowded: many real overlaps
    assert np.abs(iou.numpy() - expected).max() < 1e-9


def test_rotated_box_iou_float32_close_to_float64():
    a, b = random_boxes(150, seed=5, scene=1000), random_boxes(150, seed=6, scene=1000)
    a[:, 2:4] *= 3
    exact = rotated_box_iou(a, b)
    single = rotated_box_iou(a.float(), b.float())
    assert single.dtype == torch.float32
    assert (exact > 0).sum() > 50
    assert (single.double() - exact).abs().max() < 1e-5


def iou_one(a, b) -> float:
    return float(rotated_box_iou(boxes(a), boxes(b))[0, 0])


def test_rotated_iou_degenerate_cases():
    box = (5.0, 7.0, 4.0, 2.0, 0.3)
    c, s = math.cos(0.3), math.sin(0.3)
    assert iou_one(box, box) == pytest.approx(1.0, abs=1e-12)  # identical
    # nested: a 2 x 1 box inside the 4 x 2 one, same angle, off-centre -> 2 / 8
    assert iou_one(box, (5 + 0.5 * c, 7 + 0.5 * s, 2, 1, 0.3)) == pytest.approx(0.25, abs=1e-12)
    # nested with a shared edge: the inner one's long side lies on the outer one's (h 2 -> 1, moved by v/2)
    assert iou_one(box, (5 + 0.5 * s, 7 - 0.5 * c, 4, 1, 0.3)) == pytest.approx(0.5, abs=1e-12)
    # touching along an edge: moved by h along (-sin, cos)
    assert iou_one(box, (5 - 2 * s, 7 + 2 * c, 4, 2, 0.3)) == pytest.approx(0.0, abs=1e-12)
    # touching at a corner only: moved by w along (cos, sin) and h along (-sin, cos)
    assert iou_one(box, (5 + 4 * c - 2 * s, 7 + 4 * s + 2 * c, 4, 2, 0.3)) == pytest.approx(0.0, abs=1e-12)
    # the 90-degree ambiguity: (w, h, t) and (h, w, t + pi/2) are one box
    assert iou_one(box, (5, 7, 2, 4, 0.3 + PI / 2)) == pytest.approx(1.0, abs=1e-12)
    assert iou_one(box, (5, 7, 4, 2, 0.3 + PI)) == pytest.approx(1.0, abs=1e-12)
    # squares: a square and itself turned 45 degrees -> overlap is the regular octagon
    # side 2 square: octagon area 8 (sqrt2 - 1) ; union 8 - that
    octagon = 8 * (math.sqrt(2) - 1)
    assert iou_one((0, 0, 2, 2, 0), (0, 0, 2, 2, PI / 4)) == pytest.approx(octagon / (8 - octagon), abs=1e-12)
    # crossing at right angles: a 10 x 2 bar and the same bar turned -> 4 / (20 + 20 - 4)
    assert iou_one((0, 0, 10, 2, 0.7), (0, 0, 10, 2, 0.7 + PI / 2)) == pytest.approx(4 / 36, abs=1e-12)
    assert iou_one(box, (500, 700, 4, 2, 0.3)) == 0.0  # far apart
    assert iou_one((0, 0, 0, 0, 0), (0, 0, 0, 0, 0)) == 0.0  # no area: no union


def test_rotated_iou_thin_boxes_match_shapely():
    pairs = [((0, 0, 10, 1e-3, 0.2), (1, 0.1, 10, 1e-3, 0.2)),
             ((0, 0, 10, 1e-3, 0.2), (1, 0.2, 10, 1e-3, 0.2)),
             ((0, 0, 10, 1e-3, 0.2), (0, 0, 10, 1e-3, 1.4)),
             ((0, 0, 10, 1e-3, 0.2), (0, 0, 10, 2e-3, 0.2))]
    for a, b in pairs:
        pa, pb = rbox_to_poly(boxes(a))[0].numpy(), rbox_to_poly(boxes(b))[0].numpy()
        assert iou_one(a, b) == pytest.approx(shapely_iou(pa, pb), abs=1e-9)
    assert iou_one(*pairs[3]) == pytest.approx(0.5, abs=1e-9)  # nested: half the area


def test_rotated_iou_pairs_is_differentiable():
    a = boxes((0.0, 0.0, 6.0, 3.0, 0.3), (10.0, 5.0, 8.0, 2.0, -0.7)).requires_grad_(True)
    b = boxes((1.0, 0.5, 5.0, 4.0, -0.4), (11.0, 4.0, 7.0, 3.0, 0.9)).requires_grad_(True)
    rotated_iou_pairs(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and a.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(rotated_iou_pairs, (a.detach().requires_grad_(), b.detach().requires_grad_()))


def test_rotated_box_iou_shapes_and_empty():
    a = random_boxes(3, seed=7)
    assert rotated_box_iou(a, a[:0]).shape == (3, 0)
    assert rotated_box_iou(a[:0], a).shape == (0, 3)
    assert rotated_iou_pairs(a[:0], a[:0]).shape == (0,)


def test_overlapping_envelopes_is_the_brute_force_set():
    gen = torch.Generator().manual_seed(8)
    for n, m in [(0, 5), (5, 0), (1, 1), (60, 80)]:
        xy = torch.randint(0, 40, (n + m, 2), generator=gen).double()  # ties in x1 on purpose
        wh = torch.randint(0, 12, (n + m, 2), generator=gen).double()  # zero widths too
        env = torch.cat([xy, xy + wh], dim=1)
        ea, eb = env[:n], env[n:]
        i, j = overlapping_envelopes(ea, eb)
        got = sorted(zip(i.tolist(), j.tolist()))
        expected = [(p, q) for p in range(n) for q in range(m)
                    if min(ea[p, 2], eb[q, 2]) > max(ea[p, 0], eb[q, 0])
                    and min(ea[p, 3], eb[q, 3]) > max(ea[p, 1], eb[q, 1])]
        assert got == expected


# --------------------------------------------------------------------------- polygon IoU (devkit)


def test_polygon_iou_pairs_simple_and_concave_match_shapely():
    gen = np.random.default_rng(9)
    ps, qs, expected = [], [], []
    for _ in range(60):  # star-shaped quads around a centre: convex or concave
        for bag in (ps, qs):
            angles = np.sort(gen.uniform(0, 2 * np.pi, 4))
            radii = gen.uniform(1, 10, 4)
            centre = gen.uniform(0, 8, 2)
            poly = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
            bag.append(poly if gen.random() < 0.5 else poly[::-1])  # either orientation
        if Polygon(ps[-1]).is_valid and Polygon(qs[-1]).is_valid:
            expected.append(shapely_iou(ps[-1], qs[-1]))
        else:
            ps.pop(), qs.pop()
    concave = sum(not Polygon(p).equals(Polygon(p).convex_hull) for p in ps)
    assert concave > 10
    got = polygon_iou_pairs(torch.tensor(np.array(ps)), torch.tensor(np.array(qs)))
    assert np.abs(got.numpy() - np.array(expected)).max() < 1e-9


def test_polygon_iou_pairs_self_crossing_quad_is_the_devkit_value():
    # The bow-tie (0,0) (2,2) (2,0) (0,2) has two unit triangles: the left one x < 1 winding +1,
    # the right one x > 1 winding -1, so its signed area is 0 (the devkit does not reverse it).
    # Against the rectangle [0, 1.5] x [0, 2] (area 3): the left lobe counts +1, the right lobe's
    # part with x in [1, 1.5] (area of y in [2-x, x] = 0.25) counts -0.25 -> intersection 0.75;
    # union = |0| + 3 - 0.75 = 2.25; IoU = 1/3. Against [0, 1] x [0, 2]: 1 / (0 + 2 - 1) = 1.
    bow = torch.tensor([[[0, 0], [2, 2], [2, 0], [0, 2]]] * 2, dtype=torch.float64)
    rects = torch.tensor([[[0, 0], [1.5, 0], [1.5, 2], [0, 2]], [[0, 0], [1, 0], [1, 2], [0, 2]]], dtype=torch.float64)
    got = polygon_iou_pairs(bow, rects)
    assert got.tolist() == pytest.approx([1 / 3, 1.0], abs=1e-12)


# --------------------------------------------------------------------------- NMS


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """The textbook loop: best first, keep a box unless a kept one overlaps it by more than threshold."""
    iou = rotated_box_iou(boxes, boxes).tolist()
    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: (-float(scores[k]), k)):
        if all(iou[i][k] <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", [10, 11, 12])
@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_rotated_nms_is_greedy_nms(seed, threshold):
    b = random_boxes(150, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (150,), generator=gen).double() / 5  # many ties
    kept = rotated_nms(b, scores, threshold)
    assert kept.tolist() == greedy_nms(b, scores, threshold)
    assert kept.dtype == torch.int64


def test_batched_rotated_nms_is_greedy_nms_per_category():
    b = random_boxes(200, seed=13, scene=60).float() + torch.tensor([3000.0, 3000, 0, 0, 0])  # far from 0, float32
    gen = torch.Generator().manual_seed(13)
    scores = torch.rand(200, generator=gen)
    idxs = torch.randint(0, 7, (200,), generator=gen)
    kept = batched_rotated_nms(b, scores, idxs, 0.3)
    expected = []
    for c in range(7):
        members = (idxs == c).nonzero().flatten()
        expected += members[greedy_nms(b[members], scores[members], 0.3)].tolist()
    expected.sort(key=lambda k: -float(scores[k]))
    assert kept.tolist() == expected


@pytest.mark.parametrize("seed", [10, 14])
def test_nms_in_rounds_is_greedy_nms(seed, monkeypatch):
    """Past NMS_BLOCK boxes NMS settles the best block first and lets its kept boxes thin the
    rest: the same answer, including in a pile where everything overlaps."""
    import ds2d2_cli.rotated as rotated

    monkeypatch.setattr(rotated, "NMS_BLOCK", 16)
    spread = random_boxes(150, seed=seed)
    pile = random_boxes(150, seed=seed, scene=20)
    gen = torch.Generator().manual_seed(seed)
    for b in (spread, pile):
        scores = torch.randint(0, 6, (150,), generator=gen).double() / 5  # many ties
        for threshold in (0.1, 0.5):
            assert rotated_nms(b, scores, threshold).tolist() == greedy_nms(b, scores, threshold)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_cuda_iou_matches_cpu():
    a, b = random_boxes(300, seed=3), random_boxes(200, seed=4)
    torch.testing.assert_close(rotated_box_iou(a.cuda(), b.cuda()).cpu(), rotated_box_iou(a, b), atol=1e-9, rtol=0)


@CUDA
@pytest.mark.parametrize("block", [16, None])
def test_cuda_nms_is_greedy_nms(block, monkeypatch):
    """On a GPU NMS settles larger rounds (ACCELERATOR_NMS_BLOCK); small ones and the default
    give the textbook answer, batched too."""
    import ds2d2_cli.rotated as rotated

    if block is not None:
        monkeypatch.setattr(rotated, "ACCELERATOR_NMS_BLOCK", block)
    gen = torch.Generator().manual_seed(5)
    for b in (random_boxes(150, seed=11), random_boxes(150, seed=12, scene=20)):
        scores = torch.randint(0, 6, (150,), generator=gen).double() / 5
        idxs = torch.randint(0, 3, (150,), generator=gen)
        assert rotated_nms(b.cuda(), scores.cuda(), 0.3).tolist() == greedy_nms(b, scores, 0.3)
        assert batched_rotated_nms(b.cuda(), scores.cuda(), idxs.cuda(), 0.3).tolist() == \
            batched_rotated_nms(b, scores, idxs, 0.3).tolist()


def test_nms_empty_and_single():
    empty = torch.zeros(0, 5)
    assert rotated_nms(empty, torch.zeros(0), 0.5).tolist() == []
    assert batched_rotated_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).tolist() == []
    one = boxes((1, 2, 3, 1, 0.2))
    assert rotated_nms(one, torch.ones(1), 0.5).tolist() == [0]
    assert batched_rotated_nms(one, torch.ones(1), torch.zeros(1, dtype=torch.int64), 0.5).tolist() == [0]


# ----------------------------------------------------------------------------- KLD loss


def test_kld_loss_by_hand():
    """Axis-aligned target (0, 0, 4, 2, 0): covariance diag(4, 1). A centre shift of 1 along x
    gives d = 1/4; a doubled w gives d = 16/4 + 1 + ln(4/16) - 2 = 3 - ln 4. The loss is
    1 - 1/(1 + ln(1 + d))."""
    from ds2d2_cli.rotated import kld_loss

    target = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    shifted = torch.tensor([[1.0, 0.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    wider = torch.tensor([[0.0, 0.0, 8.0, 2.0, 0.0]], dtype=torch.float64)
    for pred, d in ((shifted, 0.25), (wider, 3 - math.log(4))):
        expected = 1 - 1 / (1 + math.log1p(d))
        assert kld_loss(pred, target).item() == pytest.approx(expected, rel=1e-12)
    assert kld_loss(shifted, target, fun="sqrt").item() == pytest.approx(1 - 1 / (1 + 0.5), rel=1e-12)
    # the same box in its other forms: the 1e-6 floor only
    floor = 1 - 1 / (1 + math.log1p(1e-6))
    for same in ([0.0, 0.0, 4.0, 2.0, math.pi], [0.0, 0.0, 2.0, 4.0, math.pi / 2], [0.0, 0.0, 4.0, 2.0, 0.0]):
        assert kld_loss(torch.tensor([same], dtype=torch.float64), target).item() == pytest.approx(floor, rel=1e-6)
    with pytest.raises(ValueError, match="log1p or sqrt"):
        kld_loss(target, target, fun="exp")


def test_kld_loss_has_a_gradient_for_boxes_apart():
    from ds2d2_cli.rotated import kld_loss

    pred = torch.tensor([[50.0, 0.0, 4.0, 2.0, 0.3]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    kld_loss(pred, target).sum().backward()
    assert pred.grad[0, 0] > 0 and torch.isfinite(pred.grad).all()
