"""Explicit stream losses (method.md, "Explicit stream"): exact values on tiny cases,
agreement with a direct transcription of the formula, gradients, and the FitNet baseline."""

from __future__ import annotations

import ptwt
import pytest
import torch

from ds2d2_cli.distill.disw import disw_weights
from ds2d2_cli.distill.explicit import Adapter, explicit_losses, fitnet_loss
from ds2d2_cli.distill.spectral import band_shape
from ds2d2_cli.errors import Ds2d2Error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


def test_exact_2x2() -> None:
    student = torch.tensor([[5.0, 3.0], [3.0, 5.0]])[None, None]
    teacher = torch.zeros(1, 1, 2, 2)
    # bands of the difference: LL = 8, (H, V, D) = (0, 0, 2)
    out = explicit_losses([student], [teacher], None)
    assert out["explicit_low"].item() == 64.0
    assert out["explicit_high"].item() == pytest.approx(4 / 3)
    out = explicit_losses([student, student], [teacher, teacher], [torch.full((1, 1, 1, 1), 1.5)] * 2)
    assert out["explicit_low"].item() == 2 * 96.0
    assert out["explicit_high"].item() == pytest.approx(2 * 2.0)


def test_exact_4x4_with_weights() -> None:
    student = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    teacher = torch.zeros(1, 1, 4, 4)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    out = explicit_losses([student], [teacher], [w])
    # LL = [[5, 9], [21, 25]] -> (25*1 + 81*2 + 441*3 + 625*4) / 4
    assert out["explicit_low"].item() == pytest.approx(4010 / 4)
    # H = -4, V = -1, D = 0 everywhere -> (16 + 1 + 0) * (1+2+3+4) / (3 * 4)
    assert out["explicit_high"].item() == pytest.approx(170 / 12)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_matches_formula_with_disw(wavelet: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    student = [torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
    teacher = [torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
    boxes = [torch.tensor([[10.0, 20.0, 40.0, 30.0], [100, 100, 250, 200]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    weights = disw_weights(boxes, (256, 256), [band_shape(s, wavelet) for s in sizes], dtype=torch.float64)
    out = explicit_losses(student, teacher, weights, wavelet)
    ref_low, ref_high = _reference(student, teacher, weights, wavelet)
    torch.testing.assert_close(out["explicit_low"], ref_low)
    torch.testing.assert_close(out["explicit_high"], ref_high)
    out = explicit_losses(student, teacher, None, wavelet)
    ref_low, ref_high = _reference(student, teacher, None, wavelet)
    torch.testing.assert_close(out["explicit_low"], ref_low)
    torch.testing.assert_close(out["explicit_high"], ref_high)


def test_zero_when_student_equals_teacher() -> None:
    feats = [torch.randn(2, 4, 9, 7), torch.randn(2, 4, 5, 4)]
    out = explicit_losses(feats, [f.clone() for f in feats], None)
    assert out["explicit_low"].item() == 0.0 and out["explicit_high"].item() == 0.0
    assert fitnet_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_gradients_reach_student_and_adapter_not_teacher() -> None:
    adapter = Adapter(3, 5)
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8, 8, requires_grad=True)
    weights = disw_weights([torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 2, (64, 64), [(4, 4)])
    out = explicit_losses([student], [teacher], weights, adapter=adapter)
    (out["explicit_low"] + out["explicit_high"]).backward()
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
    student = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    # A(s) = 0 on both levels: low band of ones is 2 -> (0 - 2)^2 = 4 per level
    out = explicit_losses(student, teacher, None, adapter=adapter)
    assert out["explicit_low"].item() == 8.0 and out["explicit_high"].item() == 0.0
    assert fitnet_loss(student, teacher, adapter=adapter).item() == 2.0


def test_fitnet_exact() -> None:
    student = [torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 2, 2), 3.0)]
    teacher = [torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 2, 2)]
    assert fitnet_loss(student, teacher).item() == 4.0 + 4.0


def test_stream_subset_and_errors() -> None:
    s, t = [torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 4, 4)]
    assert set(explicit_losses(s, t, None, streams=("low",))) == {"explicit_low"}
    assert set(explicit_losses(s, t, None, streams=("high",))) == {"explicit_high"}
    with pytest.raises(Ds2d2Error, match="streams"):
        explicit_losses(s, t, None, streams=("mid",))
    with pytest.raises(Ds2d2Error, match="DISW map"):
        explicit_losses(s, t, [torch.ones(1, 1, 4, 4)])
    with pytest.raises(Ds2d2Error, match="levels"):
        explicit_losses(s, t + t, None)
    with pytest.raises(Ds2d2Error, match="Adapter"):
        explicit_losses([torch.randn(1, 3, 4, 4)], t, None)


def test_autocast_cpu_bfloat16_is_float32() -> None:
    adapter = Adapter(4, 4)
    s, t = [torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = explicit_losses(s, t, None, adapter=adapter)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    ref = explicit_losses(s, t, None, adapter=adapter)
    torch.testing.assert_close(out["explicit_low"], ref["explicit_low"], rtol=2e-2, atol=0)


@CUDA
def test_cuda_matches_cpu() -> None:
    s, t = [torch.randn(2, 8, 16, 16)], [torch.randn(2, 8, 16, 16)]
    w = disw_weights([torch.tensor([[0.0, 0.0, 30.0, 30.0]])] * 2, (128, 128), [(8, 8)])
    cpu = explicit_losses(s, t, w)
    gpu = explicit_losses([s[0].cuda()], [t[0].cuda()], [w[0].cuda()])
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-5, atol=1e-6)
