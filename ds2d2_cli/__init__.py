"""ds2d2: small, fast remote-sensing detectors by DS2D2 knowledge distillation.

The distillation API (`ds2d2_cli.distill`) is re-exported here lazily: `import ds2d2_cli`
stays cheap (no torch / torchvision import) until one of these names is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_DISTILL_API = (
    "Adapter",
    "cwd_loss",
    "dist_loss",
    "dist_relation_loss",
    "disw_weights",
    "disw_weights_levels",
    "explicit_losses",
    "faster_rcnn_implicit_loss",
    "fgd_context_blocks",
    "fgd_losses",
    "fitnet_loss",
    "high_frequency",
    "mgd_generators",
    "mgd_loss",
    "oriented_retinanet_implicit_loss",
    "pkd_loss",
    "retinanet_implicit_loss",
    "spectral_split",
)

__all__ = ["__version__", *_DISTILL_API]

if TYPE_CHECKING:
    from ds2d2_cli.distill import (
        Adapter,
        cwd_loss,
        dist_loss,
        dist_relation_loss,
        disw_weights,
        disw_weights_levels,
        explicit_losses,
        faster_rcnn_implicit_loss,
        fgd_context_blocks,
        fgd_losses,
        fitnet_loss,
        high_frequency,
        mgd_generators,
        mgd_loss,
        oriented_retinanet_implicit_loss,
        pkd_loss,
        retinanet_implicit_loss,
        spectral_split,
    )


def __getattr__(name: str) -> Any:
    if name in _DISTILL_API:
        from ds2d2_cli import distill

        value = getattr(distill, name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DISTILL_API))
