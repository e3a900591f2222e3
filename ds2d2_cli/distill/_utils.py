"""Pieces every feature-distillation loss shares: pairing FPN levels and a working dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ds2d2_cli.errors import Ds2d2Error

Features = Sequence[Tensor] | Mapping[str, Tensor]


def levels(feats: Features) -> list[Tensor]:
    return list(feats.values()) if isinstance(feats, Mapping) else list(feats)


def paired_levels(student_feats: Features, teacher_feats: Features, *, same_shape: bool = True
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Student and teacher levels in one order; a mismatch is an error, not a silent zip."""
    if isinstance(student_feats, Mapping) and isinstance(teacher_feats, Mapping):
        if list(student_feats) != list(teacher_feats):
            raise Ds2d2Error(
                f"student FPN levels {list(student_feats)} do not match teacher levels {list(teacher_feats)}"
            )
    student, teacher = levels(student_feats), levels(teacher_feats)
    if len(student) != len(teacher):
        raise Ds2d2Error(f"student has {len(student)} FPN levels, teacher {len(teacher)}")
    if not student:
        raise Ds2d2Error("feature distillation needs at least one FPN level")
    if same_shape:
        for level, (s, t) in enumerate(zip(student, teacher)):
            check_level(level, s, t)
    return student, teacher


def check_level(level: int, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise Ds2d2Error(
            f"FPN level {level}: student features {tuple(student.shape)} do not match teacher "
            f"{tuple(teacher.shape)} (channels need an Adapter; sizes need the same input)"
        )


def working(x: Tensor) -> Tensor:
    """Half-precision features are compared in float32 (the losses sum many small squares)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
