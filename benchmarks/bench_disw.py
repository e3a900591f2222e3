"""DISW maps: vectorised builder (`disw_weights_levels`) vs the per-box loop (the authors' approach).

Dense remote-sensing scenes (200-800 mostly small boxes per 1024 px patch), batch 2,
five FPN levels; maps at band resolution (half the FPN size). Both variants run in the
same process on the same boxes; times are medians of repeats, the ratio is loop/vectorised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ds2d2_cli.distill.disw import _disw_weights_loop, disw_weights_levels
from ds2d2_cli.distill.spectral import band_shape

if str(Path(__file__).resolve().parent) not in sys.path:  # run_all loads us by path
    sys.path.append(str(Path(__file__).resolve().parent))
from _timing import median_time  # noqa: E402

INPUT = 1024
LEVELS = {  # FPN strides -> band shapes of a 1024 x 1024 input
    "retinanet_P3-P7": (8, 16, 32, 64, 128),
    "faster_rcnn_P2-P6": (4, 8, 16, 32, 64),
}


def dense_scene(n_boxes: int, gen: torch.Generator) -> torch.Tensor:
    """Clusters of small objects (parking lots, harbours) plus a few large ones."""
    centres = torch.rand(max(1, n_boxes // 40), 2, generator=gen) * INPUT
    which = torch.randint(0, centres.shape[0], (n_boxes,), generator=gen)
    xy = centres[which] + torch.randn(n_boxes, 2, generator=gen) * 40
    wh = 6 + torch.rand(n_boxes, 2, generator=gen).pow(4) * 250
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    return boxes.clamp(0, INPUT)


def run(quick: bool, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    counts = (200, 500, 800) if quick else (200, 400, 500, 800)
    repeats = 5 if quick else 21
    pyramids = {"retinanet_P3-P7": LEVELS["retinanet_P3-P7"]} if quick else LEVELS
    cases = []
    for pyramid, strides in pyramids.items():
        shapes = [band_shape((INPUT // s, INPUT // s)) for s in strides]
        for n in counts:
            boxes = [dense_scene(n, gen).to(device) for _ in range(2)]
            fast = disw_weights_levels(boxes, (INPUT, INPUT), shapes)
            slow = _disw_weights_loop(boxes, (INPUT, INPUT), shapes)
            max_diff = max(float((f - s).abs().max()) for f, s in zip(fast, slow))
            t_fast = median_time(lambda: disw_weights_levels(boxes, (INPUT, INPUT), shapes), repeats, device)
            t_loop = median_time(lambda: _disw_weights_loop(boxes, (INPUT, INPUT), shapes), max(3, repeats // 4), device)
            cases.append(
                {
                    "pyramid": pyramid,
                    "band_shapes": shapes,
                    "batch": 2,
                    "boxes_per_image": n,
                    "vectorised_ms": round(t_fast * 1e3, 3),
                    "loop_ms": round(t_loop * 1e3, 3),
                    "speedup": round(t_loop / t_fast, 1),
                    "max_abs_diff": max_diff,
                    "summary": f"{pyramid} {n} boxes x2 imgs: vectorised {t_fast * 1e3:.2f} ms, "
                    f"loop {t_loop * 1e3:.1f} ms, x{t_loop / t_fast:.0f}, max|diff| {max_diff:.1e}",
                }
            )
    return {"input": INPUT, "repeats": repeats, "cases": cases}
