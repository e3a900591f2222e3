"""MGD, masked generative distillation (Yang et al., ECCV 2022), a baseline of `ds2d2 study`.

Instead of imitating the teacher's features, the student must be able to *generate*
them: a random share `lambda` of its feature locations is zeroed, and a small generation
block (3x3 conv, ReLU, 3x3 conv; one per FPN level) reconstructs the teacher's full map:

    M ~ Bernoulli(1 - lambda) per location, shared by the channels
    loss = sum_levels  sum((G_l(s * M) - t)^2) / N

as MMRazor's `MGDConnector` + `MGDLoss` compute it. The generation blocks are trained
with the student and saved beside it; they are never part of the exported detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ds2d2_cli.distill._utils import Features, paired_levels, working
from ds2d2_cli.errors import Ds2d2Error

__all__ = ["MGDGenerator", "mgd_generators", "mgd_loss"]


class MGDGenerator(nn.Module):
    """The generation block of one FPN level (teacher channels in and out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.generation = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, masked: Tensor) -> Tensor:
        return self.generation(masked)


def mgd_generators(channels: int, level_names: Sequence[str]) -> nn.ModuleDict:
    """One generation block per FPN level, keyed by level name."""
    return nn.ModuleDict({name: MGDGenerator(channels) for name in level_names})


def random_mask(feature: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """`[N, 1, h, w]` of 0 (masked, probability `mask_ratio`) and 1, as MMRazor draws it."""
    n, _, h, w = feature.shape
    draw = torch.rand((n, 1, h, w), generator=generator, device=feature.device if generator is None
                      else generator.device)
    return (draw <= 1 - mask_ratio).to(device=feature.device, dtype=feature.dtype)


def mgd_loss(student_levels: Features, teacher_levels: Features, generators: nn.ModuleDict | Sequence[nn.Module],
             mask_ratio: float = 0.65, generator: torch.Generator | None = None,
             masks: Sequence[Tensor] | None = None) -> Tensor:
    """Unweighted MGD summed over levels; teacher detached.

    student_levels: student FPN levels with the teacher's channels (through the adapter
        when the widths differ), a sequence or a dict (`.values()` order).
    generators: one block per level (`mgd_generators`), in the same order.
    masks: optional `[N, 1, h, w]` 0/1 masks per level (tests); drawn with `generator` otherwise.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"MGD mask ratio must be in [0, 1), got {mask_ratio}")
    student, teacher = paired_levels(student_levels, teacher_levels)
    blocks = list(generators.values()) if isinstance(generators, nn.ModuleDict) else list(generators)
    if len(blocks) != len(student):
        raise Ds2d2Error(f"MGD has {len(blocks)} generation blocks for {len(student)} FPN levels")
    total: Tensor | None = None
    for level, (s, t, block) in enumerate(zip(student, teacher, blocks)):
        s = working(s)
        mask = masks[level] if masks is not None else random_mask(s, mask_ratio, generator)
        generated = block(s * mask)
        term = (generated - working(t.detach())).square().sum() / s.shape[0]
        total = term if total is None else total + term
    assert total is not None
    return total
