"""What a detector family owns, so the rest of the code never asks which family it holds.

A family is one module (`retinanet.py`, `faster_rcnn.py`) with one `DetectorFamily`
subclass: how the detector is built, the detection terms of a training step computed
from features the caller already has, the implicit (amplifier) loss, the class scores of
student and teacher on the same anchors or RoIs (DIST), what the high-frequency amplifier
replaces and trains, and where its score threshold lives. A new family is one new module
registered in `families/__init__.py`, as each torchvision model owns its `compute_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ds2d2_cli.config import DistillConfig, InputConfig, ModelConfig

AmplifierRPN = Literal["high_frequency", "frozen"]


@dataclass
class DetectionStep:
    """One training step's shared state: the student's detection terms and what the implicit
    losses reuse from it (anchors, proposals, the RoI draw), filled once per step."""

    batch: ImageList
    targets: list[dict[str, Tensor]]
    terms: dict[str, Tensor]
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassScores:
    """The student's class logits and the frozen teacher's for the same anchors or RoIs, as the
    `[rows, classes]` matrices DIST relates (one per dense-head level, one for an RoI head)."""

    student: list[Tensor]  # with autograd: the student's own detection-loss logits
    teacher: list[Tensor]  # no autograd
    activation: Literal["sigmoid", "softmax"]  # how the head turns logits into scores


class DetectorFamily:
    name: ClassVar[str]
    model_type: ClassVar[type[nn.Module]]
    amplifier_prefix: ClassVar[str]  # teacher state-dict prefix of the module an amplifier replaces
    oriented: ClassVar[bool] = False  # trains on and predicts rotated boxes (`rboxes`, le90)

    def build(self, cfg: ModelConfig, num_classes: int, input_cfg: InputConfig) -> nn.Module:
        """The detector reading `input_cfg.resolved`'s bands (one input channel each), normalised
        by its per-band mean and std."""
        raise NotImplementedError

    def detection_step(self, model: nn.Module, batch: ImageList, targets: list[dict[str, Tensor]],
                       features: dict[str, Tensor]) -> DetectionStep:
        """The detector's own training loss terms from `features` of the transformed `batch`."""
        raise NotImplementedError

    def implicit_loss(self, step: DetectionStep, teacher: nn.Module, head: nn.Module,
                      student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                      settings: DistillConfig) -> dict[str, Tensor]:
        """{"cls", "box"}: the amplifier `head` (teacher's own, or the HF one) on both feature sets."""
        raise NotImplementedError

    def prediction_pair(self, step: DetectionStep, teacher: nn.Module,
                        teacher_features: dict[str, Tensor]) -> ClassScores:
        """The student's class logits of `step` and the teacher's head on `teacher_features` for
        the same anchors or RoIs (what DIST compares)."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        """The module an amplifier is a trained copy of."""
        raise NotImplementedError

    def amplify(self, teacher: nn.Module, head: nn.Module, wavelet: str, rpn: AmplifierRPN) -> dict[str, nn.Module]:
        """Turn a (frozen) teacher into its high-frequency amplifier in place; the trained parts by prefix."""
        raise NotImplementedError

    def amplifier_untrained_losses(self, rpn: AmplifierRPN) -> tuple[str, ...]:
        """Loss terms of the amplified detector that train nothing (left out of its log)."""
        return ()

    def amplifier_frozen_modules(self, model: nn.Module, rpn: AmplifierRPN) -> list[nn.Module]:
        """Modules kept in eval mode while the amplifier trains (BN statistics must not drift)."""
        return [model.backbone]

    def set_score_thresh(self, model: nn.Module, score_thresh: float) -> None:
        raise NotImplementedError


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters all train (amplifiers start from the teacher's weights)."""
    import copy

    module = copy.deepcopy(module)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return module
