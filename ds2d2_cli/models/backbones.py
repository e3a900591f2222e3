"""Backbone bodies and their FPN, as method.md configures them (torchvision parts, not re-written).

Each detector family (`models/families/`) says which of the four stages C2..C5 (strides
4..32) feed its FPN and how the pyramid is extended; everything else about the backbone
is shared: normalisation (frozen BN over pretrained weights, trainable BN from scratch),
ImageNet weights from torchvision or a local file, and which stages train.

Besides the paper's ResNets (and the ResNeXt-101 64x4d of the authors' strong-teacher
configs, the same stages with grouped 3x3 convolutions), the students people deploy (MobileNetV3-Large,
EfficientNet-B0, RegNetY-400MF, ConvNeXt-Tiny) are torchvision models whose feature stages
at strides 4, 8, 16 and 32 play C2..C5: the FPN, heads and distillation are unchanged, so
any of them can learn from a ResNet teacher.

Bands: the body reads the input's bands (`InputConfig.resolved.bands`). With the three
bands red, green, blue in that order every body is torchvision's own, untouched. Any other
band list changes only the body's first convolution: from scratch it is a new convolution
with one input channel per band, initialised as torchvision initialises that body; over
ImageNet or local weights its RGB filters are spread over the bands by
`inflate_first_conv` (`ModelConfig.band_init`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ds2d2_cli.config import BandInit, ModelConfig
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.sample import RGB

RESNET_C_CHANNELS = {  # output channels of layer1..layer4
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnext101_32x8d": (256, 512, 1024, 2048),
    "resnext101_64x4d": (256, 512, 1024, 2048),  # the authors' strong teacher (64 groups of width 4)
}


# Other torchvision bodies: the children that end C2..C5 (strides 4, 8, 16, 32), their
# channels, and the children before C2 (the stem). RegNet's stem and trunk blocks are
# flattened into one sequence.
STAGES = {
    "mobilenet_v3_large": (("3", "6", "12", "16"), (24, 40, 112, 960), 1),
    "efficientnet_b0": (("2", "3", "5", "7"), (24, 40, 112, 320), 1),
    "regnet_y_400mf": (("block1", "block2", "block3", "block4"), (48, 104, 208, 440), 1),
    "convnext_tiny": (("1", "3", "5", "7"), (96, 192, 384, 768), 1),
}
BACKBONES = (*RESNET_C_CHANNELS, *STAGES)

# The convolution each classification model reads its image with (a state-dict prefix).
FIRST_CONV = {**{name: "conv1" for name in RESNET_C_CHANNELS}, "mobilenet_v3_large": "features.0.0",
              "efficientnet_b0": "features.0.0", "regnet_y_400mf": "stem.0", "convnext_tiny": "features.0.0"}


def stage_channels(backbone: str) -> tuple[int, ...]:
    """Output channels of C2..C5."""
    return RESNET_C_CHANNELS[backbone] if backbone in RESNET_C_CHANNELS else STAGES[backbone][1]


def has_pretrained(cfg: ModelConfig) -> bool:
    return cfg.pretrained or cfg.backbone_weights is not None


def resolved_norm(cfg: ModelConfig) -> str:
    """`auto` made concrete: frozen BN over pretrained weights (reference setting), BN from scratch."""
    if cfg.norm != "auto":
        return cfg.norm
    return "frozen_bn" if has_pretrained(cfg) else "bn"


class EvalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that always normalises with its running statistics and never updates them,
    while its scale and shift train like any parameter: MMDetection's `norm_eval=True` with
    `requires_grad=True` (the authors' backbones), where FrozenBatchNorm2d freezes all four."""

    def train(self, mode: bool = True) -> "EvalBatchNorm2d":
        return super().train(False)


def _norm_layer(cfg: ModelConfig):
    return {"frozen_bn": misc_nn_ops.FrozenBatchNorm2d, "bn_eval": EvalBatchNorm2d}.get(resolved_norm(cfg),
                                                                                       nn.BatchNorm2d)


def inflate_first_conv(weight: torch.Tensor, bands: Sequence[str], band_init: BandInit = "rgb") -> torch.Tensor:
    """RGB filters `[O, 3, k, k]` (red, green, blue) spread over `bands`: `[O, len(bands), k, k]`.

    With m = (W_red + W_green + W_blue) / 3 the mean RGB filter and N = len(bands):

    * ``mean`` (timm's `adapt_input_conv`): every band gets m * 3/N (N = 1: the sum of the
      RGB filters), so the filters still sum to W_red + W_green + W_blue;
    * ``rgb``: bands named red, green and blue keep their own filters, each other band gets
      e = m * 3/N, and each RGB filter gives up (N - 3) * e / 3, the extra bands' share. An
      image whose extra bands all equal the mean of its red, green and blue bands then gives
      exactly the RGB convolution's output. Without all three of red, green and blue it is
      ``mean``.
    """
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB filters [O, 3, k, k], got {tuple(weight.shape)}")
    n = len(bands)
    share = weight.mean(dim=1, keepdim=True) * (3.0 / n)
    inflated = share.repeat(1, n, 1, 1)
    if band_init == "rgb" and all(name in bands for name in RGB):
        own = weight - share * ((n - 3) / 3.0)
        for i, name in enumerate(RGB):
            inflated[:, list(bands).index(name)] = own[:, i]
    return inflated


def _first_conv(body: nn.Module, backbone: str) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent module, attribute name, convolution) of the body's first convolution."""
    parent_name, _, child = FIRST_CONV[backbone].rpartition(".")
    parent = body.get_submodule(parent_name)
    return parent, child, getattr(parent, child)


def _initialise_first_conv(conv: nn.Conv2d, backbone: str) -> None:
    """The init torchvision gives this body's convolutions (ConvNeXt: truncated normal; the
    others: Kaiming normal, fan out, ReLU gain, which RegNet writes as N(0, 2 / fan_out))."""
    if backbone.startswith("convnext"):
        nn.init.trunc_normal_(conv.weight, std=0.02)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _filters_for_bands(weight: torch.Tensor, bands: Sequence[str], band_init: BandInit) -> torch.Tensor:
    """Pretrained RGB filters for `bands`: inflated (`inflate_first_conv`) to any other number
    of bands; three bands keep them, reordered when the bands are red, green, blue in another
    order (three other bands are read by the RGB filters as they are, the usual false-colour
    practice)."""
    if len(bands) != 3:
        return inflate_first_conv(weight, bands, band_init)
    if set(bands) == set(RGB):
        return weight[:, [RGB.index(name) for name in bands]]
    return weight


def _adapt_first_conv(body: nn.Module, cfg: ModelConfig, bands: Sequence[str]) -> None:
    """The body's first convolution made to read `bands` (see the module docstring).

    Red, green, blue in that order leave the body as torchvision built it (no module, no
    random draw more: RGB runs stay bit-identical); so do three bands from scratch."""
    if tuple(bands) == RGB:
        return
    parent, child, conv = _first_conv(body, cfg.backbone)
    imagenet = cfg.pretrained and cfg.backbone_weights is None
    if len(bands) == conv.in_channels:
        if imagenet:
            with torch.no_grad():
                conv.weight.copy_(_filters_for_bands(conv.weight, bands, cfg.band_init))
        return
    new = nn.Conv2d(len(bands), conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    with torch.no_grad():
        if imagenet:
            new.weight.copy_(inflate_first_conv(conv.weight, bands, cfg.band_init))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        else:  # from scratch, or a local file's weights are loaded next
            _initialise_first_conv(new, cfg.backbone)
    setattr(parent, child, new)


def _load_local_weights(body: nn.Module, path: Path, backbone: str, bands: Sequence[str],
                        band_init: BandInit) -> None:
    """A torchvision state_dict file into `body`. Its first convolution's three input channels
    are read as red, green, blue and fitted to `bands` (`_filters_for_bands`); a file with as
    many channels as `bands` (other than three) is taken as it is."""
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
    key = f"{FIRST_CONV[backbone]}.weight"
    if tuple(bands) != RGB and isinstance(state, dict) and isinstance(state.get(key), torch.Tensor) \
            and state[key].dim() == 4 and state[key].shape[1] == 3:
        state = {**state, key: _filters_for_bands(state[key].float(), bands, band_init).to(state[key].dtype)}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise InputError(f"backbone weights do not fit this backbone ({detail})", path) from None
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing:
        raise InputError(
            f"backbone weights do not fit this backbone ({len(missing)} missing, e.g. {missing[0]})", path
        )
    del unexpected  # classifier heads and extra keys are fine to ignore


def build_resnet_body(cfg: ModelConfig, bands: Sequence[str] = RGB) -> nn.Module:
    """The whole torchvision classification model of `cfg.backbone` (ResNet or not) reading
    `bands`, with its ImageNet or local weights; `build_fpn_backbone` takes the stages it needs."""
    if cfg.backbone not in BACKBONES:
        raise InputError(f"unsupported backbone {cfg.backbone!r}; available: {', '.join(BACKBONES)}")
    weights = "DEFAULT" if cfg.pretrained and cfg.backbone_weights is None else None
    # ConvNeXt normalises with LayerNorm: there is no batch norm to freeze or train.
    norm = {} if cfg.backbone.startswith("convnext") else {"norm_layer": _norm_layer(cfg)}
    try:
        body = torchvision.models.get_model(cfg.backbone, weights=weights, **norm)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise Ds2d2Error(
            f"cannot get ImageNet weights for {cfg.backbone} ({exc}); when offline, pass "
            "--backbone-weights PATH (a torchvision state_dict file) or train from scratch with "
            "--set teacher.pretrained=false / student.pretrained=false"
        ) from None
    _adapt_first_conv(body, cfg, bands)
    if cfg.backbone_weights is not None:
        _load_local_weights(body, Path(cfg.backbone_weights), cfg.backbone, bands, cfg.band_init)
    return body


def build_fpn_backbone(cfg: ModelConfig, returned: Sequence[int],
                       extra_blocks: Callable[[tuple[int, ...]], ExtraFPNBlock],
                       bands: Sequence[str] = RGB) -> BackboneWithFPN:
    """The ResNet of `cfg`, reading `bands`, with an FPN over its layers `returned` (1..4 = C2..C5).

    `extra_blocks(stage_channels)` builds the pyramid's extension; it is called after the
    body and before the FPN, so parameters are initialised in one fixed order (seeded runs
    stay bit-identical)."""
    if cfg.backbone in STAGES:
        return _stages_with_fpn(cfg, returned, extra_blocks, bands)
    body = build_resnet_body(cfg, bands)
    # Freezing randomly initialised layers makes no sense: train everything from scratch.
    trainable = cfg.trainable_layers if has_pretrained(cfg) else 5
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    channels = RESNET_C_CHANNELS[cfg.backbone]
    extra = extra_blocks(channels)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    in_channels = [channels[k - 1] for k in returned]
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


def _stages_with_fpn(cfg: ModelConfig, returned: Sequence[int],
                     extra_blocks: Callable[[tuple[int, ...]], ExtraFPNBlock],
                     bands: Sequence[str] = RGB) -> BackboneWithFPN:
    """A non-ResNet torchvision body as C2..C5 (see STAGES) with the same FPN and freezing rule:
    the top `trainable_layers` of (C5, C4, C3, C2, stem) train when pretrained, all from scratch."""
    model = build_resnet_body(cfg, bands)
    ends, channels, stem_children = STAGES[cfg.backbone]
    if cfg.backbone.startswith("regnet"):
        body = nn.Sequential(OrderedDict([("stem", model.stem), *model.trunk_output.named_children()]))
    else:
        body = model.features
    names = [name for name, _ in body.named_children()]
    last = names.index(ends[-1])
    groups: list[list[str]] = [names[:stem_children]]  # stem, C2, C3, C4, C5
    start = stem_children
    for end in ends:
        stop = names.index(end) + 1
        groups.append(names[start:stop])
        start = stop
    trainable = cfg.trainable_layers if has_pretrained(cfg) else 5
    frozen = {name for group in groups[:5 - trainable] for name in group}
    for name, child in body.named_children():
        if name in frozen or names.index(name) > last:
            for parameter in child.parameters():
                parameter.requires_grad_(False)
    extra = extra_blocks(channels)
    return_layers = {ends[k - 1]: str(i) for i, k in enumerate(returned)}
    in_channels = [channels[k - 1] for k in returned]
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)
