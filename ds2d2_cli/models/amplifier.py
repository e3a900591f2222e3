"""The high-frequency knowledge amplifier (method.md "Implicit stream").

An amplifier is a copy of the teacher's head that reads `high_frequency(features)`
instead of the features. Rather than re-implementing a detector around it, we wrap the
head so the teacher's own torchvision detector does the rest (anchors, matching,
losses, post-processing):

- RetinaNet: `HighFrequencyRetinaNetHead` replaces `model.head`.
- Faster R-CNN: `HighFrequencyRoIHeads` replaces `model.roi_heads`. The teacher's RPN
  keeps reading the full features (frozen): the paper's amplifier is a box head, and
  proposals from high-frequency features alone would be poor and not what distillation
  feeds it (the student's proposals).

The checkpoint stores only the head, under the teacher's own key names (`head.*` or
`roi_heads.*`), so it also loads into a plain teacher state dict.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

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


def amplifier_head(model: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's head (RetinaNetHead or RoIHeads)."""
    head = copy.deepcopy(model.head if isinstance(model, RetinaNet) else model.roi_heads)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    return head


def amplify(teacher: nn.Module, head: nn.Module, wavelet: str = "haar") -> nn.Module:
    """Swap the teacher's head for `head` reading high-frequency features (in place).

    Everything but `head` is frozen; the result is still a torchvision detector, so its
    usual training loss and `eval` work on it. Pass a teacher instance of its own.
    """
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    if isinstance(teacher, RetinaNet):
        teacher.head = HighFrequencyRetinaNetHead(head, wavelet)
    else:
        teacher.roi_heads = HighFrequencyRoIHeads(head, wavelet)
    return teacher


def head_state_dict(model: nn.Module, head: nn.Module) -> dict[str, Tensor]:
    prefix = head_prefix(model)
    return {prefix + k: v for k, v in head.state_dict().items()}


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
