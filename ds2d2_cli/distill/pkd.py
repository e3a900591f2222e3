"""PKD, Pearson-correlation feature distillation (Cao et al., NeurIPS 2022), a study baseline.

Both feature maps are standardised per channel (zero mean, unit standard deviation over
the batch and all locations), then compared by MSE: minimising it maximises the Pearson
correlation between student and teacher, so the student copies the teacher's relative
patterns and not its magnitudes (which differ between detectors, FPN to FPN):

    norm(x)_c = (x_c - mean(x_c)) / (std(x_c) + 1e-6)     std with Bessel's correction
    loss = sum_levels mean((norm(s) - norm(t))^2) / 2

as MMRazor's `PKDLoss` computes it (a student level of another size is resized to the
teacher's, bilinearly, first).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ds2d2_cli.distill._utils import Features, paired_levels, working

__all__ = ["pkd_loss"]

_EPS = 1e-6


def _standardise(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    per_channel = x.transpose(0, 1).reshape(c, -1)
    mean = per_channel.mean(dim=1, keepdim=True)
    std = per_channel.std(dim=1, keepdim=True)
    return ((per_channel - mean) / (std + _EPS)).reshape(c, n, h, w).transpose(0, 1)


def pkd_loss(student_levels: Features, teacher_levels: Features) -> Tensor:
    """Unweighted PKD summed over levels; `[N, C, h, w]` per level (same N and C); teacher detached."""
    student, teacher = paired_levels(student_levels, teacher_levels, same_shape=False)
    total: Tensor | None = None
    for level, (s, t) in enumerate(zip(student, teacher)):
        s, t = working(s), working(t.detach())
        if s.shape[:2] != t.shape[:2]:
            paired_levels([s], [t])  # the shared, clear error (channels need an Adapter)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        term = F.mse_loss(_standardise(s), _standardise(t)) / 2
        total = term if total is None else total + term
    assert total is not None
    return total
