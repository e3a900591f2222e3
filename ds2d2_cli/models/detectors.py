"""Detectors as method.md configures them: built by their family, rebuilt from checkpoints.

Class ids are the prepared data's category ids 1..K; index 0 is background (Faster
R-CNN) or an unused slot (RetinaNet), so both heads have K + 1 outputs. Each family
(`models/families/`) owns its architecture; this module is the one door to them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ds2d2_cli.checkpoint import Checkpoint
from ds2d2_cli.config import InputConfig, ModelConfig
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.backbones import build_resnet_body, resolved_norm
from ds2d2_cli.models.families import get_family
from ds2d2_cli.models.families.retinanet import anchor_sizes as retinanet_anchor_sizes

__all__ = ["build_detector", "build_resnet_body", "checkpoint_parameter_count", "count_parameters",
           "model_from_checkpoint", "rebuild_config", "resolved_norm", "retinanet_anchor_sizes"]


def rebuild_config(cfg: ModelConfig) -> ModelConfig:
    """The same architecture without fetching initial weights (a checkpoint supplies them)."""
    return cfg.model_copy(update={"pretrained": False, "backbone_weights": None, "norm": resolved_norm(cfg)})


def build_detector(cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
    """A torchvision detector of `cfg.detector`'s family for `num_classes` foreground classes."""
    return get_family(cfg.detector).build(cfg, num_classes, input_cfg)


def model_from_checkpoint(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    """The teacher or student detector a checkpoint describes, with its weights, in eval mode."""
    meta = checkpoint.meta
    model = build_detector(rebuild_config(meta.model), len(meta.classes), meta.input)
    try:
        model.load_state_dict(checkpoint.tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"weights do not fit the model the metadata describes ({first})", checkpoint.path) from None
    return model.to(device).eval()


def count_parameters(model: nn.Module) -> int:
    """`model.parameters()`: BatchNorm statistics (and FrozenBatchNorm) are buffers, not parameters."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_parameter_count(path: Path) -> int:
    """Parameters of the model a teacher/student checkpoint builds (a header count cannot tell
    frozen-BN buffers from parameters, so the model is built)."""
    from ds2d2_cli.checkpoint import load_checkpoint

    return count_parameters(model_from_checkpoint(load_checkpoint(path, ("teacher", "student"))))
