"""Explicit stream losses (method.md, "Explicit stream"): exact values on tiny cases,
agreement with a direct transcription of the formula, gradients, and the FitNet baseline."""

from __future__ import annotations

import ptwt
import pytest
import torch

from ds2d2_cli.distill.disw import disw_weights, disw_weights_levels
from ds2d2_cli.distill.explicit import Adapter, explicit_losses, fitnet_loss
from ds2d2_cli.distill.spectral import band_shape, spectral_split
from ds2d2_cli.errors import Ds2d2Error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NO_BOXES = [torch.zeros(0, 4)]


def _reference(student, teacher, weights, wavelet):
    """method.md transcribed literally: transform student and teacher separately."""
    low = high = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        ls, hs = ptwt.wavedec2(s, wavelet, level=1, mode="zero")
        lt, ht = ptwt.wavedec2(t, wavelet, level=1, mode="zero")
        hs, ht = torch.stack(tuple(hs), 2), torch.stack(tuple(ht), 2)
        w = torch.ones_like(ls[:, :1]) if weights is None else weights[level]
        low = low + torch.mean((ls - lt) ** 2 * w)
        high = high + torch.mean((hs - ht) ** 2 * w[:, :, None])
    return low, high


def test_constant_difference_by_hand() -> None:
    # constant difference d: Haar low band of the difference is 2d, detail bands 0
    # -> loss_low = (2d)^2 = 4 d^2 per level, loss_high = 0.
    d = 1.5
    student = [torch.full((2, 3, 4, 6), d), torch.full((2, 3, 2, 2), d)]
    teacher = [torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 2, 2)]
    low, high = explicit_losses(student, teacher, None, None, disw=False)
    assert low.item() == 2 * 4 * d * d and high.item() == 0.0
    low, high = explicit_losses(student[:1], teacher[:1], None, None, disw=False)
    assert low.item() == 4 * d * d and high.item() == 0.0


def test_exact_2x2() -> None:
    student = torch.tensor([[5.0, 3.0], [3.0, 5.0]])[None, None]
    teacher = torch.zeros(1, 1, 2, 2)
    # bands of the difference: LL = 8, (H, V, D) = (0, 0, 2)
    low, high = explicit_losses([student], [teacher], NO_BOXES, (2, 2), disw=False)
    assert low.item() == 64.0
    assert high.item() == pytest.approx(4 / 3)
    # one box over the whole 2x2 input -> the single band cell gets 1 + 1/1 = 2
    box = [torch.tensor([[0.0, 0.0, 2.0, 2.0]])]
    low, high = explicit_losses([student, student], [teacher, teacher], box, (2, 2))
    assert low.item() == 2 * 128.0
    assert high.item() == pytest.approx(2 * 8 / 3)


def test_exact_4x4_with_disw_by_hand() -> None:
    student = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    teacher = torch.zeros(1, 1, 4, 4)
    # input 8x8, band 2x2 (scale 1/4): box [4, 4, 8, 8] -> cells floor(1)=1..min(ceil(2), 1)=1
    # -> only W[1, 1] = 1 + 1 = 2
    boxes = [torch.tensor([[4.0, 4.0, 8.0, 8.0]])]
    low, high = explicit_losses([student], [teacher], boxes, (8, 8))
    # LL = [[5, 9], [21, 25]] -> (25 + 81 + 441 + 625*2) / 4
    assert low.item() == pytest.approx(1797 / 4)
    # H = -4, V = -1, D = 0 everywhere -> (16 + 1 + 0) * (2+1+1+1) / (3 * 4)
    assert high.item() == pytest.approx(85 / 12)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_matches_formula_with_disw(wavelet: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    student = [torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
    teacher = [torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
    boxes = [torch.tensor([[10.0, 20.0, 40.0, 30.0], [100, 100, 250, 200]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    weights = disw_weights_levels(boxes, (256, 256), [band_shape(s, wavelet) for s in sizes], dtype=torch.float64)
    low, high = explicit_losses(student, teacher, boxes, (256, 256), wavelet)
    ref_low, ref_high = _reference(student, teacher, weights, wavelet)
    torch.testing.assert_close(low, ref_low)
    torch.testing.assert_close(high, ref_high)
    low, high = explicit_losses(student, teacher, boxes, (256, 256), wavelet, disw=False)
    ref_low, ref_high = _reference(student, teacher, None, wavelet)
    torch.testing.assert_close(low, ref_low)
    torch.testing.assert_close(high, ref_high)


def test_matches_spectral_split_and_disw_weights_float32() -> None:
    """disw=True equals the formula built from the public spectral_split + disw_weights."""
    gen = torch.Generator().manual_seed(1)
    sizes = [(20, 28), (10, 14), (5, 7)]  # odd band sizes at the last level
    student = {str(i): torch.randn(2, 4, h, w, generator=gen) for i, (h, w) in enumerate(sizes)}
    teacher = {str(i): torch.randn(2, 4, h, w, generator=gen) for i, (h, w) in enumerate(sizes)}
    boxes = [torch.tensor([[3.0, 5.0, 17.0, 40.0], [60.0, 30.0, 100.0, 70.0]]), torch.zeros(0, 4)]
    low, high = explicit_losses(student, teacher, boxes, (80, 112))
    ref_low = ref_high = 0.0
    for s, t in zip(student.values(), teacher.values()):
        (ls, hs), (lt, ht) = spectral_split(s), spectral_split(t)
        w = disw_weights(boxes, (80, 112), tuple(ls.shape[-2:]))
        assert w.min() == 1.0 and w.max() > 1.0
        ref_low = ref_low + ((ls - lt) ** 2 * w).mean()
        ref_high = ref_high + ((hs - ht) ** 2 * w[:, :, None]).mean()
    torch.testing.assert_close(low, ref_low)
    torch.testing.assert_close(high, ref_high)
    # DISW changes the value (the maps are not all ones here)
    plain_low, _ = explicit_losses(student, teacher, boxes, (80, 112), disw=False)
    assert plain_low.item() < low.item()


def test_zero_when_student_equals_teacher() -> None:
    feats = [torch.randn(2, 4, 9, 7), torch.randn(2, 4, 5, 4)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]])] * 2
    low, high = explicit_losses(feats, [f.clone() for f in feats], boxes, (72, 56))
    assert low.item() == 0.0 and high.item() == 0.0
    assert fitnet_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_gradients_reach_student_and_adapter_not_teacher() -> None:
    adapter = Adapter(3, 5)
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8, 8, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 2
    low, high = explicit_losses([adapter(student)], [teacher], boxes, (64, 64))
    (low + high).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert adapter.conv.weight.grad is not None and adapter.conv.weight.grad.abs().sum() > 0
    assert teacher.grad is None
    fit_student = torch.randn(1, 5, 4, 4, requires_grad=True)
    fitnet_loss([fit_student], [teacher[:1, :, :4, :4]]).backward()
    assert fit_student.grad is not None and teacher.grad is None


def test_adapter_is_bias_free_1x1_shared() -> None:
    adapter = Adapter(3, 5)
    assert adapter.conv.bias is None and adapter.conv.kernel_size == (1, 1)
    with torch.no_grad():
        adapter.conv.weight.zero_()
    teacher = [torch.ones(1, 5, 4, 4), torch.ones(1, 5, 2, 2)]
    student = [adapter(s) for s in (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2))]
    # A(s) = 0 on both levels: low band of ones is 2 -> (0 - 2)^2 = 4 per level
    low, high = explicit_losses(student, teacher, None, None, disw=False)
    assert low.item() == 8.0 and high.item() == 0.0
    assert fitnet_loss(student, teacher).item() == 2.0


def test_fitnet_exact() -> None:
    student = [torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 2, 2), 3.0)]
    teacher = [torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 2, 2)]
    assert fitnet_loss(student, teacher).item() == 4.0 + 4.0
    as_dict = fitnet_loss(dict(zip("ab", student)), dict(zip("ab", teacher)))
    assert as_dict.item() == 8.0


def test_errors() -> None:
    s, t = [torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 4, 4)]
    with pytest.raises(Ds2d2Error, match="levels"):
        explicit_losses(s, t + t, NO_BOXES, (8, 8))
    with pytest.raises(Ds2d2Error, match="Adapter"):
        explicit_losses([torch.randn(1, 3, 4, 4)], t, NO_BOXES, (8, 8))
    with pytest.raises(Ds2d2Error, match="DISW needs"):
        explicit_losses(s, t, None, None)
    with pytest.raises(Ds2d2Error, match="batch"):
        explicit_losses(s, t, NO_BOXES * 2, (8, 8))
    with pytest.raises(Ds2d2Error, match="do not match"):
        explicit_losses({"0": s[0]}, {"1": t[0]}, NO_BOXES, (8, 8))
    with pytest.raises(Ds2d2Error, match="Adapter"):
        fitnet_loss([torch.randn(1, 3, 4, 4)], t)


def test_autocast_cpu_bfloat16_is_float32() -> None:
    adapter = Adapter(4, 4)
    s, t = [torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = explicit_losses([adapter(x) for x in s], t, boxes, (32, 32))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out)
    ref = explicit_losses([adapter(x) for x in s], t, boxes, (32, 32))
    torch.testing.assert_close(out[0], ref[0], rtol=2e-2, atol=0)


@CUDA
def test_cuda_matches_cpu() -> None:
    s, t = [torch.randn(2, 8, 16, 16)], [torch.randn(2, 8, 16, 16)]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0]])] * 2
    cpu = explicit_losses(s, t, boxes, (128, 128))
    gpu = explicit_losses([s[0].cuda()], [t[0].cuda()], [b.cuda() for b in boxes], (128, 128))
    for g, c in zip(gpu, cpu):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)
    # boxes left on the CPU still give maps on the features' device
    mixed = explicit_losses([s[0].cuda()], [t[0].cuda()], boxes, (128, 128))
    torch.testing.assert_close(mixed[0].cpu(), cpu[0], rtol=1e-5, atol=1e-6)
