"""Wavelet split on FPN-shaped tensors: exact torch Haar path vs ptwt, forward+backward.

The split on the paper's shapes, batch 2, 256 channels: RetinaNet P3-P7 of a 1024 px input
(128 ... 8 px maps) and Faster R-CNN P2-P6 of an 800 px input (200 ... 13 px), each with one
torch thread and with all of them, on contiguous and on channels-last features; beside ours
and ptwt, the strided form our Haar path had before its corners were unshuffled and the
unshuffled form with autograd's backward, before it was written by hand (same values and
gradients bit for bit). Variants take turns (`interleaved_medians`), so each ratio is measured
under one load. Also the whole explicit loss (both streams, DISW weights): ours
(`explicit_losses`: Haar path, one transform of the student-teacher difference, DISW maps
built inside the call) vs method.md transcribed literally (ptwt on student and on teacher,
DISW maps precomputed outside the timed call).
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
from _timing import interleaved_medians, median_time  # noqa: E402

INPUT, BATCH, CHANNELS = 1024, 2, 256
STRIDES = (8, 16, 32, 64, 128)
SPLIT_SHAPES = (("RetinaNet P3-P7 @1024", 1024, (8, 16, 32, 64, 128)),
                ("Faster R-CNN P2-P6 @800", 800, (4, 8, 16, 32, 64)))


def _strided_haar(x: torch.Tensor):
    """Our Haar path before this change: strided views of the 2x2 blocks (same values, bit for bit)."""
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2)).reshape(n, c, (h + 1) // 2, 2, (w + 1) // 2, 2)
    top, bottom = x[:, :, :, 0], x[:, :, :, 1]
    rows_sum, rows_diff = (top + bottom) * 0.5, (top - bottom) * 0.5
    details = (rows_diff[..., 0] + rows_diff[..., 1], rows_sum[..., 0] - rows_sum[..., 1],
               rows_diff[..., 0] - rows_diff[..., 1])
    return rows_sum[..., 0] + rows_sum[..., 1], torch.stack(details, dim=2)


def _autograd_haar(x: torch.Tensor):
    """The unshuffled corners with autograd's backward: our Haar path before its backward was
    written by hand (same values and gradients, bit for bit)."""
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    tl, tr, bl, br = torch.nn.functional.pixel_unshuffle(x, 2).view(n, c, 4, h2, w2).unbind(2)
    sum_left, sum_right = (tl + bl) * 0.5, (tr + br) * 0.5
    diff_left, diff_right = (tl - bl) * 0.5, (tr - br) * 0.5
    return sum_left + sum_right, torch.stack((diff_left + diff_right, sum_left - sum_right,
                                              diff_left - diff_right), dim=2)


def split_cases(quick: bool, device: str) -> list[dict]:
    """ours / strided / ptwt on both paper shapes, 1 and all threads, contiguous and channels-last."""
    gen = torch.Generator().manual_seed(0)
    repeats = 3 if quick else 9
    all_threads = torch.get_num_threads()
    threads = [1] if device != "cpu" or all_threads == 1 else [1, all_threads]
    cases = []
    for name, size, strides in SPLIT_SHAPES:
        base = [torch.randn(BATCH, CHANNELS, -(-size // s), -(-size // s), generator=gen).to(device) for s in strides]
        for layout in ("contiguous", "channels_last"):
            feats = [(f.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else f.clone())
                     .requires_grad_() for f in base]
            fns = {"ours": _split_fwd_bwd(spectral_split, feats), "strided": _split_fwd_bwd(_strided_haar, feats),
                   "autograd": _split_fwd_bwd(_autograd_haar, feats),
                   "ptwt": _split_fwd_bwd(lambda f: _ptwt_split(f, "haar"), feats)}
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                try:
                    med = interleaved_medians(fns, repeats, device)
                finally:
                    torch.set_num_threads(all_threads)
                cases.append({
                    "case": f"spectral_split fwd+bwd, {name}, {layout}, {n_threads} thread(s)",
                    "shapes": f"{BATCH}x{CHANNELS}x[{', '.join(str(f.shape[-1]) for f in feats)}]",
                    "layout": layout, "threads": n_threads,
                    "ms": {k: round(v * 1e3, 2) for k, v in med.items()},
                    "speedup_vs_ptwt": round(med["ptwt"] / med["ours"], 2),
                    "speedup_vs_strided": round(med["strided"] / med["ours"], 2),
                    "speedup_vs_autograd": round(med["autograd"] / med["ours"], 2),
                    "strided_vs_ptwt": round(med["ptwt"] / med["strided"], 2),
                    "summary": f"split {name}, {layout}, {n_threads} thr: ours {med['ours'] * 1e3:.0f} ms, "
                               f"strided {med['strided'] * 1e3:.0f} ms, autograd {med['autograd'] * 1e3:.0f} ms, ptwt {med['ptwt'] * 1e3:.0f} ms: "
                               f"x{med['ptwt'] / med['ours']:.2f} vs ptwt (strided x{med['ptwt'] / med['strided']:.2f})",
                })
    return cases


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
        "cases": [*split_cases(quick, device),
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
