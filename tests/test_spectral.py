"""Spectral split (method.md "Spectral split"): hand-computed Haar values, ptwt parity,
perfect reconstruction, odd sizes, gradients and precision under autocast."""

from __future__ import annotations

import ptwt
import pytest
import torch
from ptwt.constants import WaveletDetailTuple2d

from ds2d2_cli.distill.spectral import _ptwt_split, band_shape, haar_bands, high_frequency, spectral_split
from ds2d2_cli.errors import InputError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_constant_2x2_has_no_detail() -> None:
    low, high = spectral_split(torch.full((1, 1, 2, 2), 3.0))
    # LL = (a+b+c+d)/2 with orthonormal Haar scaling.
    assert torch.equal(low, torch.full((1, 1, 1, 1), 6.0))
    assert high.shape == (1, 1, 3, 1, 1)
    assert torch.equal(high, torch.zeros_like(high))
    assert torch.equal(high_frequency(torch.full((1, 1, 2, 2), 3.0)), torch.zeros(1, 1, 2, 2))


def test_checkerboard_goes_to_diagonal_band() -> None:
    x = _t([[5, 3], [3, 5]])  # mean 4 plus a +-1 checkerboard
    low, high = spectral_split(x)
    assert torch.equal(low, torch.full((1, 1, 1, 1), 8.0))  # 2 x mean
    assert high[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 2.0]  # (horizontal, vertical, diagonal)
    assert torch.equal(high_frequency(x), torch.full((1, 1, 2, 2), 2.0))


def test_4x4_ramp_by_hand() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    low, high = spectral_split(x)
    # block [[0,1],[4,5]]: LL=(0+1+4+5)/2=5, H=(0+1-4-5)/2=-4, V=(0-1+4-5)/2=-1, D=0
    assert low[0, 0].tolist() == [[5.0, 9.0], [21.0, 25.0]]
    assert torch.equal(high[0, 0, 0], torch.full((2, 2), -4.0))
    assert torch.equal(high[0, 0, 1], torch.full((2, 2), -1.0))
    assert torch.equal(high[0, 0, 2], torch.zeros(2, 2))
    assert torch.equal(high_frequency(x), torch.full((1, 1, 4, 4), -5.0))


def test_odd_size_zero_pads_bottom_right() -> None:
    low, high = spectral_split(torch.ones(1, 1, 3, 3))
    assert low[0, 0].tolist() == [[2.0, 1.0], [1.0, 0.5]]
    assert high[0, 0, 0].tolist() == [[0.0, 0.0], [1.0, 0.5]]  # horizontal
    assert high[0, 0, 1].tolist() == [[0.0, 1.0], [0.0, 0.5]]  # vertical
    assert high[0, 0, 2].tolist() == [[0.0, 0.0], [0.0, 0.5]]  # diagonal
    assert high_frequency(torch.ones(2, 3, 5, 7)).shape == (2, 3, 5, 7)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 5), (3, 1, 1, 1), (2, 2, 1, 6), (1, 2, 13, 16)])
def test_torch_haar_equals_ptwt(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = spectral_split(x, "haar")
    ref_low, ref_details = ptwt.wavedec2(x, "haar", level=1, mode="zero")
    assert low.dtype == torch.float64
    torch.testing.assert_close(low, ref_low, rtol=0, atol=1e-12)
    torch.testing.assert_close(high, torch.stack(tuple(ref_details), dim=2), rtol=0, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(spectral_split(x32)[1], _ptwt_split(x32, "haar")[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(high_frequency(x32), high_frequency(x32, "haar"))


@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4", "bior2.2"])
def test_perfect_reconstruction_even_sizes(wavelet: str) -> None:
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    low, high = spectral_split(x, wavelet)
    rec = ptwt.waverec2((low, WaveletDetailTuple2d(*high.unbind(dim=2))), wavelet)
    torch.testing.assert_close(rec[..., :16, :12], x, rtol=0, atol=1e-10)


def test_haar_is_orthonormal() -> None:
    x = torch.randn(2, 4, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    low, high = spectral_split(x)
    torch.testing.assert_close(low.square().sum() + high.square().sum(), x.square().sum())


@pytest.mark.parametrize("wavelet", ["haar", "db2", "coif1"])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 1)])
def test_band_shape_matches_output(wavelet: str, size: tuple[int, int]) -> None:
    low, high = spectral_split(torch.zeros(1, 2, *size), wavelet)
    assert tuple(low.shape[-2:]) == band_shape(size, wavelet)
    assert tuple(high.shape) == (1, 2, 3, *band_shape(size, wavelet))
    assert high_frequency(torch.zeros(1, 2, *size), wavelet).shape == (1, 2, *size)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_gradcheck(wavelet: str) -> None:
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: spectral_split(t, wavelet), (x,))
    assert torch.autograd.gradcheck(lambda t: high_frequency(t, wavelet), (x,))


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_autocast_runs_in_float32(wavelet: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, high = spectral_split(x.bfloat16(), wavelet)
        hf = high_frequency(x.bfloat16(), wavelet)
    assert low.dtype == high.dtype == hf.dtype == torch.float32
    ref_low, _ = spectral_split(x.bfloat16().float(), wavelet)
    torch.testing.assert_close(low, ref_low)


def test_bad_input() -> None:
    with pytest.raises(InputError, match="unknown discrete wavelet"):
        spectral_split(torch.zeros(1, 1, 4, 4), "not-a-wavelet")
    with pytest.raises(ValueError, match="N, C, H, W"):
        haar_bands(torch.zeros(4, 4))


@CUDA
@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_cuda_matches_cpu(wavelet: str) -> None:
    x = torch.randn(2, 8, 15, 16)
    low, high = spectral_split(x.cuda(), wavelet)
    ref_low, ref_high = spectral_split(x, wavelet)
    torch.testing.assert_close(low.cpu(), ref_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(high.cpu(), ref_high, rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        assert high_frequency(x.cuda().half(), wavelet).dtype == torch.float32


def _strided_haar(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Haar path as it was before the corners were unshuffled: strided views of the 2x2 blocks."""
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2))
    x = x.reshape(n, c, (h + 1) // 2, 2, (w + 1) // 2, 2)
    top, bottom = x[:, :, :, 0], x[:, :, :, 1]
    rows_sum, rows_diff = (top + bottom) * 0.5, (top - bottom) * 0.5
    return (rows_sum[..., 0] + rows_sum[..., 1], rows_diff[..., 0] + rows_diff[..., 1],
            rows_sum[..., 0] - rows_sum[..., 1], rows_diff[..., 0] - rows_diff[..., 1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape,dtype", [((2, 5, 8, 6), torch.float32), ((1, 3, 7, 9), torch.float32),
                                         ((2, 4, 13, 13), torch.float64)])
def test_haar_bands_bit_identical_to_the_strided_form(shape, dtype, layout) -> None:
    """Values and gradients equal, bit for bit, to the strided form (the demo's figures depend on it)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] + 2, shape[2], shape[3] + 1, dtype=dtype)[:, 1:-1, :, 1:]
    x.requires_grad_(True)
    ours, reference = haar_bands(x), _strided_haar(x)
    weights = [torch.randn_like(r) for r in reference]
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    (grad_ours,) = torch.autograd.grad(ours, x, weights)
    (grad_reference,) = torch.autograd.grad(reference, x, weights)
    assert torch.equal(grad_ours, grad_reference)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("used", [(0,), (3,), (0, 2), (1, 2, 3), (0, 1, 2, 3)])
def test_haar_backward_bit_identical_to_autograd_for_any_bands_used(used, layout) -> None:
    """The hand-written backward against autograd through the strided form, when only some
    bands reach the loss (the amplifier's HF reads no low band; gradcheck drops outputs)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    reference = _strided_haar(x)
    weights = [torch.randn_like(r) for r in reference]

    def grad(bands) -> torch.Tensor:
        return torch.autograd.grad(sum((bands[i] * weights[i]).sum() for i in used), x)[0]

    expected = grad(reference)
    assert torch.equal(grad(haar_bands(x)), expected)
    low, high = spectral_split(x)  # the stacked form, written in place
    assert torch.equal(low, reference[0]) and torch.equal(high, torch.stack(reference[1:], dim=2))
    assert torch.equal(grad((low, *high.unbind(2))), expected)
