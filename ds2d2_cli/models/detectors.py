"""Detectors as method.md configures them, assembled from torchvision parts (not re-written).

- RetinaNet: FPN on C3-C5 with P6/P7 computed from C5, 3 scales x 3 ratios of anchors per
  level (size = anchor_base x stride x 2^(i/3), strides 8-128), focal loss, L1 box loss.
- Faster R-CNN: FPN P2-P6, RPN with 3 ratios and one size per level, RoIAlign 7x7, 2-FC head.

Class ids are the prepared data's category ids 1..K; index 0 is background (Faster
R-CNN) or an unused slot (RetinaNet), so both heads have K + 1 outputs.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ds2d2_cli.config import InputConfig, ModelConfig
from ds2d2_cli.errors import Ds2d2Error, InputError

RESNET_C_CHANNELS = {  # output channels of layer1..layer4
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnext101_32x8d": (256, 512, 1024, 2048),
}
RETINANET_STRIDES = (8, 16, 32, 64, 128)


def _has_pretrained(cfg: ModelConfig) -> bool:
    return cfg.pretrained or cfg.backbone_weights is not None


def resolved_norm(cfg: ModelConfig) -> str:
    """`auto` made concrete: frozen BN over pretrained weights (reference setting), BN from scratch."""
    if cfg.norm != "auto":
        return cfg.norm
    return "frozen_bn" if _has_pretrained(cfg) else "bn"


def _norm_layer(cfg: ModelConfig):
    return misc_nn_ops.FrozenBatchNorm2d if resolved_norm(cfg) == "frozen_bn" else nn.BatchNorm2d


def rebuild_config(cfg: ModelConfig) -> ModelConfig:
    """The same architecture without fetching initial weights (a checkpoint supplies them)."""
    return cfg.model_copy(update={"pretrained": False, "backbone_weights": None, "norm": resolved_norm(cfg)})


def _load_local_weights(body: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise InputError("backbone weights file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"cannot read backbone weights: {exc}", path) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise InputError(f"backbone weights do not fit this backbone ({detail})", path) from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise InputError(
            f"backbone weights do not fit this backbone ({len(missing)} missing, e.g. {missing[0]})", path
        )
    del unexpected  # classifier heads and extra keys are fine to ignore


def build_resnet_body(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone not in RESNET_C_CHANNELS:
        raise InputError(f"unsupported backbone {cfg.backbone!r}; available: {', '.join(RESNET_C_CHANNELS)}")
    weights = "DEFAULT" if cfg.pretrained and cfg.backbone_weights is None else None
    try:
        body = torchvision.models.get_model(cfg.backbone, weights=weights, norm_layer=_norm_layer(cfg))
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise Ds2d2Error(
            f"cannot get ImageNet weights for {cfg.backbone} ({exc}); when offline, pass "
            "--backbone-weights PATH (a torchvision state_dict file) or train from scratch with "
            "--set teacher.pretrained=false / student.pretrained=false"
        ) from None
    if cfg.backbone_weights is not None:
        _load_local_weights(body, Path(cfg.backbone_weights))
    return body


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    body = build_resnet_body(cfg)
    # Freezing randomly initialised layers makes no sense: train everything from scratch.
    trainable = cfg.trainable_layers if _has_pretrained(cfg) else 5
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    channels = RESNET_C_CHANNELS[cfg.backbone]
    if cfg.detector == "retinanet":
        returned = [2, 3, 4]
        # P6/P7 from C5 (LastLevelP6P7 switches to P5 only if C5 already has FPN width).
        extra = LastLevelP6P7(channels[3], cfg.fpn_channels)
    else:
        returned = [1, 2, 3, 4]
        extra = LastLevelMaxPool()
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    in_channels = [channels[k - 1] for k in returned]
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


def retinanet_anchor_sizes(anchor_base: float) -> tuple[tuple[int, ...], ...]:
    return tuple(
        tuple(max(1, round(anchor_base * s * 2 ** (i / 3))) for i in range(3)) for s in RETINANET_STRIDES
    )


def build_detector(cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
    """A torchvision RetinaNet or Faster R-CNN for `num_classes` foreground classes."""
    backbone = build_backbone(cfg)
    common = dict(
        min_size=input_cfg.size, max_size=input_cfg.size,
        image_mean=list(input_cfg.mean), image_std=list(input_cfg.std),
    )
    if cfg.detector == "retinanet":
        sizes = retinanet_anchor_sizes(cfg.anchor_base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        norm = None
        if cfg.head_norm == "group":
            # up to 32 groups, at least 2 channels each: P7 of a small input is 1x1, and a
            # one-value group would normalise to a constant (and breaks the ONNX export)
            groups = math.gcd(32, max(1, cfg.fpn_channels // 2))
            norm = functools.partial(nn.GroupNorm, groups)
        num_anchors = anchors.num_anchors_per_location()[0]
        head = RetinaNetHead(cfg.fpn_channels, num_anchors, num_classes + 1, norm_layer=norm)
        with torch.no_grad():  # slot 0 is no class: start it far below the score threshold
            head.classification_head.cls_logits.bias.view(num_anchors, num_classes + 1)[:, 0] = -20.0
        return RetinaNet(
            backbone, num_classes + 1, anchor_generator=anchors, head=head, score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img, **common,
        )
    sizes = tuple((s,) for s in cfg.rpn_anchor_sizes)
    if len(sizes) != 5:
        raise InputError("faster_rcnn needs 5 rpn_anchor_sizes, one per FPN level P2-P6")
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return FasterRCNN(
        backbone, num_classes + 1, rpn_anchor_generator=anchors, box_score_thresh=cfg.score_thresh,
        box_detections_per_img=cfg.detections_per_img, **common,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def feature_list(features: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(features.values()) if isinstance(features, dict) else list(features)
