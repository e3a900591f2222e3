"""What every training/eval stage needs: data splits checked against the config, seeding, and
the `--teacher` checkpoint checked against the run (models from checkpoints: models.detectors;
scoring a model on a split: evaluation.evaluate_on_split)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds2d2_cli.checkpoint import Checkpoint, check_classes, load_checkpoint
from ds2d2_cli.classes import get_class_set
from ds2d2_cli.config import RunConfig
from ds2d2_cli.data.dataset import CocoSplit, load_coco_split, split_json_path
from ds2d2_cli.errors import InputError


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
