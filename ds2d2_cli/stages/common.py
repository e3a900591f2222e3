"""What every training/eval stage needs: data splits checked against the config, seeding,
models rebuilt from checkpoints, and evaluation of a model on a split."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ds2d2_cli.checkpoint import Checkpoint, check_classes, load_checkpoint
from ds2d2_cli.classes import get_class_set
from ds2d2_cli.config import RunConfig
from ds2d2_cli.data.dataset import CocoSplit, DetectionDataset, load_coco_split, split_json_path
from ds2d2_cli.data.dota import SCENES_SUFFIX
from ds2d2_cli.errors import InputError
from ds2d2_cli.evaluation import coco_metrics, merge_patch_results, predict
from ds2d2_cli.models.detectors import build_detector, rebuild_config
from ds2d2_cli.progress import Reporter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StageData:
    root: Path
    train: CocoSplit
    eval: CocoSplit | None
    classes: list[str]


def load_split(root: Path, split: str, expected_classes: list[str] | None = None) -> CocoSplit:
    coco = load_coco_split(split_json_path(root, split))
    if expected_classes is not None and coco.class_names != list(expected_classes):
        raise InputError(
            f"the split's classes ({', '.join(coco.class_names)}) are not the preset's "
            f"({', '.join(expected_classes)})", coco.path,
        )
    return coco


def with_data_root(config: RunConfig, data_dir: Path | None) -> RunConfig:
    """Record the data folder a run actually used, so `eval` of its checkpoint finds it."""
    if data_dir is None:
        return config
    data = config.data.model_copy(update={"root": Path(data_dir).resolve()})
    return config.model_copy(update={"data": data})


def load_stage_data(config: RunConfig, data_dir: Path | None = None) -> StageData:
    root = Path(data_dir) if data_dir is not None else Path(config.data.root)
    classes = list(get_class_set(config.data.classes))
    train = load_split(root, config.data.train_split, classes)
    eval_split = None
    if (root / f"{config.data.eval_split}.json").is_file():
        eval_split = load_split(root, config.data.eval_split, classes)
        if not any(eval_split.annotations_by_image.values()):
            eval_split = None  # an image-only split (DOTA test) cannot be scored
    return StageData(root, train, eval_split, classes)


def model_from_checkpoint(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    meta = checkpoint.meta
    model = build_detector(rebuild_config(meta.model), len(meta.classes), meta.input)
    try:
        model.load_state_dict(checkpoint.tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"weights do not fit the model the metadata describes ({first})", checkpoint.path) from None
    return model.to(device).eval()


def evaluate_on_split(model: nn.Module, split: CocoSplit, device: torch.device, *, batch_size: int = 8,
                      merge_patches: bool = False, reporter: Reporter | None = None,
                      num_workers: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO metrics (+ images/s) of `model` on `split`, and the result rows they came from."""
    dataset = DetectionDataset(split)
    results, images_per_s = predict(model, dataset, device, batch_size, num_workers, reporter)
    if merge_patches:
        scenes_path = split.path.with_name(f"{split.path.stem}{SCENES_SUFFIX}.json")
        if not scenes_path.is_file():
            raise InputError("--merge-patches needs the scene annotations prepare-data writes", scenes_path)
        from ds2d2_cli.evaluation import load_coco_json

        results = merge_patch_results(split, results)
        gt = load_coco_json(scenes_path)
    else:
        gt = {"images": split.images, "categories": split.categories,
              "annotations": [a for anns in split.annotations_by_image.values() for a in anns]}
    metrics = coco_metrics(gt, results)
    metrics["images_per_s"] = round(images_per_s, 3)
    metrics["images"] = len(dataset)
    return metrics, results


def load_teacher(path: Path, config: RunConfig, classes: list[str], data_path: Path) -> Checkpoint:
    """The `--teacher` checkpoint, checked against the data's classes and the preset's student and input."""
    checkpoint = load_checkpoint(path, "teacher", option="--teacher")
    check_classes(checkpoint, classes, data_path)
    if checkpoint.meta.model.detector != config.student.detector:
        raise InputError(
            f"the teacher is a {checkpoint.meta.model.detector}, the preset's student a {config.student.detector}; "
            "teacher and student must be the same detector family", path,
        )
    if checkpoint.meta.input != config.input:
        raise InputError(
            f"the teacher was trained at input {checkpoint.meta.input.size} px with its own normalisation; "
            f"the preset says {config.input.size} px (use the teacher's preset or --set input...)", path,
        )
    return checkpoint
