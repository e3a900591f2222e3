"""Oriented boxes: one angle convention, its conversions, polygon and rotated-box IoU, rotated NMS.

The convention is MMRotate's `le90`. A rotated box is (cx, cy, w, h, theta): pixels, theta in
radians, w >= h, theta in [-pi/2, pi/2). Its w side points along (cos theta, sin theta) in image
coordinates (x right, y down), so a positive theta turns the box clockwise on screen. A square
(w == h) has two such forms; it takes the one with theta in [-pi/4, pi/4).

torchvision's `CXCYWHR` (`tv_tensors.BoundingBoxes`) counts degrees counter-clockwise on screen;
`to_torchvision` and `from_torchvision` are the only crossing between the two.

IoU of polygons follows the DOTA devkit's `polyiou`: the intersection is the integral of the
product of the two polygons' winding numbers (each polygon oriented to a positive area first),
the union the two absolute shoelace areas less it. For simple polygons that is the plain area of
overlap; for a self-crossing quadrilateral it is what the devkit scores.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# A point lies inside a convex polygon's edge when its cross product is above -TOLERANCE times
# |edge| |point - edge start|: touching and identical polygons keep their shared vertices.
TOLERANCE = 1e-6
PAIR_CHUNK = 1 << 16  # polygon pairs per vectorised pass (bounds memory)


# --------------------------------------------------------------------------- the convention


def normalize_le90(rboxes: Tensor) -> Tensor:
    """The le90 form of rotated boxes `[..., 5]`: w >= h, theta in [-pi/2, pi/2) ([-pi/4, pi/4) for squares)."""
    cx, cy, w, h, theta = rboxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    theta = torch.where(swap, theta + math.pi / 2, theta)
    theta = _wrap(theta, math.pi)
    theta = torch.where(w == h, _wrap(theta, math.pi / 2), theta)
    return torch.stack([cx, cy, w, h, theta], dim=-1)


def _wrap(theta: Tensor, period: float) -> Tensor:
    """theta into [-period/2, period/2)."""
    out = torch.remainder(theta + period / 2, period) - period / 2
    return torch.where(out >= period / 2, out - period, out)  # remainder can round up to the period


def rbox_to_poly(rboxes: Tensor) -> Tensor:
    """The corners `[..., 4, 2]` of rotated boxes `[..., 5]`, in positive (shoelace) order."""
    cx, cy, w, h, theta = rboxes.unbind(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    ux, uy = w / 2 * cos, w / 2 * sin
    vx, vy = -h / 2 * sin, h / 2 * cos
    xs = torch.stack([cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx], dim=-1)
    ys = torch.stack([cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy], dim=-1)
    return torch.stack([xs, ys], dim=-1)


def poly_to_rbox(poly: np.ndarray | Sequence[float]) -> np.ndarray:
    """The minimum-area rectangle around a polygon `(K, 2)`, as an le90 box `(5,)` (float64).

    The rectangle is searched over the directions of the convex hull's edges (one of them is a
    side of the minimum rectangle); the first of equal areas wins. A polygon of no area gives a
    box with h == 0 (and w == 0 for a single point); the caller decides what that means.
    """
    from ds2d2_cli.data.polygons import convex_hull

    points = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    hull = convex_hull(points)
    if len(hull) == 1:
        return np.array([hull[0, 0], hull[0, 1], 0.0, 0.0, 0.0])
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    d = edges[keep] / lengths[keep, None]  # unit edge directions (E, 2)
    n = np.stack([-d[:, 1], d[:, 0]], axis=1)
    along, across = hull @ d.T, hull @ n.T  # (H, E) projections
    w = along.max(0) - along.min(0)
    h = across.max(0) - across.min(0)
    best = int(np.argmin(w * h))
    mid_along = (along[:, best].max() + along[:, best].min()) / 2
    mid_across = (across[:, best].max() + across[:, best].min()) / 2
    centre = d[best] * mid_along + n[best] * mid_across
    theta = math.atan2(d[best, 1], d[best, 0])
    box = torch.tensor([centre[0], centre[1], w[best], h[best], theta], dtype=torch.float64)
    return normalize_le90(box).numpy()


def to_torchvision(rboxes: Tensor) -> Tensor:
    """le90 boxes -> torchvision `CXCYWHR` (degrees, counter-clockwise on screen)."""
    out = rboxes.clone()
    out[..., 4] = torch.rad2deg(-rboxes[..., 4])
    return out


def from_torchvision(cxcywhr: Tensor) -> Tensor:
    """torchvision `CXCYWHR` boxes -> le90."""
    out = cxcywhr.clone()
    out[..., 4] = torch.deg2rad(-cxcywhr[..., 4])
    return normalize_le90(out)


def rbox_envelope(rboxes: Tensor) -> Tensor:
    """The axis-aligned envelopes `[..., 4]` (x1, y1, x2, y2) of rotated boxes."""
    corners = rbox_to_poly(rboxes)
    return torch.cat([corners.amin(-2), corners.amax(-2)], dim=-1)


# --------------------------------------------------------------------------- areas


def shoelace(poly: Tensor) -> Tensor:
    """Signed areas of polygons `[..., K, 2]` (positive in rbox_to_poly's order)."""
    x, y = poly[..., 0], poly[..., 1]
    return (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1) / 2


def convex_intersection_area(p: Tensor, q: Tensor) -> Tensor:
    """Areas `[...]` of the intersections of convex polygons `p [..., K, 2]` and `q [..., L, 2]`.

    Both must be in positive order. The intersection's vertices are p's corners inside q, q's
    corners inside p and the crossings of their edges; ordered by angle around their centre they
    make a convex polygon whose shoelace area is the answer.
    """
    p_inside = _inside_convex(p, q)  # [..., K]
    q_inside = _inside_convex(q, p)  # [..., L]
    r = (p.roll(-1, -2) - p)[..., :, None, :]  # [..., K, 1, 2] edges of p
    s = (q.roll(-1, -2) - q)[..., None, :, :]  # [..., 1, L, 2] edges of q
    qp = q[..., None, :, :] - p[..., :, None, :]  # [..., K, L, 2]
    denom = _cross(r, s)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    t = _cross(qp, s) / safe
    u = _cross(qp, r) / safe
    crossing = (denom != 0) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    points = (p[..., :, None, :] + t[..., None] * r).flatten(-3, -2)  # [..., K*L, 2]
    candidates = torch.cat([p, q, points], dim=-2)
    valid = torch.cat([p_inside, q_inside, crossing.flatten(-2)], dim=-1)
    count = valid.sum(-1)
    weights = valid.to(candidates.dtype)[..., None]
    centre = (candidates * weights).sum(-2) / count.clamp(min=1)[..., None].to(candidates.dtype)
    offset = candidates - centre[..., None, :]
    angle = torch.atan2(offset[..., 1], offset[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones sort last
    order = angle.argsort(dim=-1)
    ordered = torch.gather(candidates, -2, order[..., None].expand_as(candidates))
    ranks = torch.arange(ordered.shape[-2], device=ordered.device)
    first = ordered[..., :1, :].expand_as(ordered)
    ordered = torch.where((ranks < count[..., None])[..., None], ordered, first)  # padding adds no area
    area = shoelace(ordered).abs()
    return torch.where(count >= 3, area, torch.zeros_like(area))


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside_convex(points: Tensor, poly: Tensor) -> Tensor:
    """Which of `points [..., K, 2]` lie in the convex, positive `poly [..., L, 2]` (edges included)."""
    edges = (poly.roll(-1, -2) - poly)[..., None, :, :]  # [..., 1, L, 2]
    rel = points[..., :, None, :] - poly[..., None, :, :]  # [..., K, L, 2]
    side = _cross(edges, rel)
    scale = torch.linalg.vector_norm(edges, dim=-1) * torch.linalg.vector_norm(rel, dim=-1)
    return (side >= -TOLERANCE * scale).all(-1)


def polygon_intersection_area(p: Tensor, q: Tensor) -> Tensor:
    """The devkit's intersection `[...]` of polygons `p [..., K, 2]` and `q [..., L, 2]` (pairs aligned).

    Each polygon is oriented to a positive area, then cut into the signed fan triangles
    (v0, vi, vi+1); the signed sum of the triangles' pairwise convex intersections is the
    integral of the product of winding numbers.
    """
    p, q = _positive(p), _positive(q)
    tp, sp = _fan(p)  # [..., Tp, 3, 2], [..., Tp]
    tq, sq = _fan(q)
    a = tp[..., :, None, :, :].expand(*tp.shape[:-3], tp.shape[-3], tq.shape[-3], 3, 2)
    b = tq[..., None, :, :, :].expand_as(a)
    areas = convex_intersection_area(a, b)  # [..., Tp, Tq]
    return (areas * sp[..., :, None] * sq[..., None, :]).sum((-2, -1))


def _positive(poly: Tensor) -> Tensor:
    negative = shoelace(poly) < 0
    return torch.where(negative[..., None, None], poly.flip(-2), poly)


def _fan(poly: Tensor) -> tuple[Tensor, Tensor]:
    """Fan triangles `[..., K-2, 3, 2]` in positive order and their orientation signs `[..., K-2]`."""
    k = poly.shape[-2]
    v0 = poly[..., :1, :].expand(*poly.shape[:-2], k - 2, 2)
    tri = torch.stack([v0, poly[..., 1:k - 1, :], poly[..., 2:k, :]], dim=-2)
    sign = torch.sign(shoelace(tri))
    tri = torch.where((sign < 0)[..., None, None], tri.flip(-2), tri)
    return tri, sign


def _union_iou(inter: Tensor, area_p: Tensor, area_q: Tensor) -> Tensor:
    union = area_p + area_q - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(union))


def polygon_iou_pairs(p: Tensor, q: Tensor) -> Tensor:
    """IoU `[P]` of aligned polygon pairs `p [P, K, 2]`, `q [P, L, 2]`, as the DOTA devkit's `iou_poly`."""
    out = torch.empty(p.shape[0], dtype=p.dtype, device=p.device)
    for start in range(0, p.shape[0], PAIR_CHUNK):
        a, b = p[start:start + PAIR_CHUNK], q[start:start + PAIR_CHUNK]
        inter = polygon_intersection_area(a, b)
        out[start:start + PAIR_CHUNK] = _union_iou(inter, shoelace(a).abs(), shoelace(b).abs())
    return out


def rotated_iou_pairs(a: Tensor, b: Tensor) -> Tensor:
    """IoU `[P]` of aligned rotated-box pairs `a [P, 5]`, `b [P, 5]` (le90 or any angle)."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], PAIR_CHUNK):
        x, y = a[start:start + PAIR_CHUNK], b[start:start + PAIR_CHUNK]
        inter = convex_intersection_area(rbox_to_poly(x), rbox_to_poly(y))
        out[start:start + PAIR_CHUNK] = _union_iou(inter, x[:, 2] * x[:, 3], y[:, 2] * y[:, 3])
    return out


def rotated_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU `[N, M]` of rotated boxes `a [N, 5]` and `b [M, 5]`.

    Only pairs whose envelopes overlap are intersected; the rest are 0.
    """
    ea, eb = rbox_envelope(a), rbox_envelope(b)
    overlap = ((torch.minimum(ea[:, None, 2], eb[None, :, 2]) > torch.maximum(ea[:, None, 0], eb[None, :, 0]))
               & (torch.minimum(ea[:, None, 3], eb[None, :, 3]) > torch.maximum(ea[:, None, 1], eb[None, :, 1])))
    out = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    i, j = overlap.nonzero(as_tuple=True)
    if len(i):
        out[i, j] = rotated_iou_pairs(a[i], b[j])
    return out


# --------------------------------------------------------------------------- NMS


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of rotated boxes `[N, 5]`: indices kept, best score first (torchvision's `nms` rule).

    A box is dropped when a kept box of higher score overlaps it with IoU > iou_threshold. The
    greedy answer is the fixed point of "kept = not suppressed by a kept, better box", reached
    in as many sweeps as the longest chain of suppressions; each sweep is one sparse product.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    ranked = boxes[order]
    iou = rotated_box_iou(ranked, ranked)
    suppresses = torch.triu(iou > iou_threshold, diagonal=1)  # better (row) over worse (column)
    rows, cols = suppresses.nonzero(as_tuple=True)
    kept = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        hit = torch.zeros_like(kept)
        hit[cols[kept[rows]]] = True
        updated = ~hit
        if torch.equal(updated, kept):
            break
        kept = updated
    return order[kept]


def batched_rotated_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Rotated NMS within each category of `idxs`, as torchvision's `batched_nms`: boxes are offset apart."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    reach = rbox_envelope(boxes).abs().max() * 2 + 1
    shifted = boxes.clone()
    shifted[:, :2] = boxes[:, :2] + (idxs.to(boxes.dtype) * reach)[:, None]
    return rotated_nms(shifted, scores, iou_threshold)
