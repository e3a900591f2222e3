"""Explicit stream: feature imitation per frequency band (method.md, "Explicit stream").

For every FPN level, with `A` one bias-free 1x1 conv shared by all levels:

    s' = A(s);  (Ls, Hs) = DWT(s');  (Lt, Ht) = DWT(t)
    loss_low  = sum_levels mean((Ls - Lt)^2 * W)
    loss_high = sum_levels mean((Hs - Ht)^2 * W[:, :, None])

`W` is the DISW map at band resolution (`disw.disw_weights`), or 1 everywhere (then each
stream is a plain FitNet-style MSE on its band). Splitting the bands keeps the faint
high-frequency detail of small objects from being drowned by low-frequency energy.

The DWT is linear, so `DWT(s') - DWT(t) = DWT(s' - t)`: we transform the difference once
per level instead of student and teacher separately (half the transform work, same
value up to float rounding). The teacher is detached here: no gradient ever reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ds2d2_cli.distill.spectral import _ptwt_split, band_shape, haar_bands
from ds2d2_cli.errors import Ds2d2Error

__all__ = ["Adapter", "explicit_losses", "fitnet_loss"]

_STREAMS = ("low", "high")


class Adapter(nn.Module):
    """`A` of method.md: one 1x1 conv without bias, shared by all FPN levels.

    Maps student channels to teacher channels so the student is compared in the
    teacher's feature basis; trained with the student.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)


def _pairs(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    if len(student_feats) != len(teacher_feats):
        raise Ds2d2Error(f"student has {len(student_feats)} FPN levels, teacher {len(teacher_feats)}")
    if not student_feats:
        raise Ds2d2Error("feature distillation needs at least one FPN level")


def _check_level(level: int, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise Ds2d2Error(
            f"FPN level {level}: student features {tuple(student.shape)} do not match teacher "
            f"{tuple(teacher.shape)} (channels need an Adapter; sizes need the same input)"
        )


def _working(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def explicit_losses(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    weights: Sequence[Tensor] | None = None,
    wavelet: str = "haar",
    streams: Sequence[str] = _STREAMS,
    *,
    adapter: nn.Module | None = None,
) -> dict[str, Tensor]:
    """{"explicit_low", "explicit_high"} of method.md (only the requested streams).

    student_feats / teacher_feats: FPN levels `[N, C, h, w]`, same order and sizes.
    weights: per-level DISW maps `[N, 1, h', w']` at band resolution, or None for 1.
    adapter: the shared `A`, applied to each student level when given.
    """
    unknown = [s for s in streams if s not in _STREAMS]
    if unknown or not streams:
        raise Ds2d2Error(f"explicit streams must be a non-empty subset of {_STREAMS}, got {tuple(streams)}")
    _pairs(student_feats, teacher_feats)
    if weights is not None and len(weights) != len(student_feats):
        raise Ds2d2Error(f"{len(weights)} DISW maps for {len(student_feats)} FPN levels")

    want_low, want_high = "low" in streams, "high" in streams
    loss_low: Tensor | None = None
    loss_high: Tensor | None = None
    for level, (student, teacher) in enumerate(zip(student_feats, teacher_feats)):
        if adapter is not None:
            student = adapter(student)
        _check_level(level, student, teacher)
        diff = _working(student) - _working(teacher.detach())
        if wavelet == "haar":
            low, *details = haar_bands(diff)
        else:
            low, stacked = _ptwt_split(diff, wavelet)
            details = [stacked]  # [N, C, 3, h', w']
        n, _, hb, wb = low.shape
        w = None
        if weights is not None:
            w = weights[level]
            if tuple(w.shape) != (n, 1, hb, wb):
                expected = band_shape(tuple(student.shape[-2:]), wavelet)
                raise Ds2d2Error(
                    f"FPN level {level}: DISW map {tuple(w.shape)} must be [N, 1, h', w'] = "
                    f"{(n, 1, *expected)} (band resolution of {wavelet})"
                )
            w = w.to(device=low.device, dtype=low.dtype)
        if want_low:
            sq = low.square()
            term = (sq if w is None else sq * w).mean()
            loss_low = term if loss_low is None else loss_low + term
        if want_high:
            if wavelet == "haar":
                sq = details[0].square() + details[1].square() + details[2].square()
            else:
                sq = details[0].square().sum(dim=2)
            # mean over [N, C, 3, h', w'] with W broadcast over the band axis.
            term = (sq if w is None else sq * w).sum() / (3 * low.numel())
            loss_high = term if loss_high is None else loss_high + term

    out: dict[str, Tensor] = {}
    if loss_low is not None:
        out["explicit_low"] = loss_low
    if loss_high is not None:
        out["explicit_high"] = loss_high
    return out


def fitnet_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    *,
    adapter: nn.Module | None = None,
) -> Tensor:
    """FitNet baseline: plain feature MSE, `sum_levels mean((A(s) - t)^2)`, no spectral split.

    The comparison point DS2D2's explicit stream improves on; teacher detached.
    """
    _pairs(student_feats, teacher_feats)
    total: Tensor | None = None
    for level, (student, teacher) in enumerate(zip(student_feats, teacher_feats)):
        if adapter is not None:
            student = adapter(student)
        _check_level(level, student, teacher)
        term = (_working(student) - _working(teacher.detach())).square().mean()
        total = term if total is None else total + term
    assert total is not None
    return total
