"""DS2D2 distillation losses (method.md): spectral split, DISW, explicit and implicit streams.

Public API, called from a training loop:

    spectral_split, high_frequency                  spectral.py
    disw_weights, disw_weights_levels               disw.py
    Adapter, explicit_losses, fitnet_loss           explicit.py
    retinanet_implicit_loss, faster_rcnn_implicit_loss   implicit.py (imports torchvision)
    oriented_retinanet_implicit_loss                 implicit.py (rotated boxes, KLD box term)

The baselines `ds2d2 study` compares against:

    cwd_loss                                        cwd.py
    pkd_loss                                        pkd.py
    dist_loss, dist_relation_loss                   dist.py
    mgd_loss, mgd_generators                        mgd.py
    fgd_losses, fgd_context_blocks                  fgd.py

Which terms a method combines, by name: registry.py. The names above are loaded on first
use, so `ds2d2_cli.distill.registry` (read by the config) imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Adapter": "explicit",
    "cwd_loss": "cwd",
    "dist_loss": "dist",
    "dist_relation_loss": "dist",
    "fgd_context_blocks": "fgd",
    "fgd_losses": "fgd",
    "mgd_generators": "mgd",
    "mgd_loss": "mgd",
    "pkd_loss": "pkd",
    "disw_weights": "disw",
    "disw_weights_levels": "disw",
    "explicit_losses": "explicit",
    "faster_rcnn_implicit_loss": "implicit",
    "fitnet_loss": "explicit",
    "high_frequency": "spectral",
    "oriented_retinanet_implicit_loss": "implicit",
    "retinanet_implicit_loss": "implicit",
    "spectral_split": "spectral",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from ds2d2_cli.distill.cwd import cwd_loss
    from ds2d2_cli.distill.dist import dist_loss, dist_relation_loss
    from ds2d2_cli.distill.fgd import fgd_context_blocks, fgd_losses
    from ds2d2_cli.distill.mgd import mgd_generators, mgd_loss
    from ds2d2_cli.distill.pkd import pkd_loss
    from ds2d2_cli.distill.disw import disw_weights, disw_weights_levels
    from ds2d2_cli.distill.explicit import Adapter, explicit_losses, fitnet_loss
    from ds2d2_cli.distill.implicit import (faster_rcnn_implicit_loss, oriented_retinanet_implicit_loss,
                                            retinanet_implicit_loss)
    from ds2d2_cli.distill.spectral import high_frequency, spectral_split


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f"ds2d2_cli.distill.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
