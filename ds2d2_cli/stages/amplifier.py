"""`train-amplifier`: the high-frequency knowledge amplifier of a trained teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ds2d2_cli.checkpoint import CheckpointMeta
from ds2d2_cli.config import RunConfig
from ds2d2_cli.models.amplifier import amplifier_head, amplify, trained_state_dict
from ds2d2_cli.models.detectors import model_from_checkpoint
from ds2d2_cli.models.families import family_of
from ds2d2_cli.models.families._base import AmplifierRPN
from ds2d2_cli.progress import Reporter
from ds2d2_cli.stages.common import load_stage_data, load_teacher, seed_everything
from ds2d2_cli.stages.runner import StageResult, prepare_stage, run_stage


class AmplifierTask:
    """The teacher's detection loss with only the amplifier's parts (head, maybe RPN) trainable."""

    def __init__(self, model: nn.Module, rpn: AmplifierRPN):
        self.module = model
        self.family = family_of(model)
        self.rpn = rpn
        self.untrained = set(self.family.amplifier_untrained_losses(rpn))

    def losses(self, images, targets):
        terms = self.module(images, targets)
        return {k: v for k, v in terms.items() if k not in self.untrained}

    def train_mode(self) -> None:
        self.module.train()
        for module in self.family.amplifier_frozen_modules(self.module, self.rpn):
            module.eval()  # frozen: BN statistics must not drift either


def train_amplifier(
    config: RunConfig,
    *,
    teacher: Path,
    out: Path,
    data_dir: Path | None = None,
    preset: str = "",
    device: torch.device | str = "cpu",
    resume: bool = False,
    reporter: Reporter | None = None,
) -> StageResult:
    device = torch.device(device)
    data = load_stage_data(config, data_dir)
    config = data.config  # classes resolved: the run records the list
    teacher_ckpt = load_teacher(teacher, config, data.classes, data.train.path)
    prepare_stage(config, out, resume)
    seed_everything(config.schedule("amplifier").seed)
    model = model_from_checkpoint(teacher_ckpt, device)
    parts = amplify(model, amplifier_head(model), config.distill.wavelet, rpn=config.distill.amplifier_rpn)
    model = model.to(device)

    def meta(metrics):
        return CheckpointMeta(
            stage="amplifier", model=teacher_ckpt.meta.model, classes=list(data.classes), input=config.input,
            preset=preset, config=config.model_dump(mode="json"), metrics=metrics,
            teacher_sha256=teacher_ckpt.sha256,
        )

    return run_stage(
        task=AmplifierTask(model, config.distill.amplifier_rpn), scored=model,
        weights=lambda: trained_state_dict(parts), meta=meta,
        config=config, data=data, out=out, stage="amplifier", device=device, resume=resume, reporter=reporter,
        extra_summary={"teacher": str(teacher), "teacher_sha256": teacher_ckpt.sha256,
                       "wavelet": config.distill.wavelet, "trained": sorted(p.rstrip(".") for p in parts),
                       "note": "metrics are the teacher detector with its head reading high-frequency features"},
    )
