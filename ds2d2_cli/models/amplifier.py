"""The high-frequency knowledge amplifier (method.md "Implicit stream").

An amplifier is a copy of the teacher's head that reads `high_frequency(features)`
instead of the features. Rather than re-implementing a detector around it, we wrap the
head so the teacher's own torchvision detector does the rest (anchors, matching,
losses, post-processing):

- RetinaNet: `HighFrequencyRetinaNetHead` replaces `model.head`.
- Faster R-CNN, `amplifier_rpn="high_frequency"` (the authors' amplifier: its feature
  extractor returns `HF(FPN features)`, and RPN and RoI head both train on them):
  `HighFrequencyFeatures` wraps the frozen backbone, and copies of the teacher's RPN and
  RoI heads train. Distillation uses only the RoI head (RoIs come from the student's
  proposals), but the RPN shapes what the RoI head sees in training.
- Faster R-CNN, `amplifier_rpn="frozen"`: `HighFrequencyRoIHeads` replaces
  `model.roi_heads` and the teacher's RPN keeps reading the full features, frozen.

The checkpoint stores the trained parts under the teacher's own key names (`head.*`, or
`roi_heads.*` and for the authors' variant `rpn.*`), so it also loads into a plain
teacher state dict; distillation reads `head.*` / `roi_heads.*`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Literal

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet

from ds2d2_cli.distill.spectral import high_frequency
from ds2d2_cli.errors import InputError


class HighFrequencyRetinaNetHead(nn.Module):
    def __init__(self, head: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.head = head
        self.wavelet = wavelet

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return self.head([high_frequency(f, self.wavelet) for f in features])

    def compute_loss(self, *args, **kwargs):
        return self.head.compute_loss(*args, **kwargs)


class HighFrequencyFeatures(nn.Module):
    """A backbone whose FPN levels come out as `high_frequency(...)` of each."""

    def __init__(self, backbone: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.out_channels
        self.wavelet = wavelet

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((name, high_frequency(f, self.wavelet)) for name, f in self.body(x).items())


class HighFrequencyRoIHeads(nn.Module):
    def __init__(self, roi_heads: nn.Module, wavelet: str = "haar"):
        super().__init__()
        self.roi_heads = roi_heads
        self.wavelet = wavelet

    def forward(self, features, proposals, image_shapes, targets=None):
        hf = OrderedDict((name, high_frequency(f, self.wavelet)) for name, f in features.items())
        return self.roi_heads(hf, proposals, image_shapes, targets)


def head_prefix(model: nn.Module) -> str:
    """The teacher state-dict prefix of the module an amplifier replaces."""
    if isinstance(model, RetinaNet):
        return "head."
    if isinstance(model, FasterRCNN):
        return "roi_heads."
    raise InputError(f"no amplifier for {type(model).__name__}")


def _trainable_copy(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return module


def amplifier_head(model: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's head (RetinaNetHead or RoIHeads)."""
    return _trainable_copy(model.head if isinstance(model, RetinaNet) else model.roi_heads)


def amplify(teacher: nn.Module, head: nn.Module, wavelet: str = "haar",
            rpn: Literal["high_frequency", "frozen"] = "high_frequency") -> dict[str, nn.Module]:
    """Turn the teacher into its high-frequency amplifier (in place); the trained parts by prefix.

    Everything but the returned parts is frozen; the result is still a torchvision
    detector, so its usual training loss and `eval` work on it. Pass a teacher instance of
    its own. `rpn` only matters for Faster R-CNN (see the module docstring).
    """
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    if isinstance(teacher, RetinaNet):
        teacher.head = HighFrequencyRetinaNetHead(head, wavelet)
        return {"head.": head}
    if rpn == "frozen":
        teacher.roi_heads = HighFrequencyRoIHeads(head, wavelet)
        return {"roi_heads.": head}
    teacher.backbone = HighFrequencyFeatures(teacher.backbone, wavelet)
    teacher.rpn = _trainable_copy(teacher.rpn)
    teacher.roi_heads = head
    return {"roi_heads.": head, "rpn.": teacher.rpn}


def trained_state_dict(parts: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The amplifier checkpoint's tensors: each trained part under its teacher prefix."""
    return {prefix + k: v for prefix, part in parts.items() for k, v in part.state_dict().items()}


def load_head(teacher: nn.Module, tensors: dict[str, Tensor], path) -> nn.Module:
    """An amplifier head with the weights of an amplifier checkpoint."""
    prefix = head_prefix(teacher)
    head = amplifier_head(teacher)
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"amplifier weights do not fit the teacher's head ({first})", path) from None
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head.eval()
