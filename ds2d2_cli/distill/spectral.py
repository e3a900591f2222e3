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


def haar_bands(features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact single-level Haar DWT (zero padding) as four separate bands (LL, H, V, D).

    Same values as `ptwt.wavedec2(x, "haar", level=1, mode="zero")`: for a 2x2 block
    [[a, b], [c, d]], LL = (a+b+c+d)/2, H = (a+b-c-d)/2, V = (a-b+c-d)/2,
    D = (a-b-c+d)/2. Odd sizes get one zero row/column at the bottom/right, as ptwt does.
    Kept separate (not stacked) so the losses can avoid a copy.
    """
    _check_4d(features)
    x = features.to(_working_dtype(features))
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    # One copy puts the four corners of every 2x2 block in contiguous planes (top-left,
    # top-right, bottom-left, bottom-right), so each sum below streams through memory
    # instead of striding by 2; the arithmetic, and so every bit, is that of the strided form.
    corners = F.pixel_unshuffle(x, 2).view(n, c, 4, h2, w2)
    top_left, top_right, bottom_left, bottom_right = corners.unbind(2)
    sum_left, sum_right = (top_left + bottom_left) * 0.5, (top_right + bottom_right) * 0.5
    diff_left, diff_right = (top_left - bottom_left) * 0.5, (top_right - bottom_right) * 0.5
    low = sum_left + sum_right
    horizontal = diff_left + diff_right
    vertical = sum_left - sum_right
    diagonal = diff_left - diff_right
    return low, horizontal, vertical, diagonal


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
        low, *details = haar_bands(features)
        return low, torch.stack(details, dim=2)
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
