"""DS2D2 distillation losses (method.md): spectral split, DISW, explicit and implicit streams.

Public API, called from a training loop:

    spectral_split, high_frequency                  spectral.py
    disw_weights, disw_weights_levels               disw.py
    Adapter, explicit_losses, fitnet_loss           explicit.py
    retinanet_implicit_loss, faster_rcnn_implicit_loss   implicit.py (imports torchvision)
"""

from __future__ import annotations

from ds2d2_cli.distill.disw import disw_weights, disw_weights_levels
from ds2d2_cli.distill.explicit import Adapter, explicit_losses, fitnet_loss
from ds2d2_cli.distill.implicit import faster_rcnn_implicit_loss, retinanet_implicit_loss
from ds2d2_cli.distill.spectral import high_frequency, spectral_split

__all__ = [
    "Adapter",
    "disw_weights",
    "disw_weights_levels",
    "explicit_losses",
    "faster_rcnn_implicit_loss",
    "fitnet_loss",
    "high_frequency",
    "retinanet_implicit_loss",
    "spectral_split",
]
