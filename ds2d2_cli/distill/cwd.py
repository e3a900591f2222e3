"""CWD, channel-wise distillation (Shu et al., ICCV 2021), a baseline of `ds2d2 study`.

Each channel's activation map becomes a distribution over its H*W locations (softmax at
temperature tau); the student's map is pulled to the teacher's by KL divergence:

    loss = sum_levels  tau^2 / (N * C) * sum_{n, c} KL(softmax(t_nc / tau) || softmax(s_nc / tau))

as MMRazor's `ChannelWiseDivergence` computes it. The channel, not the location, is the
unit of imitation: what the teacher attends to in each channel, whatever the scale.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ds2d2_cli.distill._utils import Features, paired_levels, working

__all__ = ["cwd_loss"]


def cwd_loss(student_levels: Features, teacher_levels: Features, tau: float = 1.0) -> Tensor:
    """Unweighted CWD summed over levels; `[N, C, h, w]` per level, same shapes; teacher detached."""
    if tau <= 0:
        raise ValueError(f"CWD temperature must be positive, got {tau}")
    student, teacher = paired_levels(student_levels, teacher_levels)
    total: Tensor | None = None
    for s, t in zip(student, teacher):
        n, c, h, w = s.shape
        s_logits = working(s).reshape(n * c, h * w) / tau
        t_logits = working(t.detach()).reshape(n * c, h * w) / tau
        t_log_prob = F.log_softmax(t_logits, dim=1)
        kl = (t_log_prob.exp() * (t_log_prob - F.log_softmax(s_logits, dim=1))).sum()
        term = kl * (tau ** 2) / (n * c)
        total = term if total is None else total + term
    assert total is not None
    return total
