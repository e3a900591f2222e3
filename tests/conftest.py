"""Shared fixtures: one tiny synthetic dataset per test session, prepared like a user would."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

# Tiny models for CPU tests: everything the presets say except size and schedule.
TINY = [
    "teacher_train=null", "amplifier_train=null",  # one schedule (`train`) for every stage
    "input.size=128",
    "teacher.backbone=resnet18", "teacher.fpn_channels=32",
    "student.backbone=resnet18", "student.fpn_channels=16",
    "train.batch_size=2", "train.warmup_iters=2", "train.log_every=1",
    "train.checkpoint_every=2", "train.eval_every=2", "train.num_workers=0",
]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """`module_tmp(name)`: a folder shared by one test module and removed when the module ends.

    Training runs take tens of megabytes each; removing them module by module keeps the
    suite's disk use to one module's worth (pytest would keep them for the whole session).
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """6 synthetic 256 px scenes -> one 256 px patch each: 4 train, 2 val images."""
    from ds2d2_cli.data.dota import prepare_dota
    from ds2d2_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root / "synthetic", images=6, size=256, seed=3, val_fraction=0.34)
    prepare_dota(root / "synthetic", root / "synthetic-256", size=256, gap=64, classes="synthetic")
    return root / "synthetic-256"
