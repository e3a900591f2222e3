"""Detector families, looked up by `ModelConfig.detector` (or from a built model).

    retinanet     retinanet.py
    faster_rcnn   faster_rcnn.py

Adding a family: one module with a `DetectorFamily` subclass (see `_base.py`), one line
in `FAMILIES`, and its name in `config.Detector`.
"""

from __future__ import annotations

from torch import nn

from ds2d2_cli.errors import InputError
from ds2d2_cli.models.families._base import DetectionStep, DetectorFamily
from ds2d2_cli.models.families.faster_rcnn import FasterRCNNFamily
from ds2d2_cli.models.families.retinanet import RetinaNetFamily

FAMILIES: dict[str, DetectorFamily] = {family.name: family for family in (RetinaNetFamily(), FasterRCNNFamily())}


def get_family(name: str) -> DetectorFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown detector family {name!r}; available: {', '.join(FAMILIES)}") from None


def family_of(model: nn.Module) -> DetectorFamily:
    for family in FAMILIES.values():
        if isinstance(model, family.model_type):
            return family
    raise InputError(f"no detector family for {type(model).__name__}")


__all__ = ["DetectionStep", "DetectorFamily", "FAMILIES", "family_of", "get_family"]
