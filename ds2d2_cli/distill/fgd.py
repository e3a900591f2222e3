"""FGD, focal and global distillation (Yang et al., CVPR 2022), a baseline of `ds2d2 study`.

Four parts per FPN level, as the FGD authors' `FeatureLoss` computes them (yzd-v/FGD):

* attention from the absolute features at temperature T: spatial
  `S = H*W * softmax_{hw}(mean_c |x| / T)` and channel `C = C * softmax_c(mean_hw |x| / T)`;
* masks from the ground truth: a box covers the cells `floor(x1 * W / w_img) ..
  ceil(x2 * W / w_img)` (rows likewise, `w_img`/`h_img` the image's own size before
  padding), each covered cell weighs `1 / box area in cells` (the larger value where
  boxes overlap); the background mask is 1 elsewhere, normalised to sum 1 per image;
* rotated boxes (oriented detectors, `[K, 5]` le90): the same rule on the cells the rotated
  box covers (`cells.py`: the box meets the open 2 x 2-cell square of the cell's top-left
  grid point, which for a rectangle is exactly the floor/ceil range above, computed here
  on the envelope in FGD's own arithmetic); each covered cell weighs `1 / its number of
  covered cells`, counted beyond the map too as FGD's product is. FGD's `1 / (H W)` is that
  count of cells, not the box's pixel area, so the rotated box's `w * h` does not enter;
  a box with theta = 0 gets bit for bit the masks of its envelope. Background as above;
* focal: `fg = sum(M_fg * S_t * C_t * (s - t)^2) / N` and `bg` likewise with `M_bg`,
  both weighted by the *teacher's* attention;
  attention: `sum|C_s - C_t| / N + sum|S_s - S_t| / N`;
* global: a GcBlock each for student and teacher (context pooling + a channel
  transform, trainable, part of the loss) adds context; `sum((s + g_s(s) - t - g_t(t))^2) / N`.

Each part is returned unweighted and summed over levels, so the log shows them apart.
The context blocks train with the student, are saved beside it, and are never exported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds2d2_cli.distill._utils import Features, paired_levels, working
from ds2d2_cli.distill.cells import axis_aligned, tilted_row_spans
from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.rotated import rbox_envelope

__all__ = ["FGDContext", "fgd_attention", "fgd_context_blocks", "fgd_losses", "fgd_masks"]

FGD_PARTS = ("fg", "bg", "attention", "global")


class _GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet): attention-pooled context, then a channel transform."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        # The FGD authors' init: Kaiming (fan_in, ReLU) for the pooling conv, zeros for the
        # last transform, so the block starts as the identity and global loss as plain MSE.
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add(context)


class FGDContext(nn.Module):
    """The student's and the teacher's context blocks of one FPN level."""

    def __init__(self, channels: int):
        super().__init__()
        self.student = _GcBlock(channels)
        self.teacher = _GcBlock(channels)


def fgd_context_blocks(channels: int, level_names: Sequence[str]) -> nn.ModuleDict:
    return nn.ModuleDict({name: FGDContext(channels) for name in level_names})


def fgd_attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(spatial `[N, h, w]`, channel `[N, C]`) attention; each has mean 1."""
    n, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temperature).reshape(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(n, h, w), channel


def fgd_masks(boxes: Sequence[Tensor], image_sizes: Sequence[Sequence[int]], feature_hw: Sequence[int],
              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(foreground, background) masks `[N, h, w]` of one level from boxes in input pixels:
    xyxy `[K, 4]`, or rotated `[K, 5]` (cx, cy, w, h, theta; le90) for every image."""
    fh, fw = int(feature_hw[0]), int(feature_hw[1])
    if len(boxes) != len(image_sizes):
        raise Ds2d2Error(f"{len(boxes)} box tensors for {len(image_sizes)} images")
    given = [b for b in boxes if b.numel()]
    widths = {int(b.shape[-1]) for b in given}
    if any(b.dim() != 2 for b in given) or len(widths) > 1 or not widths <= {4, 5}:
        raise Ds2d2Error("FGD takes one [K, 4] xyxy or, for every image, one [K, 5] rotated box tensor per image, "
                         f"got {[tuple(b.shape) for b in boxes]}")
    rotated = widths == {5}
    rows = torch.arange(fh, device=device)
    cols = torch.arange(fw, device=device)
    foreground = torch.zeros((len(boxes), fh, fw), device=device, dtype=dtype)
    for i, (b, (img_h, img_w)) in enumerate(zip(boxes, image_sizes)):
        if b.numel() == 0:
            continue
        rboxes = b.to(device=device, dtype=torch.float64) if rotated else None
        b = (rbox_envelope(rboxes) if rotated else b).to(device=device, dtype=torch.float32)
        x1 = torch.floor(b[:, 0] / img_w * fw).long()
        x2 = torch.ceil(b[:, 2] / img_w * fw).long()
        y1 = torch.floor(b[:, 1] / img_h * fh).long()
        y2 = torch.ceil(b[:, 3] / img_h * fh).long()
        if rotated:
            inside, cells = _rotated_cells(rboxes, (img_h / fh, img_w / fw), (x1, y1, x2, y2), rows, cols)
            area = 1.0 / cells.to(dtype)
        else:
            area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1)).to(dtype)
            inside = (((rows[None, :, None] >= y1[:, None, None]) & (rows[None, :, None] <= y2[:, None, None]))
                      & ((cols[None, None, :] >= x1[:, None, None]) & (cols[None, None, :] <= x2[:, None, None])))
        foreground[i] = torch.where(inside, area[:, None, None], torch.zeros((), dtype=dtype, device=device)
                                    ).amax(dim=0)
    background = (foreground <= 0).to(dtype)
    total = background.sum(dim=(1, 2), keepdim=True)
    background = torch.where(total > 0, background / total.clamp(min=1), background)
    return foreground, background


def _rotated_cells(rboxes: Tensor, cell_hw: tuple[float, float], ranges: tuple[Tensor, ...], rows: Tensor,
                   cols: Tensor) -> tuple[Tensor, Tensor]:
    """(inside `[K, h, w]`, covered-cell count `[K]`) of rotated boxes `[K, 5]` on one image's map.

    `ranges`: FGD's unclipped cell ranges (x1, y1, x2, y2) of the boxes' envelopes; `cell_hw`:
    one cell in the image's pixels as FGD scales (image size / map size). The count, like
    FGD's `(y2 + 1 - y1) * (x2 + 1 - x1)`, includes covered cells beyond the map; it walks
    each box's rows from y1, as many as the tallest box has (one host sync).
    """
    x1, y1, x2, y2 = (r.double() for r in ranges)
    cell_h, cell_w = cell_hw

    def runs(row_index: Tensor) -> tuple[Tensor, Tensor]:  # [K, R] first, last column of each row's run
        first, last = tilted_row_spans(rboxes, cell_w, cell_h, row_index)
        first, last = torch.maximum(first, x1[:, None]), torch.minimum(last, x2[:, None])
        outside = (row_index < y1[:, None]) | (row_index > y2[:, None])
        return torch.where(outside, math.inf, first), torch.where(outside, -math.inf, last)

    first, last = runs(rows.double()[None, :].expand(len(rboxes), -1))
    inside = (cols[None, None, :] >= first[:, :, None]) & (cols[None, None, :] <= last[:, :, None])
    tallest = int((y2 - y1).max().item()) + 1
    first, last = runs(y1[:, None] + torch.arange(tallest, dtype=torch.float64, device=y1.device))
    cells = (last - first + 1).clamp_min(0).sum(dim=1)
    aligned = axis_aligned(rboxes[:, 4])
    cells = torch.where(aligned, (y2 + 1 - y1) * (x2 + 1 - x1), cells)  # the rectangle's product, exactly
    return inside, cells.clamp_min(1)


def fgd_losses(student_levels: Features, teacher_levels: Features, boxes: Sequence[Tensor],
               image_sizes: Sequence[Sequence[int]], context_blocks: nn.ModuleDict | Sequence[FGDContext],
               temperature: float = 0.5) -> dict[str, Tensor]:
    """Unweighted FGD parts {"fg", "bg", "attention", "global"}, each summed over levels.

    student_levels: student FPN levels with the teacher's channels (adapter when widths
        differ); teacher_levels: the teacher's, detached here.
    boxes: one `[K_i, 4]` xyxy tensor per image in input pixels (or, for every image,
        `[K_i, 5]` rotated boxes: cx, cy, w, h, theta; le90); image_sizes: each image's
        (h, w) before batch padding (the authors scale boxes by it).
    context_blocks: one `FGDContext` per level (`fgd_context_blocks`).
    """
    if temperature <= 0:
        raise ValueError(f"FGD temperature must be positive, got {temperature}")
    student, teacher = paired_levels(student_levels, teacher_levels)
    blocks = list(context_blocks.values()) if isinstance(context_blocks, nn.ModuleDict) else list(context_blocks)
    if len(blocks) != len(student):
        raise Ds2d2Error(f"FGD has {len(blocks)} context blocks for {len(student)} FPN levels")
    parts: dict[str, Tensor] = {}
    for s, t, block in zip(student, teacher, blocks):
        s, t = working(s), working(t.detach())
        n = s.shape[0]
        spatial_s, channel_s = fgd_attention(s, temperature)
        spatial_t, channel_t = fgd_attention(t, temperature)
        foreground, background = fgd_masks(boxes, image_sizes, s.shape[-2:], device=s.device, dtype=s.dtype)
        attention = spatial_t[:, None] * channel_t[:, :, None, None]  # [N, C, h, w]
        sq = (s - t).square() * attention
        level = {
            "fg": (sq * foreground[:, None]).sum() / n,
            "bg": (sq * background[:, None]).sum() / n,
            "attention": ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n,
            "global": (block.student(s) - block.teacher(t)).square().sum() / n,
        }
        for name, value in level.items():
            parts[name] = value if name not in parts else parts[name] + value
    return parts
