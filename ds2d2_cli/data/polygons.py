"""Small polygon helpers for splitting scenes into patches (numpy only, no shapely).

Polygons are float arrays of shape (N, 2) holding (x, y) vertices in order.
"""

from __future__ import annotations

import numpy as np


def polygon_area(poly: np.ndarray) -> float:
    """Unsigned area by the shoelace formula (0 for fewer than 3 vertices)."""
    poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _clip_half_plane(poly: np.ndarray, axis: int, bound: float, keep_greater: bool) -> np.ndarray:
    """One Sutherland-Hodgman pass: keep the part with coord[axis] >= bound (or <= bound)."""
    if len(poly) == 0:
        return poly
    p = poly
    q = np.roll(poly, -1, axis=0)
    dp = p[:, axis] - bound if keep_greater else bound - p[:, axis]
    dq = q[:, axis] - bound if keep_greater else bound - q[:, axis]
    inside_p = dp >= 0
    crossing = inside_p != (dq >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crossing, dp / np.where(crossing, dp - dq, 1.0), 0.0)
    inter = p + t[:, None] * (q - p)
    inter[:, axis] = bound  # exact on the clip line, no rounding drift
    # For each edge P->Q: emit P when it is inside, then the crossing point when the edge crosses.
    candidates = np.stack([p, inter], axis=1)  # (N, 2, 2)
    mask = np.stack([inside_p, crossing], axis=1)  # (N, 2)
    return candidates[mask]


def clip_polygon(poly: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Clip `poly` to the axis-aligned `box` (x0, y0, x1, y1) by Sutherland-Hodgman.

    Exact for convex polygons; for concave ones the result may contain zero-width
    bridges along the box edge, which do not change its area. Returns an (M, 2) array,
    empty when the polygon lies outside the box.
    """
    x0, y0, x1, y1 = box
    out = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    for axis, bound, keep_greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        out = _clip_half_plane(out, axis, bound, keep_greater)
        if len(out) == 0:
            break
    return out


def dedupe_vertices(poly: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Drop consecutive (cyclically) repeated vertices."""
    if len(poly) < 2:
        return poly
    nxt = np.roll(poly, -1, axis=0)
    keep = np.any(np.abs(poly - nxt) > eps, axis=1)
    return poly[keep]


def _segments_cross(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> bool:
    def orient(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    return o1 * o2 < 0 and o3 * o4 < 0


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (counter-clockwise in y-up terms) by Andrew's monotone chain."""
    pts = sorted({(float(x), float(y)) for x, y in np.asarray(points).reshape(-1, 2)})
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def fix_bowtie(poly: np.ndarray) -> np.ndarray:
    """A self-crossing quadrilateral (vertices in the wrong order) becomes its convex hull.

    Annotators sometimes click the 4 corners out of order; the shoelace area of such a
    "bow-tie" is meaningless. Other polygons are returned unchanged.
    """
    poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(poly) != 4:
        return poly
    if _segments_cross(poly[0], poly[1], poly[2], poly[3]) or _segments_cross(poly[1], poly[2], poly[3], poly[0]):
        return convex_hull(poly)
    return poly
