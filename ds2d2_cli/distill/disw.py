"""Density-Independent Scale Weight (DISW), method.md "Explicit stream".

Why: in dense remote-sensing scenes most objects are a few cells wide, and a plain
feature-imitation loss is dominated by background and large objects. DISW gives each
ground-truth box a total weight of 1 spread over the band cells it covers, on top of a
background weight of 1:

    W = 1 everywhere; for every box b covering n_b band cells: W[cells(b)] += 1 / n_b

with, for a band map of size h' x w' and a padded batch input of size H_in x W_in,

    x0 = floor(xmin * w' / W_in),  x1 = ceil(xmax * w' / W_in)   (same for y with h'/H_in)

clipped to the map, inclusive ranges. Small boxes get large per-cell weights, large boxes
small ones, and overlapping boxes add up, so dense small objects weigh most whatever
their count.

`disw_weights(boxes, input_hw, band_hw)` builds the map of one band resolution;
`disw_weights_levels(boxes, input_hw, band_hws)` builds all FPN levels in one pass
(cheaper than one call per level). Neither loops over boxes in Python: every box adds
+w/-w at the four corners of its rectangle in a 2-D difference array (one `index_add_`),
and two cumulative sums turn that into the rectangle sums. Accumulation is in float64 so
the result matches the straightforward per-box loop (`_disw_weights_loop`, kept as the
reference for tests and benchmarks) to float32 rounding. The scaled coordinates are
computed as `x * w' / W_in` (multiply first) so that box edges on exact cell borders do
not round across them. No device-to-host synchronisation (no `.item()`; sizes are Python ints).

Rotated boxes (oriented detectors; `[K, 5]` (cx, cy, w, h, theta), le90, in padded-input
pixels) enter the same formula with their own cells (`cells.py`): the cells of the
horizontal rule written as geometry (the box meets the open 2 x 2-cell square centred on
the cell's top-left grid point), applied to the rotated box. In method.md's terms:

* cells(b) are the covered band cells of that rule, clipped to the map as above. On the
  image axes it is the rule above on the box's envelope (the same arithmetic); the box's
  own axes remove the envelope cells its tilted sides do not reach. A box within
  `cells.ALIGNED_TOLERANCE` of the image axes covers its envelope's cells; one with
  theta = 0 gives bit for bit the map of its envelope as an xyxy box.
* n_b is the number of those cells, and each gets 1 / n_b, as for a rectangle: DISW's
  weight is a count of cells, never the box's pixel area, so the rotated box's area
  `w * h` does not enter (and could not, if theta = 0 is to give the rectangle's map).
* Background, overlaps and clipping are unchanged: W = 1 + the sum over boxes.

On each row a rotated box covers one run of consecutive cells, so it adds +w/-w at the
run's two ends (one `index_add_` for all boxes, levels and rows) into a second buffer
that is summed along x only; axis-aligned boxes take the rectangle path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ds2d2_cli.distill.cells import axis_aligned, tilted_row_spans
from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.rotated import rbox_envelope

__all__ = ["disw_weights", "disw_weights_levels"]


def _check_inputs(
    boxes: Sequence[Tensor], input_hw: Sequence[int], band_shapes: Sequence[Sequence[int]]
) -> tuple[int, int, int]:
    """(H_in, W_in, 4 or 5): the input size and the boxes' width (4 xyxy, 5 rotated)."""
    if len(input_hw) != 2 or min(input_hw) <= 0:
        raise Ds2d2Error(f"input_hw must be (H_in, W_in) > 0, got {tuple(input_hw)}")
    if not band_shapes:
        raise Ds2d2Error("DISW needs at least one band shape")
    for shape in band_shapes:
        if len(shape) != 2 or min(shape) <= 0:
            raise Ds2d2Error(f"band shapes must be (h', w') > 0, got {tuple(shape)}")
    widths = {int(b.shape[-1]) for b in boxes if b.dim() == 2}
    width = widths.pop() if len(widths) == 1 else 4
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[-1] != width or width not in (4, 5):
            raise Ds2d2Error(f"boxes of image {i} must be [K, 4] (xmin, ymin, xmax, ymax) or, for every image, "
                             f"[K, 5] (cx, cy, w, h, theta; le90), got {tuple(b.shape)}")
    return int(input_hw[0]), int(input_hw[1]), width


def disw_weights(boxes: Sequence[Tensor], input_hw: Sequence[int], band_hw: Sequence[int]) -> Tensor:
    """The DISW map `[N, 1, h', w']` (float32, on the boxes' device) of one band resolution.

    boxes: one `[K_i, 4]` tensor per image, (xmin, ymin, xmax, ymax) in padded-input pixels,
        or, for every image, `[K_i, 5]` rotated boxes (cx, cy, w, h, theta; le90).
    input_hw: (H_in, W_in), the padded batch input size.
    band_hw: (h', w'), the resolution of the DWT bands the map weighs
        (`spectral.band_shape(feature.shape[-2:], wavelet)`).

    For several FPN levels at once, `disw_weights_levels` is faster.
    """
    return disw_weights_levels(boxes, input_hw, [band_hw])[0]


def disw_weights_levels(
    boxes: Sequence[Tensor],
    input_hw: Sequence[int],
    band_hws: Sequence[Sequence[int]],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Per-level DISW maps `[N, 1, h', w']`, one per entry of `band_hws`, in one pass.

    Same arguments as `disw_weights`, with `band_hws` a sequence of (h', w'). `device`
    defaults to the boxes' device (CPU if there are no images), `dtype` to float32.
    """
    band_shapes = band_hws
    in_h, in_w, width = _check_inputs(boxes, input_hw, band_shapes)
    if device is None:
        device = boxes[0].device if len(boxes) else torch.device("cpu")
    n_img, n_lvl = len(boxes), len(band_shapes)
    hs = torch.tensor([s[0] for s in band_shapes], dtype=torch.float64, device=device)
    ws = torch.tensor([s[1] for s in band_shapes], dtype=torch.float64, device=device)
    buf_h = max(int(s[0]) for s in band_shapes) + 1  # Python ints: no device sync
    buf_w = max(int(s[1]) for s in band_shapes) + 1
    grid = torch.zeros(n_lvl * n_img * buf_h * buf_w, dtype=torch.float64, device=device)
    runs = None  # rotated boxes: per-row runs, summed along x only

    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts):
        all_boxes = torch.cat([b.reshape(-1, width) for b in boxes]).to(device=device, dtype=torch.float64)
        image_idx = torch.repeat_interleave(
            torch.arange(n_img, device=device), torch.tensor(counts, device=device), output_size=sum(counts)
        )
        plane = (torch.arange(n_lvl, device=device)[:, None] * n_img + image_idx[None, :]) * (buf_h * buf_w)
        if width == 4:
            x0, y0, x1, y1 = _cell_ranges(all_boxes, hs, ws, in_h, in_w)
            valid = (x1 >= x0) & (y1 >= y0)
            cells = ((x1 - x0 + 1) * (y1 - y0 + 1)).clamp_min(1)
            weight = torch.where(valid, 1.0 / cells, torch.zeros_like(cells))
            _add_rectangles(grid, plane, (x0, y0, x1, y1), weight, valid, buf_w)
        else:
            runs = _add_rotated(grid, plane, all_boxes, hs, ws, (in_h, in_w), (buf_h, buf_w))

    grid = grid.view(n_lvl, n_img, buf_h, buf_w).cumsum(dim=3).cumsum(dim=2)
    if runs is not None:
        grid = grid + runs.view(n_lvl, n_img, buf_h, buf_w).cumsum(dim=3)
    # Any true nonzero sum is >= 1 / (cells of the largest map); what is far below that is
    # cumsum rounding (e.g. 1e-17 left where boxes cancel): snap it so background is exactly 1.
    grid = torch.where(grid.abs() < 0.5 / (buf_h * buf_w), torch.zeros_like(grid), grid)
    return [
        (1.0 + grid[level, :, :h, :w]).to(dtype).unsqueeze(1)
        for level, (h, w) in enumerate((int(s[0]), int(s[1])) for s in band_shapes)
    ]


def _cell_ranges(xyxy: Tensor, hs: Tensor, ws: Tensor, in_h: int, in_w: int) -> tuple[Tensor, ...]:
    """[L, B] inclusive cell ranges (x0, y0, x1, y1) of xyxy boxes, clipped to each map."""
    # multiply first, then divide (exact on cell borders)
    x0 = torch.floor(xyxy[None, :, 0] * ws[:, None] / in_w).clamp_min(0)
    y0 = torch.floor(xyxy[None, :, 1] * hs[:, None] / in_h).clamp_min(0)
    x1 = torch.minimum(torch.ceil(xyxy[None, :, 2] * ws[:, None] / in_w), ws[:, None] - 1)
    y1 = torch.minimum(torch.ceil(xyxy[None, :, 3] * hs[:, None] / in_h), hs[:, None] - 1)
    return x0, y0, x1, y1


def _add_rectangles(grid: Tensor, plane: Tensor, ranges: tuple[Tensor, ...], weight: Tensor, valid: Tensor,
                    buf_w: int) -> None:
    """Add `weight` over each valid [L, B] cell rectangle: +w/-w at its four corners of the difference array."""
    x0, y0, x1, y1 = ranges
    # Boxes that cover nothing keep weight 0; park their corners at (0, 0).
    x0, y0 = torch.where(valid, x0, 0).long(), torch.where(valid, y0, 0).long()
    x1, y1 = torch.where(valid, x1, 0).long(), torch.where(valid, y1, 0).long()
    corners = (
        (y0 * buf_w + x0, weight),
        (y0 * buf_w + x1 + 1, -weight),
        ((y1 + 1) * buf_w + x0, -weight),
        ((y1 + 1) * buf_w + x1 + 1, weight),
    )
    index = torch.cat([(plane + offset).reshape(-1) for offset, _ in corners])
    values = torch.cat([value.reshape(-1) for _, value in corners])
    grid.index_add_(0, index, values)


def _add_rotated(grid: Tensor, plane: Tensor, rboxes: Tensor, hs: Tensor, ws: Tensor, input_hw: tuple[int, int],
                 buffer_hw: tuple[int, int]) -> Tensor:
    """Rotated boxes `[B, 5]`: axis-aligned ones as rectangles into `grid`; the others as one
    run of cells per row into the returned buffer (to be summed along x only)."""
    (in_h, in_w), (buf_h, buf_w) = input_hw, buffer_hw
    # the x and y tests: the horizontal rule on the envelope, in its own arithmetic
    x0, y0, x1, y1 = _cell_ranges(rbox_envelope(rboxes), hs, ws, in_h, in_w)
    rows = torch.arange(buf_h, dtype=torch.float64, device=grid.device)
    first, last = tilted_row_spans(rboxes, (in_w / ws)[:, None, None], (in_h / hs)[:, None, None], rows)
    first, last = torch.maximum(first, x0[..., None]), torch.minimum(last, x1[..., None])  # [L, B, R]
    in_rows = (rows >= y0[..., None]) & (rows <= y1[..., None])  # y1 <= h' - 1 of each level
    length = torch.where(in_rows, (last - first + 1).clamp_min(0), torch.zeros_like(first))
    cells = length.sum(dim=-1)  # [L, B]; for an axis-aligned box the rectangle's count, exactly
    weight = torch.where(cells > 0, 1.0 / cells.clamp_min(1), torch.zeros_like(cells))
    aligned = axis_aligned(rboxes[:, 4])[None, :]
    rectangle = (x1 >= x0) & (y1 >= y0) & aligned
    _add_rectangles(grid, plane, (x0, y0, x1, y1), torch.where(rectangle, weight, torch.zeros_like(weight)),
                    rectangle, buf_w)
    run = (length > 0) & ~aligned[..., None]
    value = torch.where(run, weight[..., None], torch.zeros_like(length))
    start = torch.where(run, first, 0).long()
    stop = torch.where(run, last + 1, 0).long()  # <= w' < buf_w
    row_start = plane[..., None] + rows.long() * buf_w
    runs = torch.zeros_like(grid)
    runs.index_add_(0, torch.cat([(row_start + start).reshape(-1), (row_start + stop).reshape(-1)]),
                    torch.cat([value.reshape(-1), -value.reshape(-1)]))
    return runs


def _disw_weights_loop(
    boxes: Sequence[Tensor],
    input_hw: Sequence[int],
    band_shapes: Sequence[Sequence[int]],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Reference: the DISW formula transcribed box by box (slow; tests and benchmarks only).

    Same arguments and result as `disw_weights_levels`.
    """
    in_h, in_w, width = _check_inputs(boxes, input_hw, band_shapes)
    if width != 4:
        raise Ds2d2Error("the reference loop takes xyxy boxes only")
    if device is None:
        device = boxes[0].device if len(boxes) else torch.device("cpu")
    maps = []
    for h, w in band_shapes:
        h, w = int(h), int(w)
        weight = torch.ones(len(boxes), 1, h, w, dtype=torch.float64, device=device)
        for i, image_boxes in enumerate(boxes):
            for xmin, ymin, xmax, ymax in image_boxes.double().tolist():
                x0 = max(0, math.floor(xmin * w / in_w))
                y0 = max(0, math.floor(ymin * h / in_h))
                x1 = min(w - 1, math.ceil(xmax * w / in_w))
                y1 = min(h - 1, math.ceil(ymax * h / in_h))
                if x1 < x0 or y1 < y0:
                    continue
                weight[i, :, y0 : y1 + 1, x0 : x1 + 1] += 1.0 / ((x1 - x0 + 1) * (y1 - y0 + 1))
        maps.append(weight.to(dtype))
    return maps
