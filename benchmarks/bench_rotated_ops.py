"""Rotated-box IoU and NMS (`ds2d2_cli.rotated`) against the references people would use.

Scenes are DOTA-like: three quarters of the boxes spread uniformly over the scene, a quarter in
one dense cluster (a parking lot: normal, sigma 100 px); sides w = 8 + 192 u^3 px (mostly small,
a few up to 200), h = w * U(0.2, 1), any angle. Cases:

- pairwise IoU of 2,000 x 2,000 boxes in a 2,048 px scene (float64 and float32) against a
  shapely loop over every pair (Polygon.intersection / union; timed on a slice of rows and
  scaled to all pairs) and against shapely with an STRtree prefilter (only envelope-overlapping
  pairs: the fair fast shapely);
- NMS of 10,000 boxes in a 4,000 px scene (threshold 0.1, as MMRotate's rotated RetinaNet)
  against torchvision's `nms` / `batched_nms` (15 categories) on the boxes' envelopes.

Times are medians, the variants of a case timed in turns; CPU runs use one torch thread. With
CUDA available the IoU and NMS cases are also timed on the GPU (no shapely there).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torchvision

from ds2d2_cli.rotated import (
    batched_rotated_nms, normalize_le90, rbox_envelope, rbox_to_poly, rotated_box_iou, rotated_nms,
)

if str(Path(__file__).resolve().parent) not in sys.path:  # run_all loads us by path
    sys.path.append(str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

IOU_BOXES, IOU_SCENE = 2000, 2048
NMS_BOXES, NMS_SCENE, NMS_THRESHOLD, CATEGORIES = 10000, 4000, 0.1, 15


def dota_scene(n: int, size: float, gen: torch.Generator) -> torch.Tensor:
    """le90 boxes [n, 5] (float64): spread boxes plus one dense cluster, DOTA-like sizes."""
    clustered = n // 4
    spread = torch.rand(n - clustered, 2, generator=gen, dtype=torch.float64) * size
    centre = torch.tensor([0.3, 0.6], dtype=torch.float64) * size
    cluster = centre + torch.randn(clustered, 2, generator=gen, dtype=torch.float64) * 100
    xy = torch.cat([spread, cluster])
    w = 8 + torch.rand(n, generator=gen, dtype=torch.float64).pow(3) * 192
    h = w * (0.2 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64))
    theta = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * math.pi
    return normalize_le90(torch.stack([xy[:, 0], xy[:, 1], w, h, theta], dim=1))


def _shapely_rows(polys: list, rows: range) -> tuple[float, list[list[float]]]:
    """Seconds and IoUs of the plain shapely loop over rows x all polygons."""
    start = time.perf_counter()
    out = []
    for i in rows:
        p = polys[i]
        line = []
        for q in polys:
            inter = p.intersection(q).area
            union = p.union(q).area
            line.append(inter / union if union > 0 else 0.0)
        out.append(line)
    return time.perf_counter() - start, out


def _shapely_strtree(polys: list) -> float:
    """Seconds for every overlapping pair's IoU with shapely, pairs from an STRtree (envelopes)."""
    import shapely

    start = time.perf_counter()
    tree = shapely.STRtree(polys)
    left, right = tree.query(polys)
    for i, j in zip(left.tolist(), right.tolist()):
        p, q = polys[i], polys[j]
        p.intersection(q).area / p.union(q).area  # each candidate pair's IoU, as rotated_iou computes it
    return time.perf_counter() - start


def iou_case(boxes: torch.Tensor, quick: bool, device: str) -> dict:
    repeats = 3 if quick else 7
    on = boxes.to(device)
    single = on.float()
    times = interleaved_medians({"float64": lambda: rotated_box_iou(on, on),
                                 "float32": lambda: rotated_box_iou(single, single)}, repeats, device)
    iou = rotated_box_iou(on, on).cpu()
    case = {"case": "pairwise_iou", "device": device, "boxes": len(boxes), "scene_px": IOU_SCENE,
            "overlapping_pairs": int((iou > 0).sum()),
            "ours_float64_ms": round(times["float64"] * 1e3, 2), "ours_float32_ms": round(times["float32"] * 1e3, 2),
            "float32_max_abs_diff": float((rotated_box_iou(single, single).cpu().double() - iou).abs().max())}
    if device != "cpu":
        case["summary"] = (f"IoU {len(boxes)}x{len(boxes)} on {device}: float64 {case['ours_float64_ms']} ms, "
                           f"float32 {case['ours_float32_ms']} ms")
        return case
    try:
        from shapely.geometry import Polygon
    except ImportError:  # shapely is a dev-only dependency
        case["summary"] = f"IoU {len(boxes)}x{len(boxes)}: float64 {case['ours_float64_ms']} ms (no shapely here)"
        return case
    polys = [Polygon(p) for p in rbox_to_poly(boxes).numpy()]
    rows = range(0, len(polys), len(polys) // (4 if quick else 20))  # a spread-out slice of rows
    seconds, ref = _shapely_rows(polys, rows)
    loop_s = seconds / len(rows) * len(polys)
    tree_s = _shapely_strtree(polys)
    diff = (iou[list(rows)] - torch.tensor(ref, dtype=torch.float64)).abs().max()
    best = min(times.values())
    case.update({
        "shapely_loop_rows_timed": len(rows), "shapely_loop_s_extrapolated": round(loop_s, 1),
        "shapely_strtree_s": round(tree_s, 2),
        "speedup_vs_shapely_loop": round(loop_s / times["float64"], 1),
        "speedup_vs_shapely_strtree": round(tree_s / times["float64"], 1),
        "max_abs_diff_vs_shapely": float(diff),
    })
    case["summary"] = (f"IoU {len(boxes)}x{len(boxes)}: float64 {case['ours_float64_ms']} ms, float32 "
                       f"{case['ours_float32_ms']} ms; shapely loop ~{loop_s:.0f} s (x{loop_s / times['float64']:.0f}, "
                       f"{len(rows)} rows timed), shapely+STRtree {tree_s:.2f} s (x{tree_s / times['float64']:.1f}); "
                       f"max|diff| {float(diff):.1e}; best ours {best * 1e3:.1f} ms")
    return case


def nms_case(boxes: torch.Tensor, quick: bool, device: str, gen: torch.Generator) -> dict:
    repeats = 5 if quick else 15
    scores = torch.rand(len(boxes), generator=gen).to(device)
    idxs = torch.randint(0, CATEGORIES, (len(boxes),), generator=gen).to(device)
    on = boxes.float().to(device)
    envelope = rbox_envelope(on)
    t = interleaved_medians({
        "rotated_nms": lambda: rotated_nms(on, scores, NMS_THRESHOLD),
        "torchvision_nms": lambda: torchvision.ops.nms(envelope, scores, NMS_THRESHOLD),
        "batched_rotated_nms": lambda: batched_rotated_nms(on, scores, idxs, NMS_THRESHOLD),
        "torchvision_batched_nms": lambda: torchvision.ops.batched_nms(envelope, scores, idxs, NMS_THRESHOLD),
    }, repeats, device)
    ms = {k: round(v * 1e3, 2) for k, v in t.items()}
    ratio = t["rotated_nms"] / t["torchvision_nms"]
    batched_ratio = t["batched_rotated_nms"] / t["torchvision_batched_nms"]
    return {
        "case": "nms", "device": device, "boxes": len(boxes), "scene_px": NMS_SCENE, "iou_threshold": NMS_THRESHOLD,
        "categories": CATEGORIES, "dtype": "float32", **{f"{k}_ms": v for k, v in ms.items()},
        "kept_rotated": len(rotated_nms(on, scores, NMS_THRESHOLD)),
        "kept_envelopes": len(torchvision.ops.nms(envelope, scores, NMS_THRESHOLD)),
        "ratio_vs_torchvision_nms": round(ratio, 2), "ratio_vs_torchvision_batched_nms": round(batched_ratio, 2),
        "summary": f"NMS {len(boxes)} boxes on {device}: rotated {ms['rotated_nms']} ms vs torchvision envelopes "
                   f"{ms['torchvision_nms']} ms (x{ratio:.1f}); batched {ms['batched_rotated_nms']} ms vs "
                   f"{ms['torchvision_batched_nms']} ms (x{batched_ratio:.1f})",
    }


def run(quick: bool, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    iou_boxes = dota_scene(IOU_BOXES, IOU_SCENE, gen)
    nms_boxes = dota_scene(NMS_BOXES, NMS_SCENE, gen)
    devices = [device] + (["cuda"] if device == "cpu" and torch.cuda.is_available() else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = []
        for where in devices:
            cases.append(iou_case(iou_boxes, quick, where))
            cases.append(nms_case(nms_boxes, quick, where, torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(threads)
    return {"distribution": "75% uniform + 25% one cluster (sigma 100 px); w = 8 + 192 u^3 px, "
                            "h = w U(0.2, 1), theta U(-pi/2, pi/2)", "torch_threads": 1, "cases": cases}
