"""Batched inference and COCO metrics (pycocotools), including DOTA patch merging.

Detections leave the model as tensors and become COCO result rows in one vectorised
step per batch; pycocotools does the matching (its C core), so no per-box Python loop
sits on the hot path.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ds2d2_cli.config import InputConfig
from ds2d2_cli.data.dataset import CocoSplit, DetectionDataset, collate
from ds2d2_cli.data.prepared import SCENES_SUFFIX
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

METRIC_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: nn.Module, dataset: DetectionDataset, device: torch.device, batch_size: int = 8,
            num_workers: int = 0, reporter: Reporter | None = None) -> tuple[list[dict[str, Any]], float]:
    """COCO result rows for every image of `dataset`, and the model's images/s.

    Under torchrun each process predicts every world_size-th image and all processes get
    all rows (in rank order; one image's rows stay together and in order), so the metrics
    equal a single-process evaluation.
    """
    from torch.utils.data import Subset

    from ds2d2_cli import distributed

    reporter = reporter or NullReporter()
    if not distributed.is_main():
        reporter = NullReporter()
    world = distributed.world_size()
    total_images = len(dataset)
    if world > 1:
        dataset = Subset(dataset, range(distributed.rank(), total_images, world))
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    rows: list[dict[str, Any]] = []
    progress = reporter.task("eval", total=total_images)
    model_seconds = 0.0
    try:
        for images, targets in loader:
            images = [img.to(device) for img in images]
            start = time.perf_counter()
            outputs = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_seconds += time.perf_counter() - start
            for target, out in zip(targets, outputs):
                rows.extend(detections_to_coco(int(target["image_id"]), out))
            progress.update(len(images) * world)
    finally:
        progress.close()
    speed = len(dataset) / model_seconds if model_seconds > 0 else 0.0
    if world > 1:
        rows = distributed.gather_lists(rows)
        speed = sum(distributed.gather_lists([speed]))  # all processes together
    return rows, speed


def detections_to_coco(image_id: int, detections: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """COCO result rows (bbox x, y, w, h to 2 decimals, score to 5) of one image's detections (x1, y1, x2, y2)."""
    from torchvision.ops import box_convert

    boxes = detections["boxes"].detach().double().cpu()
    if boxes.numel() == 0:
        return []
    xywh = box_convert(boxes, "xyxy", "xywh").numpy().round(2).tolist()
    scores = detections["scores"].detach().double().cpu().numpy().round(5).tolist()
    labels = detections["labels"].cpu().tolist()
    rows = [
        {"image_id": image_id, "category_id": int(c), "bbox": b, "score": s}
        for b, s, c in zip(xywh, scores, labels)
    ]
    if "rboxes" in detections:  # an oriented detector: le90 boxes beside their envelopes
        for row, rbox in zip(rows, detections["rboxes"].detach().double().cpu().numpy()):
            row["rbox"] = rbox_row(rbox)
    return [row for row in rows if row["category_id"] > 0]  # 0 is background / RetinaNet's unused slot


def rbox_row(rbox: Sequence[float]) -> list[float]:
    """An le90 box as the JSON rows hold it: centre and sides to 2 decimals, the angle to 6."""
    return [round(float(v), 2) for v in rbox[:4]] + [round(float(rbox[4]), 6)]


def _silent_coco(annotations: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = annotations
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(gt: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """mAP, AP50, AP75, APs, APm, APl as pycocotools fractions (0..1) and per-class AP50/AP."""
    from pycocotools.cocoeval import COCOeval

    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    coco_gt = _silent_coco(gt)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    empty = {k: 0.0 for k in METRIC_KEYS}
    if not results or not gt.get("annotations"):
        return {**empty, "per_class": {n: {"AP50": 0.0, "AP": 0.0} for n in names.values()}, "detections": len(results)}
    known = set(names)
    unknown = {r["category_id"] for r in results} - known
    if unknown:
        raise InputError(f"predictions use category ids {sorted(unknown)} that the annotations do not define")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.maxDets = [1, 10, max(100, _max_dets_per_image(results))]
        evaluator.evaluate()
        evaluator.accumulate()
    # Read the summary numbers from the precision array rather than `summarize()`, which
    # hard-codes maxDets=100 and reports -1 once we raise the cap for dense DOTA scenes.
    precision = evaluator.eval["precision"]  # [T(iou .50:.05:.95), R, K, A(all,s,m,l), M]
    iou_50, iou_75 = (int(np.argmin(np.abs(evaluator.params.iouThrs - t))) for t in (0.5, 0.75))
    metrics: dict[str, Any] = {
        "mAP": _mean_valid(precision[:, :, :, 0, -1]),
        "AP50": _mean_valid(precision[iou_50, :, :, 0, -1]),
        "AP75": _mean_valid(precision[iou_75, :, :, 0, -1]),
        "APs": _mean_valid(precision[:, :, :, 1, -1]),
        "APm": _mean_valid(precision[:, :, :, 2, -1]),
        "APl": _mean_valid(precision[:, :, :, 3, -1]),
    }
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        per_class[names[cat_id]] = {
            "AP50": _mean_valid(precision[iou_50, :, k, 0, -1]), "AP": _mean_valid(precision[:, :, k, 0, -1]),
        }
    metrics["per_class"] = per_class
    metrics["detections"] = len(results)
    return metrics


TASK1_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def oriented_metrics(gt: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DOTA Task 1 scores of oriented result rows (`rbox`) against a prepared JSON's polygons.

    AP50 is the devkit's Task 1 mAP (`dota_task1.score_task1`: VOC07 AP at polygon IoU > 0.5,
    difficult and crowd objects ignored, the mean over every class); AP75 the same at 0.75 and
    mAP the mean over IoU 0.50:0.05:0.95, as MMRotate reports DOTA beside Task 1. The size
    metrics (APs/APm/APl) are COCO's and are not defined here (None).
    """
    from ds2d2_cli.dota_task1 import Task1Detections, Task1Truth, score_task1
    from ds2d2_cli.rotated import rbox_to_poly

    names = {c["id"]: c["name"] for c in gt["categories"]}
    class_names = [names[k] for k in sorted(names)]
    unknown = {r["category_id"] for r in results} - set(names)
    if unknown:
        raise InputError(f"predictions use category ids {sorted(unknown)} that the annotations do not define")
    truth_rows: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        truth_rows.setdefault(ann["image_id"], []).append(ann)
    truth = {}
    for image_id, anns in truth_rows.items():
        polys = np.array([_outline(a) for a in anns], dtype=np.float64).reshape(-1, 8)
        truth[str(image_id)] = Task1Truth(
            polys, tuple(names[a["category_id"]] for a in anns),
            np.array([bool(a.get("difficult", 0)) or bool(a.get("iscrowd", 0)) for a in anns], dtype=bool))
    detections = {}
    for category, name in names.items():
        rows = [r for r in results if r["category_id"] == category]
        rboxes = torch.tensor([r["rbox"] for r in rows], dtype=torch.float64).reshape(-1, 5)
        detections[name] = Task1Detections(tuple(str(r["image_id"]) for r in rows),
                                           np.array([r["score"] for r in rows], dtype=np.float64),
                                           rbox_to_poly(rboxes).reshape(-1, 8).numpy())
    scores = {t: score_task1(detections, truth, class_names, iou_threshold=t) for t in TASK1_THRESHOLDS}
    at50, at75 = scores[0.5], scores[0.75]
    return {
        "metric": "dota-task1", "mAP": float(np.mean([s.mAP for s in scores.values()])), "AP50": at50.mAP,
        "AP75": at75.mAP, "APs": None, "APm": None, "APl": None,
        "per_class": {n: {"AP50": at50.per_class[n].ap,
                          "AP": float(np.mean([s.per_class[n].ap for s in scores.values()]))} for n in class_names},
        "detections": len(results),
    }


def _outline(ann: dict[str, Any]) -> list[float]:
    """The object's 4-corner polygon (what the devkit scores), or its rbox's corners."""
    from ds2d2_cli.rotated import rbox_to_poly

    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list) and segmentation and len(segmentation[0]) == 8:
        return list(segmentation[0])
    if "rbox" not in ann:
        raise InputError(f"annotation {ann.get('id')} has neither a 4-corner polygon nor an rbox: prepare the "
                         "data with --boxes obb")
    return rbox_to_poly(torch.tensor(ann["rbox"], dtype=torch.float64)).reshape(-1).tolist()


def _max_dets_per_image(results: Sequence[dict[str, Any]]) -> int:
    counts: dict[int, int] = {}
    for r in results:
        counts[r["image_id"]] = counts.get(r["image_id"], 0) + 1
    return max(counts.values(), default=0)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else 0.0


def load_coco_json(path: str | Path) -> dict[str, Any]:
    from ds2d2_cli.fileio import read_json

    return read_json(path)


def evaluate_results_file(predictions: Path, annotations: Path) -> dict[str, Any]:
    """COCO metrics of a results file; DOTA Task 1 (`oriented_metrics`) when its rows carry `rbox`."""
    gt = load_coco_json(annotations)
    results = load_coco_json(predictions)
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise InputError("expected a COCO results list: [{image_id, category_id, bbox, score}, ...]", predictions)
    for i, row in enumerate(results):
        if not isinstance(row, dict) or not {"image_id", "category_id", "bbox", "score"} <= row.keys():
            raise InputError(f"result {i} lacks image_id, category_id, bbox or score", predictions)
    if not isinstance(gt, dict) or "images" not in gt or "categories" not in gt:
        raise InputError("not a COCO annotation file (needs images and categories)", annotations)
    gt_ids = {img["id"] for img in gt["images"]}
    stray = {r["image_id"] for r in results} - gt_ids
    if stray:
        raise InputError(f"predictions for image ids not in the annotations: {sorted(stray)[:5]}", predictions)
    oriented = [i for i, row in enumerate(results) if "rbox" in row]
    if not oriented:
        return coco_metrics(gt, results)
    # an oriented model's rows (`eval --predictions-out`): scored as `eval CKPT` scores them
    for i, row in enumerate(results):
        rbox = row.get("rbox")
        if not (isinstance(rbox, list) and len(rbox) == 5
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rbox)):
            raise InputError(f"result {i} has no rbox [cx, cy, w, h, theta] (result {oriented[0]} has one: "
                             "oriented rows are scored by DOTA Task 1, all of them)", predictions)
    return oriented_metrics(gt, results)


def match_detections(ground_truth: Sequence[dict[str, Any]], detections: Sequence[dict[str, Any]], *,
                     iou_thresh: float = 0.5, score_thresh: float = 0.0) -> dict[str, Any]:
    """Hits, misses and false alarms of COCO-style boxes (`bbox` xywh) at one score threshold.

    Per class, detections by descending score each take the unmatched ground-truth box
    they overlap most, if at IoU >= `iou_thresh` (COCO's greedy rule), so a picture's
    counts read like the AP50 they come from. Returns the counts and the kept detections
    each flagged `hit`.
    """
    from torchvision.ops import box_convert, box_iou

    def xyxy(items: Sequence[dict[str, Any]]) -> torch.Tensor:
        return box_convert(torch.tensor([a["bbox"] for a in items], dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")

    kept = sorted((d for d in detections if d.get("score", 1.0) >= score_thresh), key=lambda d: -d.get("score", 1.0))
    flagged: list[dict[str, Any]] = []
    hits = 0
    for category in sorted({a["category_id"] for a in ground_truth} | {d["category_id"] for d in kept}):
        truth = [a for a in ground_truth if a["category_id"] == category]
        found = [d for d in kept if d["category_id"] == category]
        iou = box_iou(xyxy(found), xyxy(truth)) if truth and found else torch.zeros((len(found), len(truth)))
        taken = torch.zeros(len(truth), dtype=torch.bool)
        for i, det in enumerate(found):
            overlaps = iou[i].masked_fill(taken, -1.0) if truth else iou[i]
            best = int(overlaps.argmax()) if truth else -1
            hit = bool(truth) and float(overlaps[best]) >= iou_thresh
            if hit:
                taken[best] = True
                hits += 1
            flagged.append({**det, "hit": hit})
    return {"hits": hits, "misses": len(ground_truth) - hits, "false_alarms": len(flagged) - hits,
            "detections": sorted(flagged, key=lambda d: -d.get("score", 1.0))}


def merge_patch_results(split: CocoSplit, results: Sequence[dict[str, Any]], iou: float = 0.5) -> list[dict[str, Any]]:
    """Shift patch detections to scene coordinates and merge overlaps with class-wise NMS."""
    from torchvision.ops import box_convert

    from ds2d2_cli.data.tiling import merge_order

    by_id = {img["id"]: img for img in split.images}
    if results and any("scene_id" not in by_id[r["image_id"]] for r in results):
        raise InputError("these images carry no scene offsets: cut the scenes into patches with `ds2d2 prepare-data ... --split SIZE`", split.path)
    if not results:
        return []
    offsets = np.array([
        [by_id[r["image_id"]]["window"][0], by_id[r["image_id"]]["window"][1]] for r in results
    ], dtype=np.float64)
    scales = np.array([by_id[r["image_id"]].get("scale", 1.0) for r in results], dtype=np.float64)
    scene_ids = np.array([by_id[r["image_id"]]["scene_id"] for r in results])
    if "rbox" in results[0]:
        return _merge_oriented(results, offsets, scales, scene_ids)
    xywh = np.array([r["bbox"] for r in results], dtype=np.float64)
    xy = (xywh[:, :2] + offsets) / scales[:, None]
    wh = xywh[:, 2:] / scales[:, None]
    boxes = box_convert(torch.from_numpy(np.concatenate([xy, wh], axis=1)), "xywh", "xyxy")
    scores = torch.tensor([r["score"] for r in results], dtype=torch.float64)
    labels = np.array([r["category_id"] for r in results])
    keep = merge_order(boxes, scores, torch.from_numpy(labels.astype(np.int64)),
                       iou, scenes=torch.from_numpy(scene_ids.astype(np.int64))).numpy()
    merged = []
    for i in keep:
        x0, y0, x1, y1 = boxes[i].tolist()
        merged.append({"image_id": int(scene_ids[i]), "category_id": int(labels[i]),
                       "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                       "score": float(scores[i])})
    return merged


def _merge_oriented(results: Sequence[dict[str, Any]], offsets: np.ndarray, scales: np.ndarray,
                    scene_ids: np.ndarray) -> list[dict[str, Any]]:
    """Oriented patch rows in scene pixels, thinned class by class and scene by scene with rotated
    NMS at the devkit's ResultMerge threshold (`dota_task1.MERGE_IOU_THRESHOLD`)."""
    from ds2d2_cli.dota_task1 import MERGE_IOU_THRESHOLD
    from ds2d2_cli.data.tiling import rotated_merge_order
    from ds2d2_cli.rotated import rbox_envelope

    rboxes = torch.tensor([r["rbox"] for r in results], dtype=torch.float64)
    rboxes[:, :2] = (rboxes[:, :2] + torch.from_numpy(offsets)) / torch.from_numpy(scales)[:, None]
    rboxes[:, 2:4] = rboxes[:, 2:4] / torch.from_numpy(scales)[:, None]
    scores = torch.tensor([r["score"] for r in results], dtype=torch.float64)
    labels = torch.tensor([r["category_id"] for r in results], dtype=torch.int64)
    keep = rotated_merge_order(rboxes, scores, labels, MERGE_IOU_THRESHOLD,
                               scenes=torch.from_numpy(scene_ids.astype(np.int64))).tolist()
    envelopes = rbox_envelope(rboxes)
    merged = []
    for i in keep:
        x0, y0, x1, y1 = envelopes[i].tolist()
        merged.append({"image_id": int(scene_ids[i]), "category_id": int(labels[i]),
                       "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                       "rbox": rbox_row(rboxes[i].tolist()), "score": float(scores[i])})
    return merged


def evaluate_on_split(model: nn.Module, split: CocoSplit, device: torch.device, *, input_cfg: InputConfig,
                      batch_size: int = 8, merge_patches: bool = False, reporter: Reporter | None = None,
                      num_workers: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO metrics (+ images/s) of `model` on `split`, and the result rows they came from.

    `input_cfg` is the model's input (the run's, or its checkpoint's): the split's pixels
    become floats as the model was trained on them.
    `merge_patches`: DOTA-style patch detections merged back into their scenes and scored
    against the scene annotations `prepare-data` writes beside the split."""
    from ds2d2_cli.models.families import is_oriented

    oriented = is_oriented(model)
    dataset = DetectionDataset(split, input_cfg)
    results, images_per_s = predict(model, dataset, device, batch_size, num_workers, reporter)
    if merge_patches:
        scenes_path = split.path.with_name(f"{split.path.stem}{SCENES_SUFFIX}.json")
        if not scenes_path.is_file():
            raise InputError("--merge-patches needs the scene annotations prepare-data writes", scenes_path)
        results = merge_patch_results(split, results)
        gt = load_coco_json(scenes_path)
    else:
        gt = {"images": split.images, "categories": split.categories,
              "annotations": [a for anns in split.annotations_by_image.values() for a in anns]}
    metrics = oriented_metrics(gt, results) if oriented else coco_metrics(gt, results)
    metrics["images_per_s"] = round(images_per_s, 3)
    metrics["images"] = len(dataset)
    return metrics, results
