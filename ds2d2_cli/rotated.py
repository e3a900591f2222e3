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
CANDIDATE_CHUNK = 1 << 18  # envelope pairs tested per block of the sweep
NMS_BLOCK = 1024  # boxes settled per NMS round when there are more
CPU_PAIR_CHUNK = 1 << 13  # rotated-box pairs per pass on a CPU (temporaries stay in cache)
# On a GPU each pass and round costs kernel launches and host syncs more than arithmetic:
# 10,000 boxes took 40 ms in 1024-box rounds on an H200 (about 4,700 launches), so rounds and
# passes are larger there (about 300 MB of float32 temporaries per pass).
ACCELERATOR_PAIR_CHUNK = 1 << 18
ACCELERATOR_NMS_BLOCK = 4096


# --------------------------------------------------------------------------- the convention


def normalize_le90(rboxes: Tensor) -> Tensor:
    """The le90 form of rotated boxes `[..., 5]`: w >= h, theta in [-pi/2, pi/2) ([-pi/4, pi/4) for squares)."""
    cx, cy, w, h, theta = rboxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    theta = torch.where(swap, theta + math.pi / 2, theta)
    theta = wrap_angle(theta, math.pi)
    theta = torch.where(w == h, wrap_angle(theta, math.pi / 2), theta)
    return torch.stack([cx, cy, w, h, theta], dim=-1)


def wrap_angle(theta: Tensor, period: float = math.pi) -> Tensor:
    """theta (or an angle difference) into [-period/2, period/2); MMRotate's `norm_angle(., 'le90')` at pi."""
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
    """IoU `[P]` of aligned rotated-box pairs `a [P, 5]`, `b [P, 5]` (le90 or any angle); differentiable."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    chunk = _pair_chunk(a.device)
    for start in range(0, a.shape[0], chunk):
        x, y = a[start:start + chunk], b[start:start + chunk]
        inter = _box_intersection_area(x, y)
        out[start:start + chunk] = _union_iou(inter, x[:, 2] * x[:, 3], y[:, 2] * y[:, 3])
    return out


def _pair_chunk(device: torch.device) -> int:
    """Pairs per pass: small enough on a CPU for the temporaries to stay in cache."""
    return ACCELERATOR_PAIR_CHUNK if device.type != "cpu" else CPU_PAIR_CHUNK


def _nms_block(device: torch.device) -> int:
    return ACCELERATOR_NMS_BLOCK if device.type != "cpu" else NMS_BLOCK


def _box_intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Areas `[P]` of the intersections of rotated boxes `a [P, 5]` and `b [P, 5]`.

    Works in b's frame (centre at the origin, sides along the axes), where the nearest point of
    b is a per-coordinate clamp. That projection maps a's outline onto a closed path inside b
    whose signed (Green) area is exactly the area of overlap: the segment from a point outside
    b to its projection never crosses b's interior, so winding numbers inside b are kept. Each
    edge of a maps to at most five straight pieces, cut where it crosses the lines x = +-w/2,
    y = +-h/2; their order along the edge comes from min/max, so nothing is sorted, and a
    misplaced cut (edges nearly parallel to b's sides) only moves a vertex along the path.
    """
    dx, dy = a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]
    cos_b, sin_b = torch.cos(b[:, 4]), torch.sin(b[:, 4])
    cx, cy = cos_b * dx + sin_b * dy, cos_b * dy - sin_b * dx  # a's centre in b's frame
    turn = a[:, 4] - b[:, 4]
    cos_t, sin_t = torch.cos(turn), torch.sin(turn)
    ux, uy = a[:, 2] / 2 * cos_t, a[:, 2] / 2 * sin_t
    vx, vy = -a[:, 3] / 2 * sin_t, a[:, 3] / 2 * cos_t
    x0 = torch.stack([cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx], dim=-1)  # [P, 4] corners
    y0 = torch.stack([cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy], dim=-1)
    ex, ey = x0.roll(-1, -1) - x0, y0.roll(-1, -1) - y0  # edges
    half_w, half_h = (b[:, 2] / 2)[:, None], (b[:, 3] / 2)[:, None]
    x_lo, x_hi = _cuts(x0, ex, half_w)
    y_lo, y_hi = _cuts(y0, ey, half_h)
    first, last = torch.minimum(x_lo, y_lo), torch.maximum(x_hi, y_hi)  # merge two sorted pairs
    inner_lo, inner_hi = torch.maximum(x_lo, y_lo), torch.minimum(x_hi, y_hi)
    zeros, ones = torch.zeros_like(first), torch.ones_like(first)
    t = torch.stack([zeros, first, torch.minimum(inner_lo, inner_hi), torch.maximum(inner_lo, inner_hi),
                     last, ones], dim=-1)  # [P, 4, 6] ordered cuts along each edge
    xs = torch.maximum(torch.minimum(x0[..., None] + t * ex[..., None], half_w[..., None]), -half_w[..., None])
    ys = torch.maximum(torch.minimum(y0[..., None] + t * ey[..., None], half_h[..., None]), -half_h[..., None])
    return (xs[..., :-1] * ys[..., 1:] - xs[..., 1:] * ys[..., :-1]).sum((-2, -1)) / 2


def _cuts(start: Tensor, step: Tensor, half: Tensor) -> tuple[Tensor, Tensor]:
    """Where (in [0, 1], ordered) the edges start + t * step cross -half and +half."""
    flat = step == 0
    safe = torch.where(flat, torch.ones_like(step), step)
    t1 = torch.where(flat, torch.zeros_like(step), (-half - start) / safe).clamp(0, 1)
    t2 = torch.where(flat, torch.zeros_like(step), (half - start) / safe).clamp(0, 1)
    return torch.minimum(t1, t2), torch.maximum(t1, t2)


def rotated_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU `[N, M]` of rotated boxes `a [N, 5]` and `b [M, 5]`.

    Only pairs whose envelopes overlap are intersected (found by a sweep, not an N x M test);
    the rest are 0.
    """
    out = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    i, j = overlapping_envelopes(rbox_envelope(a), rbox_envelope(b))
    if len(i):
        out[i, j] = rotated_iou_pairs(a[i], b[j])
    return out


def overlapping_envelopes(ea: Tensor, eb: Tensor) -> tuple[Tensor, Tensor]:
    """Index pairs `(i, j)` of axis-aligned boxes `ea [N, 4]`, `eb [M, 4]` (xyxy) that overlap with area.

    Sort and sweep along x: b's starting inside a's x-range, then a's starting strictly inside
    b's (each pair once); a y-test filters those. Work and memory follow the x-overlapping
    pairs, block by block, never N x M.
    """
    a_sorted, a_order = _by_left_edge(ea)
    b_sorted, b_order = _by_left_edge(eb)
    k1, m1 = _sweep(a_sorted, b_sorted, strict=False)
    m2, k2 = _sweep(b_sorted, a_sorted, strict=True)
    return a_order[torch.cat([k1, k2])], b_order[torch.cat([m1, m2])]


def _by_left_edge(envelope: Tensor) -> tuple[Tensor, Tensor]:
    order = envelope[:, 0].argsort()
    return envelope[order].T.contiguous(), order  # [4, N]: x1 (sorted), y1, x2, y2


def _sweep(a: Tensor, b: Tensor, strict: bool, skip_self: bool = False) -> tuple[Tensor, Tensor]:
    """Pairs (k, m) of column-major envelopes `a [4, N]`, `b [4, M]` (both sorted by x1) that overlap
    with area, where b[m] starts in a[k]'s x-range: [x1, x2), or (x1, x2) when strict; with
    skip_self (a is b), only m > k."""
    if skip_self:
        first = torch.arange(1, a.shape[1] + 1, device=a.device)
    else:
        first = torch.searchsorted(b[0], a[0], right=strict)
    stop = torch.searchsorted(b[0], a[2])
    count = (stop - first).clamp(min=0)
    ends = torch.cumsum(count, 0)
    total = int(ends[-1]) if len(ends) else 0
    cuts = torch.searchsorted(ends, torch.arange(CANDIDATE_CHUNK, max(total, CANDIDATE_CHUNK), CANDIDATE_CHUNK, device=a.device)) + 1
    bounds = sorted({0, len(count), *cuts.clamp(max=len(count)).tolist()})
    rows, cols = [], []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):  # blocks of rows, about CANDIDATE_CHUNK candidates each
        n = count[r0:r1]
        k = torch.repeat_interleave(torch.arange(r0, r1, device=a.device), n)
        base = ends[r0:r1] - n - (ends[r0] - n[0])  # where each row's run starts inside the block
        m = torch.arange(len(k), device=a.device) - base[k - r0] + first[k]
        keep = (torch.minimum(a[3, k], b[3, m]) > torch.maximum(a[1, k], b[1, m])) & (b[2, m] > b[0, m])
        rows.append(k[keep])
        cols.append(m[keep])
    if not rows:
        empty = torch.empty(0, dtype=torch.int64, device=a.device)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


# --------------------------------------------------------------------------- NMS


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of rotated boxes `[N, 5]`: indices kept, best score first (torchvision's `nms` rule).

    A box is dropped when a kept box of higher score overlaps it with IoU > iou_threshold. The
    greedy answer is the fixed point of "kept = not suppressed by a kept, better box", reached
    in as many sweeps as the longest chain of suppressions; each sweep is one sparse product.
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_rotated_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Rotated NMS within each category of `idxs`, as torchvision's `batched_nms`.

    Categories are kept apart when pairs are searched (an offset envelope, float64), never by
    moving the boxes, so IoUs are those of the boxes as given.
    """
    return _nms(boxes, scores, idxs, iou_threshold)


def _nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    ranked = boxes[order]
    envelope = rbox_envelope(ranked).to(torch.float64)
    if idxs is not None:  # one diagonal step per category: envelopes of different ones never meet
        reach = envelope.abs().max() * 2 + 1
        envelope = envelope + (idxs[order].to(torch.float64) * reach)[:, None]
    block_size = _nms_block(boxes.device)
    if len(order) <= block_size:
        return order[_greedy_keep(ranked, envelope, iou_threshold)]
    # Many boxes, possibly piled up (an untrained model's thousands of candidates on one patch):
    # the best block_size still standing are settled among themselves, then the kept ones remove
    # what they suppress from the rest, so piles cost (kept x rest), not (all x all). Exact:
    # every box is settled only after every better kept box has had its say.
    alive = torch.arange(len(order), device=boxes.device)
    kept: list[Tensor] = []
    while alive.numel():
        block, rest = alive[:block_size], alive[block_size:]
        winners = block[_greedy_keep(ranked[block], envelope[block], iou_threshold)]
        kept.append(winners)
        if rest.numel():
            i, j = overlapping_envelopes(envelope[winners], envelope[rest])
            a, b = winners[i], rest[j]
            possible = _iou_bound(ranked, envelope, a, b) > iou_threshold
            a, b, j = a[possible], b[possible], j[possible]
            suppressed = torch.zeros(len(rest), dtype=torch.bool, device=boxes.device)
            suppressed[j[rotated_iou_pairs(ranked[a], ranked[b]) > iou_threshold]] = True
            rest = rest[~suppressed]
        alive = rest
    return order[torch.cat(kept)]


def _greedy_keep(ranked: Tensor, envelope: Tensor, iou_threshold: float) -> Tensor:
    """Which of `ranked` (best first) greedy NMS keeps: the fixed point over the suppression pairs."""
    i, j = _self_overlaps(envelope)
    better, worse = torch.minimum(i, j), torch.maximum(i, j)  # ranks: lower is better
    possible = _iou_bound(ranked, envelope, better, worse) > iou_threshold
    better, worse = better[possible], worse[possible]
    hit = rotated_iou_pairs(ranked[better], ranked[worse]) > iou_threshold
    rows, cols = better[hit], worse[hit]
    kept = torch.ones(len(ranked), dtype=torch.bool, device=ranked.device)
    while True:
        suppressed = torch.zeros_like(kept)
        suppressed[cols[kept[rows]]] = True
        updated = ~suppressed
        if torch.equal(updated, kept):
            break
        kept = updated
    return kept


def _iou_bound(boxes: Tensor, envelope: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """An upper bound of the IoU of pairs (i, j): their overlap is at most the smaller area and
    the overlap of their envelopes, and IoU grows with the overlap. Cheap, so pairs that cannot
    pass a threshold skip the exact computation."""
    area = (boxes[:, 2] * boxes[:, 3]).to(envelope.dtype)
    e, f = envelope[i], envelope[j]
    wide = (torch.minimum(e[:, 2], f[:, 2]) - torch.maximum(e[:, 0], f[:, 0])).clamp(min=0)
    high = (torch.minimum(e[:, 3], f[:, 3]) - torch.maximum(e[:, 1], f[:, 1])).clamp(min=0)
    a, b = area[i], area[j]
    most = torch.minimum(torch.minimum(a, b), wide * high)
    union = a + b - most
    return torch.where(union > 0, most / union.clamp(min=torch.finfo(union.dtype).tiny), 0) * (1 + 1e-4)


def _self_overlaps(envelope: Tensor) -> tuple[Tensor, Tensor]:
    """Each unordered pair (i, j), i != j, of envelopes `[N, 4]` that overlap with area, once."""
    ordered, order = _by_left_edge(envelope)
    k, m = _sweep(ordered, ordered, strict=False, skip_self=True)
    return order[k], order[m]


# --------------------------------------------------------------------------- losses


def kld_loss(pred: Tensor, target: Tensor, *, tau: float = 1.0, fun: str = "log1p") -> Tensor:
    """Per-pair KLD loss `[...]` between rotated boxes `pred [..., 5]` and `target [..., 5]` (Yang et al., 2021).

    Each box is the Gaussian N((cx, cy), R diag(w^2/4, h^2/4) R^T); the distance
    d = (mu_p - mu_t)^T S_t^-1 (mu_p - mu_t) + tr(S_t^-1 S_p) + ln(det S_t / det S_p) - 2 (twice
    KL(p || t)) is clamped to 1e-6 and mapped to `1 - 1 / (tau + f(d))`, f = log1p or sqrt: MMRotate's
    `GDLoss_v1(loss_type='kld', fun='log1p', tau=1)` of its rotated RetinaNet KLD le90 config. It is
    the same for every representation of a box (theta + pi, sides swapped with theta + pi/2), has a
    gradient where the boxes do not overlap, and weighs a centre error by the target's size.
    """
    if fun not in ("log1p", "sqrt"):
        raise ValueError(f"unknown KLD mapping {fun!r} (log1p or sqrt)")
    # In the target's own axes (angle theta_t), where its covariance is diag(w_t^2/4, h_t^2/4): the
    # closed forms below equal the matrix products exactly and keep float32 precision for long,
    # thin boxes, where inverting the covariance's entries does not.
    wp, hp = pred[..., 2].clamp(1e-7, 1e7), pred[..., 3].clamp(1e-7, 1e7)
    wt, ht = target[..., 2].clamp(1e-7, 1e7), target[..., 3].clamp(1e-7, 1e7)
    cos_t, sin_t = torch.cos(target[..., 4]), torch.sin(target[..., 4])
    dx, dy = pred[..., 0] - target[..., 0], pred[..., 1] - target[..., 1]
    along, across = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
    mahalanobis = 4 * along.square() / wt.square() + 4 * across.square() / ht.square()
    turn = pred[..., 4] - target[..., 4]
    cos2, sin2 = torch.cos(turn).square(), torch.sin(turn).square()
    trace = ((wp.square() * cos2 + hp.square() * sin2) / wt.square()
             + (wp.square() * sin2 + hp.square() * cos2) / ht.square())
    log_det_ratio = 2 * (torch.log(wt * ht) - torch.log(wp * hp))  # ln(det S_t / det S_p)
    distance = (mahalanobis + trace + log_det_ratio - 2).clamp(min=1e-6)
    mapped = torch.log1p(distance) if fun == "log1p" else torch.sqrt(distance)
    return 1 - 1 / (tau + mapped)

