"""`eval`: score a checkpoint on a prepared split, or a COCO results file against annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ds2d2_cli import distributed
from ds2d2_cli.checkpoint import check_bands, check_classes, load_checkpoint
from ds2d2_cli.evaluation import evaluate_on_split, evaluate_results_file
from ds2d2_cli.fileio import write_json
from ds2d2_cli.progress import Reporter
from ds2d2_cli.models.detectors import model_from_checkpoint
from ds2d2_cli.stages.common import load_split


def evaluate_checkpoint(
    checkpoint_path: Path,
    *,
    data_dir: Path | None = None,
    split: str | None = None,
    device: torch.device | str = "cpu",
    merge_patches: bool = False,
    batch_size: int = 8,
    predictions_out: Path | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """COCO metrics of any stage's checkpoint; data and split default to the run's own config."""
    checkpoint = load_checkpoint(checkpoint_path, ("teacher", "student"), option="CKPT")
    config = checkpoint.run_config()
    if data_dir is None:
        if config is None:
            raise_missing = "this checkpoint records no data folder; pass --data"
            from ds2d2_cli.errors import InputError

            raise InputError(raise_missing, checkpoint_path)
        data_dir = Path(config.data.root)
    split = split or (config.data.eval_split if config is not None else "val")
    coco = load_split(Path(data_dir), split)
    check_classes(checkpoint, coco.class_names, coco.path)
    check_bands(checkpoint, coco.sample, coco.path)
    device = torch.device(device)
    model = model_from_checkpoint(checkpoint, device)
    metrics, results = evaluate_on_split(model, coco, device, input_cfg=checkpoint.meta.input,
                                         batch_size=batch_size, merge_patches=merge_patches, reporter=reporter)
    if predictions_out is not None and distributed.is_main():
        write_json(predictions_out, results)
    metrics.update({
        "checkpoint": str(checkpoint_path), "stage": checkpoint.meta.stage, "split": split,
        "data": str(data_dir), "merged_patches": merge_patches,
    })
    return metrics


def evaluate_predictions(predictions: Path, annotations: Path) -> dict[str, Any]:
    metrics = evaluate_results_file(Path(predictions), Path(annotations))
    metrics.update({"predictions": str(predictions), "annotations": str(annotations)})
    return metrics


def evaluate_task1_submission(results_dir: Path, labels_dir: Path, classes: str | list[str] = "dota-v1.0", *,
                              merge_patches: bool = False, merged_out: Path | None = None,
                              merge_iou: float | None = None) -> dict[str, Any]:
    """DOTA Task 1 mAP of `Task1_<class>.txt` files against a labelTxt folder, as the devkit scores them.

    `merge_patches`: the files hold patch detections; they are merged into scenes first (the
    devkit's ResultMerge) and, with `merged_out`, written there as the server wants them.
    """
    from ds2d2_cli import dota_task1
    from ds2d2_cli.classes import class_choice

    choice = class_choice(classes)
    detections = dota_task1.read_task1_submission(results_dir, choice.names)
    truth = dota_task1.read_task1_ground_truth(labels_dir, choice.names)
    if merge_patches:
        iou = dota_task1.MERGE_IOU_THRESHOLD if merge_iou is None else merge_iou
        detections = dota_task1.merge_scene_detections(detections, iou)
        if merged_out is not None:
            dota_task1.write_task1_files(merged_out, detections)
    score = dota_task1.score_task1(detections, truth.images, choice.names)
    metrics = score.as_dict()
    metrics.update({
        "results": str(results_dir), "labels": str(labels_dir), "classes": choice.label,
        "images": len(truth.images), "detections": sum(len(d) for d in detections.values()),
        "merged_patches": merge_patches, "ignored_objects": truth.ignored_objects,
    })
    if merge_patches:
        metrics["merge_iou"] = iou
        if merged_out is not None:
            metrics["merged_out"] = str(merged_out)
    if truth.ignored_example:
        metrics["ignored_example"] = truth.ignored_example
    return metrics
