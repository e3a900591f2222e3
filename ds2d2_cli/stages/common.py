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
from ds2d2_cli.classes import AUTO, check_class_list
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
    config: RunConfig  # data.classes resolved to `classes`: what the run records and later runs compare


def load_split(root: Path, split: str, expected_classes: list[str] | None = None) -> CocoSplit:
    """A prepared split; with `expected_classes` (the training split's) its categories must be those."""
    coco = load_coco_split(split_json_path(root, split))
    if expected_classes is not None and coco.class_names != list(expected_classes):
        raise InputError(
            f"the split's classes ({', '.join(coco.class_names)}) are not the training split's "
            f"({', '.join(expected_classes)}); prepare both splits with the same classes", coco.path,
        )
    return coco


def stage_classes(config: RunConfig, train: CocoSplit) -> list[str]:
    """`data.classes` resolved against the training split: `auto` takes its categories (in id
    order); a set or list must be exactly them, in that order."""
    wanted = config.data.class_names
    if wanted is None:
        try:
            return list(check_class_list(train.class_names, "the split"))
        except InputError as exc:
            raise InputError(exc.message, train.path) from None
    if train.class_names != list(wanted):
        chosen = (f"{config.data.classes} ({', '.join(wanted)})" if isinstance(config.data.classes, str)
                  else f"[{', '.join(wanted)}]")
        raise InputError(
            f"the split's classes ({', '.join(train.class_names)}) are not data.classes {chosen}; "
            f"to train on the data's own classes use --set data.classes={AUTO}", train.path,
        )
    return list(wanted)


def check_same_sample(split: CocoSplit, train: CocoSplit) -> None:
    """A split scored with a model trained on `train` must store its pixels the same way."""
    if split.sample.reading() != train.sample.reading():
        raise InputError(
            f"the split's images are {split.sample.describe()}, the training split's {train.sample.describe()}; "
            "prepare both splits from the same kind of imagery", split.path,
        )


def resolve_classes(config: RunConfig) -> RunConfig:
    """`config` with `data.classes` the explicit list it stands for (`auto`: the training
    split's categories) and its input resolved on the training split's sample, so a re-run
    compares with what a run recorded; checks nothing else."""
    names = config.data.class_names
    train = None
    if names is None:
        train = load_split(Path(config.data.root), config.data.train_split)
        names = tuple(train.class_names)
    elif config.input.sample is None:
        try:
            train = load_split(Path(config.data.root), config.data.train_split)
        except InputError:
            pass  # no data yet (the demo checks its stages first): the input compares as 8-bit RGB
    if train is not None and config.input.sample is None:
        config = with_input(config, train)
    return config.with_classes(names)


def with_input(config: RunConfig, train: CocoSplit) -> RunConfig:
    """`config` with `input` resolved on the training split's sample spec (bands, scaling, statistics)."""
    return config.model_copy(update={"input": config.input.resolve(train.sample, train.path)})


def with_data_root(config: RunConfig, data_dir: Path | None) -> RunConfig:
    """Record the data folder a run actually used, so `eval` of its checkpoint finds it."""
    if data_dir is None:
        return config
    data = config.data.model_copy(update={"root": Path(data_dir).resolve()})
    return config.model_copy(update={"data": data})


def load_stage_data(config: RunConfig, data_dir: Path | None = None) -> StageData:
    """The splits a stage trains and scores on, and `config` with its classes resolved on them."""
    config = with_data_root(config, data_dir)
    root = Path(config.data.root)
    train = load_split(root, config.data.train_split)
    classes = stage_classes(config, train)
    config = with_input(config, train)
    eval_split = None
    if (root / f"{config.data.eval_split}.json").is_file():
        eval_split = load_split(root, config.data.eval_split, classes)
        check_same_sample(eval_split, train)
        if not any(eval_split.annotations_by_image.values()):
            eval_split = None  # an image-only split (DOTA test) cannot be scored
    return StageData(root, train, eval_split, classes, config.with_classes(classes))


def load_teacher(path: Path, config: RunConfig, classes: list[str], data_path: Path) -> Checkpoint:
    """The `--teacher` checkpoint, checked against the data's classes and the preset's student and input."""
    checkpoint = load_checkpoint(path, "teacher", option="--teacher")
    check_classes(checkpoint, classes, data_path)
    if checkpoint.meta.model.detector != config.student.detector:
        raise InputError(
            f"the teacher is a {checkpoint.meta.model.detector}, the preset's student a {config.student.detector}; "
            "teacher and student must be the same detector family", path,
        )
    if checkpoint.meta.input.comparable() != config.input.comparable():
        raise InputError(
            f"the teacher was trained at input {checkpoint.meta.input.size} px with its own normalisation; "
            f"the preset says {config.input.size} px (use the teacher's preset or --set input...)", path,
        )
    return checkpoint


# The model settings that decide a detector's weights (names and shapes), compared for --init-student.
ARCHITECTURE = ("detector", "backbone", "fpn_channels", "head_norm")


def load_init_student(path: Path, config: RunConfig, classes: list[str], data_path: Path) -> Checkpoint:
    """The `--init-student` checkpoint: a student of the same model, classes and input as the run's
    student, so its detector weights can start this one (progressive distillation, TAKD)."""
    checkpoint = load_checkpoint(path, "student", option="--init-student")
    check_classes(checkpoint, classes, data_path)
    stored, wanted = checkpoint.meta.model, config.student
    differ = [f"{name} {getattr(stored, name)} (the run's student: {getattr(wanted, name)})"
              for name in ARCHITECTURE if getattr(stored, name) != getattr(wanted, name)]
    if differ:
        raise InputError(f"--init-student is another model than the run's student: {'; '.join(differ)}", path)
    if checkpoint.meta.input.comparable() != config.input.comparable():
        raise InputError(f"--init-student was trained at input {checkpoint.meta.input.size} px with its own "
                         f"normalisation or bands; the run's student reads {config.input.size} px "
                         "(use that student's preset or --set input...)", path)
    return checkpoint


def check_weights_fit(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path,
                      option: str) -> None:
    """Refuse weights that would not load strictly into a model of `expected`'s state dict
    (e.g. another norm setting: frozen batch norm has no `num_batches_tracked`)."""
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    shaped = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shaped:
        parts = []
        if shaped:
            k = shaped[0]
            parts.append(f"{len(shaped)} of another shape (first {k}: {list(tensors[k].shape)}, the run's "
                         f"student {list(expected[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} the run's student lacks (first {extra[0]})")
        raise InputError(f"{option}: its weights do not fit the run's student: {'; '.join(parts)}", path)
