"""Wavelet split on FPN-shaped tensors: exact torch Haar path vs ptwt, forward+backward.

Batch 2, 256 channels, RetinaNet P3-P7 of a 1024 px input (128 ... 8 px maps). Also the
whole explicit loss (both streams, DISW weights): ours (`explicit_losses`: Haar path, one
transform of the student-teacher difference, DISW maps built inside the call) vs method.md
transcribed literally (ptwt on student and on teacher, DISW maps precomputed outside the
timed call). Medians of repeats, same process, same tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import ptwt
import torch

from ds2d2_cli.distill.disw import disw_weights_levels
from ds2d2_cli.distill.explicit import explicit_losses
from ds2d2_cli.distill.spectral import _ptwt_split, band_shape, spectral_split

if str(Path(__file__).resolve().parent) not in sys.path:  # run_all loads us by path
    sys.path.append(str(Path(__file__).resolve().parent))
from _timing import median_time  # noqa: E402

INPUT, BATCH, CHANNELS = 1024, 2, 256
STRIDES = (8, 16, 32, 64, 128)


def _split_fwd_bwd(split: Callable, feats: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        total = 0.0
        for f in feats:
            low, high = split(f)
            total = total + low.square().mean() + high.square().mean()
        total.backward()
        for f in feats:
            f.grad = None

    return step


def _literal_explicit(student, teacher, weights) -> tuple[torch.Tensor, torch.Tensor]:
    low = high = 0.0
    for s, t, w in zip(student, teacher, weights):
        ls, hs = ptwt.wavedec2(s, "haar", level=1, mode="zero")
        lt, ht = ptwt.wavedec2(t.detach(), "haar", level=1, mode="zero")
        hs, ht = torch.stack(tuple(hs), 2), torch.stack(tuple(ht), 2)
        low = low + torch.mean((ls - lt) ** 2 * w)
        high = high + torch.mean((hs - ht) ** 2 * w[:, :, None])
    return low, high


def _loss_fwd_bwd(loss_fn: Callable, student, teacher) -> Callable[[], None]:
    def step() -> None:
        low, high = loss_fn(student, teacher)
        (low + high).backward()
        for s in student:
            s.grad = None

    return step


def run(quick: bool, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    repeats = 3 if quick else 15
    sizes = [(INPUT // s, INPUT // s) for s in STRIDES]
    student = [torch.randn(BATCH, CHANNELS, *hw, generator=gen).to(device).requires_grad_() for hw in sizes]
    teacher = [torch.randn(BATCH, CHANNELS, *hw, generator=gen).to(device) for hw in sizes]
    boxes = [torch.tensor([[100.0, 100.0, 140.0, 130.0], [500, 500, 900, 800]], device=device)] * BATCH
    weights = disw_weights_levels(boxes, (INPUT, INPUT), [band_shape(hw) for hw in sizes])

    def ours_fn(s, t):
        return explicit_losses(s, t, boxes, (INPUT, INPUT))

    def literal_fn(s, t):
        return _literal_explicit(s, t, weights)

    with torch.no_grad():
        diff = max(
            float((a - b).abs().max())
            for f in student
            for a, b in zip(spectral_split(f), _ptwt_split(f, "haar"))
        )
    t_torch = median_time(_split_fwd_bwd(spectral_split, student), repeats, device)
    t_ptwt = median_time(_split_fwd_bwd(lambda f: _ptwt_split(f, "haar"), student), repeats, device)
    ours = ours_fn(student, teacher)
    literal = literal_fn(student, teacher)
    loss_rel = max(abs(o.item() - r.item()) / abs(r.item()) for o, r in zip(ours, literal))
    t_ours = median_time(_loss_fwd_bwd(ours_fn, student, teacher), repeats, device)
    t_literal = median_time(_loss_fwd_bwd(literal_fn, student, teacher), repeats, device)
    shape = f"{BATCH}x{CHANNELS}x[{', '.join(str(h) for h, _ in sizes)}]"
    return {
        "shapes": shape,
        "repeats": repeats,
        "cases": [
            {
                "case": "spectral_split fwd+bwd, 5 levels",
                "torch_haar_ms": round(t_torch * 1e3, 2),
                "ptwt_haar_ms": round(t_ptwt * 1e3, 2),
                "speedup": round(t_ptwt / t_torch, 2),
                "max_abs_diff": diff,
                "summary": f"split fwd+bwd {shape}: torch Haar {t_torch * 1e3:.1f} ms, ptwt {t_ptwt * 1e3:.1f} ms, "
                f"x{t_ptwt / t_torch:.2f}, max|diff| {diff:.1e}",
            },
            {
                "case": "explicit losses (low+high, DISW) fwd+bwd, 5 levels",
                "ours_ms": round(t_ours * 1e3, 2),
                "literal_ptwt_ms": round(t_literal * 1e3, 2),
                "speedup": round(t_literal / t_ours, 2),
                "max_rel_diff": loss_rel,
                "summary": f"explicit loss fwd+bwd: ours {t_ours * 1e3:.1f} ms, literal ptwt {t_literal * 1e3:.1f} ms, "
                f"x{t_literal / t_ours:.2f}, rel diff {loss_rel:.1e}",
            },
        ],
    }
