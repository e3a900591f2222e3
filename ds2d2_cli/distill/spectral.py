"""Spectral split of FPN features: one level of the 2-D DWT (method.md, "Spectral split").

DS2D2 imitates the teacher separately in the low band and in the detail bands, because
small objects in remote-sensing scenes live mostly in the high frequencies, which a
plain feature MSE lets the (much larger) low-frequency energy drown out.

Conventions (method.md): one level, zero padding, band order and scaling of
`ptwt.wavedec2(f, wavelet, level=1, mode="zero")`:

- low  `L: [N, C, h', w']`
- high `H: [N, C, 3, h', w']`, bands (horizontal, vertical, diagonal)

with `h' = pywt.dwt_coeff_len(h, filter_len, "zero")` (`ceil(h/2)` for Haar). The bands
are returned at band resolution, not reconstructed to `h x w`: the explicit losses and
the DISW map (`disw.py`) are defined at that resolution.

Haar, the paper's default, has an exact pure-torch path (2x2 block sums, no convolution)
that equals ptwt to float rounding and is several times faster forward+backward; every
other pywt wavelet goes through ptwt.

All transforms run in float32 (float64 stays float64), also under autocast: half
precision squared feature differences overflow or underflow easily at the 1e-5 loss
weights the authors use.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ds2d2_cli.errors import InputError

__all__ = ["band_shape", "haar_bands", "high_frequency", "spectral_split"]


@lru_cache(maxsize=64)
def _filter_len(wavelet: str) -> int:
    import pywt

    try:
        return pywt.Wavelet(wavelet).dec_len
    except ValueError:
        raise InputError(f"unknown discrete wavelet {wavelet!r} (see pywt.wavelist(kind='discrete'))") from None


def band_shape(size: tuple[int, int], wavelet: str = "haar") -> tuple[int, int]:
    """(h', w') of the DWT bands of an `h x w` map: where DISW weights must be built."""
    if wavelet == "haar":
        return (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    import pywt

    length = _filter_len(wavelet)
    return (pywt.dwt_coeff_len(size[0], length, "zero"), pywt.dwt_coeff_len(size[1], length, "zero"))


def _working_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_4d(features: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"expected features of shape [N, C, H, W], got {tuple(features.shape)}")


class _HaarDWT(torch.autograd.Function):
    """One Haar level with a hand-written backward: autograd's version of the same sums
    allocates a gradient per intermediate (eight half-sums and differences, their negations,
    a stack of the four corners) and was what kept this path near ptwt's speed. Forward and
    backward do exactly autograd's arithmetic in autograd's order, so every bit is the same
    (tested against the plain-autograd form)."""

    @staticmethod
    def forward(ctx, x: Tensor, stacked: bool):  # type: ignore[override]
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        ctx.channels_last = _channels_last(x)
        if ctx.channels_last:
            # Channels innermost: the corners' strided views already stream through memory.
            top_left, top_right, bottom_left, bottom_right = (x[:, :, i::2, j::2] for i, j in _CORNERS)
        else:
            # One copy puts the four corners of every 2x2 block in contiguous planes, so each
            # sum streams through memory instead of striding by 2.
            top_left, top_right, bottom_left, bottom_right = F.pixel_unshuffle(x, 2).view(n, c, 4, h2, w2).unbind(2)
        sum_left = torch.add(top_left, bottom_left).mul_(0.5)
        sum_right = torch.add(top_right, bottom_right).mul_(0.5)
        diff_left = torch.sub(top_left, bottom_left).mul_(0.5)
        diff_right = torch.sub(top_right, bottom_right).mul_(0.5)
        low = sum_left + sum_right
        ctx.size, ctx.stacked = (n, c, h, w), stacked
        ctx.set_materialize_grads(False)
        if stacked:  # written in place: no stack copy
            details = (low.new_empty((n, 3, h2, w2, c)).permute(0, 4, 1, 2, 3) if ctx.channels_last
                       else low.new_empty((n, c, 3, h2, w2)))
            torch.add(diff_left, diff_right, out=details[:, :, 0])
            torch.sub(sum_left, sum_right, out=details[:, :, 1])
            torch.sub(diff_left, diff_right, out=details[:, :, 2])
            return low, details
        return low, diff_left + diff_right, sum_left.sub_(sum_right), diff_left.sub_(diff_right)

    @staticmethod
    def backward(ctx, grad_low: Tensor | None, *grad_details: Tensor | None):  # type: ignore[override]
        n, c, h, w = ctx.size
        if ctx.stacked:
            grad_h, grad_v, grad_d = (grad_details[0].unbind(2) if grad_details[0] is not None else (None,) * 3)
        else:
            grad_h, grad_v, grad_d = grad_details
        # the half-sums' gradients (low and vertical read the sums, horizontal and diagonal the
        # differences), times the forward's 0.5; then each corner's, written into its plane
        sum_left = _half(_plus(grad_low, grad_v))
        sum_right = _half(_minus(grad_low, grad_v))
        diff_left = _half(_plus(grad_h, grad_d))
        diff_right = _half(_minus(grad_h, grad_d))
        present = [g for g in (grad_low, grad_h, grad_v, grad_d) if g is not None]
        if not present:
            return None, None
        reference = present[0]
        h2, w2 = reference.shape[-2:]
        sources = ((sum_left, diff_left, 1), (sum_right, diff_right, 1),
                   (sum_left, diff_left, -1), (sum_right, diff_right, -1))  # the corners' order
        if ctx.channels_last:
            grad = torch.empty((n, c, 2 * h2, 2 * w2), dtype=reference.dtype, device=reference.device,
                               memory_format=torch.channels_last)
            for (i, j), (a, b, sign) in zip(_CORNERS, sources):
                _write(grad[:, :, i::2, j::2], a, b, sign)
        else:
            corners = reference.new_empty((n, c, 4, h2, w2))
            for plane, (a, b, sign) in enumerate(sources):
                _write(corners[:, :, plane], a, b, sign)
            grad = F.pixel_shuffle(corners.view(n, 4 * c, h2, w2), 2)
        return grad[..., :h, :w], None


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # top-left, top-right, bottom-left, bottom-right


def _channels_last(x: Tensor) -> bool:
    return x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _minus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return -b if a is None and b is not None else a if b is None else a - b


def _half(a: Tensor | None) -> Tensor | None:
    return None if a is None else a * 0.5


def _write(out: Tensor, a: Tensor | None, b: Tensor | None, sign: int) -> None:
    """out = a + sign * b, with a missing gradient read as zero (as autograd skips it)."""
    if a is not None and b is not None:
        (torch.add if sign > 0 else torch.sub)(a, b, out=out)
    elif a is not None:
        out.copy_(a)
    elif b is not None:
        torch.neg(b, out=out) if sign < 0 else out.copy_(b)
    else:
        out.zero_()


def haar_bands(features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact single-level Haar DWT (zero padding) as four separate bands (LL, H, V, D).

    Same values as `ptwt.wavedec2(x, "haar", level=1, mode="zero")`: for a 2x2 block
    [[a, b], [c, d]], LL = (a+b+c+d)/2, H = (a+b-c-d)/2, V = (a-b+c-d)/2,
    D = (a-b-c+d)/2. Odd sizes get one zero row/column at the bottom/right, as ptwt does.
    Kept separate (not stacked) so the losses can avoid a copy.
    """
    _check_4d(features)
    return _HaarDWT.apply(features.to(_working_dtype(features)), False)


def _ptwt_split(features: Tensor, wavelet: str) -> tuple[Tensor, Tensor]:
    import ptwt

    _filter_len(wavelet)  # friendly error for unknown names
    x = features.to(_working_dtype(features))
    # ptwt convolves; under autocast conv2d would run in half precision.
    with torch.autocast(device_type=x.device.type, enabled=False):
        low, details = ptwt.wavedec2(x, wavelet, level=1, mode="zero")
    return low, torch.stack(tuple(details), dim=2)


def spectral_split(features: Tensor, wavelet: str = "haar") -> tuple[Tensor, Tensor]:
    """(L [N,C,h',w'], H [N,C,3,h',w']): method.md's one-level DWT of a feature map.

    Differentiable; Haar uses the exact torch path, other wavelets ptwt.
    """
    _check_4d(features)
    if wavelet == "haar":
        return _HaarDWT.apply(features.to(_working_dtype(features)), True)
    return _ptwt_split(features, wavelet)


def high_frequency(features: Tensor, wavelet: str = "haar") -> Tensor:
    """HF(f) of method.md: sum of the three detail bands, bilinearly resized to h x w.

    This is what the high-frequency amplifier head sees (teacher and student alike).
    """
    _check_4d(features)
    if wavelet == "haar":
        _, horizontal, vertical, diagonal = haar_bands(features)
        summed = horizontal + vertical + diagonal
    else:
        summed = _ptwt_split(features, wavelet)[1].sum(dim=2)
    return F.interpolate(summed, size=features.shape[-2:], mode="bilinear", align_corners=False)
