"""Detector families, looked up by `ModelConfig.detector` (or from a built model).

    retinanet      retinanet.py
    faster_rcnn    faster_rcnn.py
    retinanet_obb  retinanet_obb.py   (oriented boxes: `oriented` is True)

Adding a family: one module with a `DetectorFamily` subclass (see `_base.py`), one line
in `FAMILIES`, and its name in `config.Detector`.
"""

from __future__ import annotations

from torch import nn

from ds2d2_cli.errors import InputError
from ds2d2_cli.models.families._base import DetectionStep, DetectorFamily
from ds2d2_cli.models.families.faster_rcnn import FasterRCNNFamily
from ds2d2_cli.models.families.retinanet import RetinaNetFamily
from ds2d2_cli.models.families.retinanet_obb import OrientedRetinaNetFamily

FAMILIES: dict[str, DetectorFamily] = {family.name: family for family in (RetinaNetFamily(), FasterRCNNFamily(),
                                                                           OrientedRetinaNetFamily())}


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


def is_oriented(model: nn.Module) -> bool:
    """Whether `model` (or the module a wrapper such as DDP holds) predicts rotated boxes."""
    model = getattr(model, "module", model)
    return any(isinstance(model, family.model_type) and family.oriented for family in FAMILIES.values())


__all__ = ["DetectionStep", "DetectorFamily", "FAMILIES", "family_of", "get_family", "is_oriented"]
