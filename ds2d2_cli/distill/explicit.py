"""Explicit stream: feature imitation per frequency band (method.md, "Explicit stream").

For every FPN level, with `A` one bias-free 1x1 conv shared by all levels (`Adapter`,
applied by the caller):

    s' = A(s);  (Ls, Hs) = DWT(s');  (Lt, Ht) = DWT(t)
    loss_low  = sum_levels mean((Ls - Lt)^2 * W)
    loss_high = sum_levels mean((Hs - Ht)^2 * W[:, :, None])

`W` is the DISW map at each level's band resolution (`disw.disw_weights_levels`), or 1
everywhere with `disw=False` (then each stream is a plain FitNet-style MSE on its band).
Splitting the bands keeps the faint high-frequency detail of small objects from being
drowned by low-frequency energy.

The DWT is linear, so `DWT(s') - DWT(t) = DWT(s' - t)`: we transform the difference once
per level instead of student and teacher separately (half the transform work, same
value up to float rounding). The teacher is detached here: no gradient ever reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ds2d2_cli.distill.disw import disw_weights_levels
from ds2d2_cli.distill.spectral import _ptwt_split, band_shape, haar_bands
from ds2d2_cli.distill._utils import Features, paired_levels, working
from ds2d2_cli.errors import Ds2d2Error

__all__ = ["Adapter", "explicit_losses", "fitnet_loss"]

class Adapter(nn.Module):
    """`A` of method.md: one 1x1 conv without bias, shared by all FPN levels.

    Maps student channels to teacher channels so the student is compared in the
    teacher's feature basis; trained with the student. Apply it to every student FPN
    level before `explicit_losses` / `fitnet_loss` / the implicit losses.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)


def explicit_losses(
    student_feats: Features,
    teacher_feats: Features,
    boxes: Sequence[Tensor] | None,
    input_hw: Sequence[int] | None,
    wavelet: str = "haar",
    disw: bool = True,
) -> tuple[Tensor, Tensor]:
    """(loss_low, loss_high) of method.md, each summed over FPN levels.

    student_feats: ADAPTED student FPN levels `[N, C_t, h, w]` (apply `Adapter` first), a
        sequence or a dict (its `.values()` order); same order and sizes as the teacher's.
    teacher_feats: teacher FPN levels; detached here.
    boxes: one `[K_i, 4]` xyxy tensor per image, in padded-input pixels (DISW), or, for
        every image, `[K_i, 5]` rotated boxes (cx, cy, w, h, theta; le90).
    input_hw: (H_in, W_in), the padded batch input size (DISW).
    wavelet: any pywt discrete wavelet; Haar has an exact fast path.
    disw: False weighs every band cell 1 (boxes / input_hw are then unused, may be None).
    """
    student, teacher = paired_levels(student_feats, teacher_feats)
    bands = [band_shape(tuple(s.shape[-2:]), wavelet) for s in student]
    weights: list[Tensor] | None = None
    if disw:
        if boxes is None or input_hw is None:
            raise Ds2d2Error("DISW needs the ground-truth boxes and the padded input size (or disw=False)")
        if len(boxes) != student[0].shape[0]:
            raise Ds2d2Error(f"{len(boxes)} box tensors for a batch of {student[0].shape[0]} images")
        dtype = torch.float64 if student[0].dtype == torch.float64 else torch.float32
        weights = disw_weights_levels(boxes, input_hw, bands, device=student[0].device, dtype=dtype)

    loss_low: Tensor | None = None
    loss_high: Tensor | None = None
    for level, (s, t) in enumerate(zip(student, teacher)):
        diff = working(s) - working(t.detach())
        if wavelet == "haar":
            low, *details = haar_bands(diff)
            sq_high = details[0].square() + details[1].square() + details[2].square()
        else:
            low, stacked = _ptwt_split(diff, wavelet)  # stacked: [N, C, 3, h', w']
            sq_high = stacked.square().sum(dim=2)
        sq_low = low.square()
        if weights is not None:
            w = weights[level].to(low.dtype)
            sq_low, sq_high = sq_low * w, sq_high * w
        term_low = sq_low.mean()
        # mean over [N, C, 3, h', w'] with W broadcast over the band axis.
        term_high = sq_high.sum() / (3 * low.numel())
        loss_low = term_low if loss_low is None else loss_low + term_low
        loss_high = term_high if loss_high is None else loss_high + term_high
    assert loss_low is not None and loss_high is not None
    return loss_low, loss_high


def fitnet_loss(student_feats: Features, teacher_feats: Features) -> Tensor:
    """FitNet baseline: plain feature MSE, `sum_levels mean((s' - t)^2)`, no spectral split.

    student_feats: ADAPTED student FPN levels (`s' = A(s)`, apply `Adapter` first), a
        sequence or a dict (`.values()` order), same sizes as `teacher_feats`.
    The comparison point DS2D2's explicit stream improves on; teacher detached.
    """
    student, teacher = paired_levels(student_feats, teacher_feats)
    total: Tensor | None = None
    for s, t in zip(student, teacher):
        term = (working(s) - working(t.detach())).square().mean()
        total = term if total is None else total + term
    assert total is not None
    return total
