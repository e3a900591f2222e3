"""Which feature-map cells an object covers: the rule DISW and FGD share, for rotated boxes too.

Both DISW (`disw.py`) and FGD (`fgd.py`) map a horizontal box to the cells
`floor(xmin * k) <= i <= ceil(xmax * k)` (rows likewise), with `k` the cells per pixel of
the map (each module keeps its own scale and arithmetic). Written as geometry, with
`s = 1 / k` the cell size in pixels and `(i s, j s)` the grid point of cell `(i, j)` (its
top-left corner):

    floor(xmin / s) <= i  <=>  xmin < (i + 1) s;   i <= ceil(xmax / s)  <=>  xmax > (i - 1) s

so a cell is covered when the box meets the OPEN square of side `2 s` centred on the cell's
grid point. The oriented rule is that same sentence with the rotated box in place of the
rectangle. The box and the square are convex, so they meet exactly when their projections
overlap on each of the four separating axes: the image x and y axes, and the box's own
axes `u = (cos t, sin t)` and `v = (-sin t, cos t)`.

* On x and y the projection of the box is its envelope (`rotated.rbox_envelope`): those two
  tests ARE the horizontal rule applied to the envelope, and each module computes them
  with its own horizontal arithmetic (so a box with theta = 0 gets exactly its rectangle's
  cells, bit for bit).
* On u and v (`tilted_row_spans`) the box projects to `[c.u - w/2, c.u + w/2]` and
  `[c.v - h/2, c.v + h/2]`, the square to its centre's projection plus or minus
  `s_x |u_x| + s_y |u_y|` (and likewise for v). On one row of grid points each test leaves
  an open x-interval; their intersection is a run of consecutive cells.

So on every row an object covers one run of consecutive cells, which lets DISW keep its
difference-array accumulation (one `+w` / `-w` pair per object and row) and FGD compare
columns against two bounds per row.

A box within `ALIGNED_TOLERANCE` radians of the image axes is treated as axis-aligned: the
u and v tests would repeat the x and y tests in other floating-point arithmetic and could
drop a row or column where an edge lies exactly on a cell border (theta = -pi/2 in float32
is 4.4e-8 rad off). Such a box covers exactly the cells its envelope covers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ALIGNED_TOLERANCE", "axis_aligned", "tilted_row_spans"]

ALIGNED_TOLERANCE = 1e-6  # radians from the image axes within which a box counts as axis-aligned


def axis_aligned(theta: Tensor) -> Tensor:
    """Whether boxes of angle `theta` (radians) lie within `ALIGNED_TOLERANCE` of the image axes."""
    theta = theta.double()
    return torch.sin(2 * theta).abs() <= math.sin(2 * ALIGNED_TOLERANCE)


def _slab(normal_x: Tensor, offset: Tensor, half: Tensor) -> tuple[Tensor, Tensor]:
    """The open interval of `dx` with `|dx * normal_x + offset| < half` (empty: lo = inf, hi = -inf)."""
    safe = torch.where(normal_x == 0, torch.ones_like(normal_x), normal_x)
    a, b = (-half - offset) / safe, (half - offset) / safe
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    inf = torch.full_like(lo, math.inf)
    inside = offset.abs() < half  # normal_x == 0: the whole row or none of it
    lo = torch.where(normal_x == 0, torch.where(inside, -inf, inf), lo)
    hi = torch.where(normal_x == 0, torch.where(inside, inf, -inf), hi)
    return lo, hi


def tilted_row_spans(rboxes: Tensor, cell_w: Tensor | float, cell_h: Tensor | float,
                     rows: Tensor) -> tuple[Tensor, Tensor]:
    """(first, last) cell columns, float64 `[..., B, R]`, that the u and v tests allow per row.

    rboxes: `[B, 5]` (cx, cy, w, h, theta; le90) in the pixels of the map's frame.
    cell_w, cell_h: the cell size in those pixels, a float or a tensor broadcastable to
        `[..., B, 1]` (per level `[L, 1, 1]`, per object `[B, 1]`).
    rows: grid-point row indices `j`, broadcastable to `[..., B, R]`.

    Only the box's own axes are tested here: the caller intersects the result with the
    horizontal rule on the box's envelope (the x and y tests). A run is empty when
    first > last; axis-aligned boxes (`axis_aligned`) get (-inf, inf) on every row.
    """
    box = rboxes.double()
    cx, cy, w, h, theta = (part[:, None] for part in box.unbind(-1))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cell_w = torch.as_tensor(cell_w, dtype=torch.float64, device=box.device)
    cell_h = torch.as_tensor(cell_h, dtype=torch.float64, device=box.device)
    dy = rows.double() * cell_h - cy
    # u = (cos, sin): |dx cos + dy sin| < w/2 + s_x |cos| + s_y |sin|
    lo_u, hi_u = _slab(cos, dy * sin, w / 2 + cell_w * cos.abs() + cell_h * sin.abs())
    # v = (-sin, cos): |-dx sin + dy cos| < h/2 + s_x |sin| + s_y |cos|
    lo_v, hi_v = _slab(-sin, dy * cos, h / 2 + cell_w * sin.abs() + cell_h * cos.abs())
    lo, hi = cx + torch.maximum(lo_u, lo_v), cx + torch.minimum(hi_u, hi_v)
    # grid points i s_x strictly inside (lo, hi)
    first, last = torch.floor(lo / cell_w) + 1, torch.ceil(hi / cell_w) - 1
    aligned = axis_aligned(theta)
    return (torch.where(aligned, -math.inf, first), torch.where(aligned, math.inf, last))
