"""Training tasks everyone can use: what one step of a plain detector computes.

A `TrainingTask` (engine.py) owns the trainable module and turns a batch into named loss
terms. `DetectorTask` is supervised detection with the torchvision detector's own loss
(teachers, the undistilled student, benchmarks); the amplifier and distillation tasks
live with their stages.
"""

from __future__ import annotations

from torch import Tensor, nn


class DetectorTask:
    """Supervised detection: the torchvision detector's own loss terms."""

    def __init__(self, model: nn.Module):
        self.module = model

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.module(images, targets)

    def train_mode(self) -> None:
        self.module.train()
