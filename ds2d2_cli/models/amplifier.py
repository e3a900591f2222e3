"""The high-frequency knowledge amplifier (method.md "Implicit stream").

An amplifier is a copy of the teacher's head that reads `high_frequency(features)`
instead of the features. Rather than re-implementing a detector around it, the teacher's
own torchvision detector is amplified in place by its family (`DetectorFamily.amplify`:
which modules are swapped and which train), so anchors, matching, losses and
post-processing stay torchvision's.

The checkpoint stores the trained parts under the teacher's own key names (`head.*`, or
`roi_heads.*` and for the authors' Faster R-CNN variant `rpn.*`), so it also loads into a
plain teacher state dict; distillation reads the head (`amplifier_prefix`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ds2d2_cli.errors import InputError
from ds2d2_cli.models.families import family_of
from ds2d2_cli.models.families._base import AmplifierRPN, trainable_copy


def head_prefix(model: nn.Module) -> str:
    """The teacher state-dict prefix of the module an amplifier replaces."""
    return family_of(model).amplifier_prefix


def amplifier_head(model: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's head (RetinaNetHead or RoIHeads)."""
    return trainable_copy(family_of(model).head(model))


def amplify(teacher: nn.Module, head: nn.Module, wavelet: str = "haar",
            rpn: AmplifierRPN = "high_frequency") -> dict[str, nn.Module]:
    """Turn the teacher into its high-frequency amplifier (in place); the trained parts by prefix.

    Everything but the returned parts is frozen; the result is still a torchvision
    detector, so its usual training loss and `eval` work on it. Pass a teacher instance of
    its own. `rpn` only matters for Faster R-CNN (`models/families/faster_rcnn.py`).
    """
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return family_of(teacher).amplify(teacher, head, wavelet, rpn)


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
