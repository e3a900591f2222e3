"""`train-teacher`: a plain detector trained on the prepared data (also the undistilled student)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from ds2d2_cli.checkpoint import meta_for
from ds2d2_cli.config import RunConfig
from ds2d2_cli.models.detectors import build_detector
from ds2d2_cli.progress import Reporter
from ds2d2_cli.stages.common import load_stage_data, seed_everything
from ds2d2_cli.stages.runner import StageResult, prepare_stage, run_stage
from ds2d2_cli.tasks import DetectorTask


def train_detector(
    config: RunConfig,
    *,
    role: Literal["teacher", "student"],
    out: Path,
    data_dir: Path | None = None,
    preset: str = "",
    device: torch.device | str = "cpu",
    resume: bool = False,
    reporter: Reporter | None = None,
) -> StageResult:
    """Train `config.teacher` (stage teacher) or `config.student` without distillation (stage student)."""
    device = torch.device(device)
    stage = "teacher" if role == "teacher" else "student"
    data = load_stage_data(config, data_dir)
    config = data.config  # classes resolved: the run records the list
    prepare_stage(config, out, resume)
    seed_everything(config.schedule(stage).seed)
    model = build_detector(getattr(config, role), len(data.classes), config.input).to(device)
    extra = {} if role == "teacher" else {"method": "none"}
    return run_stage(
        task=DetectorTask(model), scored=model, weights=model.state_dict,
        meta=lambda metrics: meta_for(stage, config, role, data.classes, preset, metrics=metrics, **extra),
        config=config, data=data, out=out, stage=stage, device=device, resume=resume, reporter=reporter,
        extra_summary={"detector": getattr(config, role).detector, "backbone": getattr(config, role).backbone},
    )


def train_teacher(config: RunConfig, **kwargs) -> StageResult:
    return train_detector(config, role="teacher", **kwargs)
