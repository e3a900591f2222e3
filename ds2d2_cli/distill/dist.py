"""DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022), a study baseline.

KL divergence asks the student to match the teacher's probabilities exactly; a much
stronger teacher is then hard to follow and can hurt. DIST asks only for the same
*relations*: the Pearson correlation between student and teacher probabilities, once per
sample across its classes (inter-class) and once per class across the batch (intra-class).
Pearson ignores a positive affine change, so a student whose scores are scaled and
shifted versions of the teacher's already scores zero.

    rho(u, v)   = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + 1e-8)
    inter(P, Q) = 1 - mean over rows i of rho(P[i, :], Q[i, :])      P, Q: [samples, classes]
    intra(P, Q) = inter(P^T, Q^T)                                    (per class, across samples)
    DIST        = tau^2 * (beta * inter + gamma * intra),  P = softmax(z_s / tau), Q = softmax(z_t / tau)

as the authors' classification code computes it (hunto/image_classification_sota
`lib/models/losses/dist_kd.py`, the DIST_KD repository's `classification` submodule).

Detectors (`dist_scores_loss`) follow the authors' detection configs in hunto/MasKD
(`mmrazor/models/losses/dist_kd.py`, configs under `mmrazor/configs/distill/dist/`): the
same two relations on the class scores of the student's head and the teacher's head for
the same anchors or RoIs, one relation matrix per head output and the losses summed, with
sigmoid scores for a sigmoid head (RetinaNet) and softmax for a softmax one (the RoI head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from ds2d2_cli.distill._utils import working
from ds2d2_cli.errors import Ds2d2Error

__all__ = ["dist_loss", "dist_relation_loss", "dist_relations", "dist_scores_loss"]

Activation = Literal["softmax", "sigmoid"]

_EPS = 1e-8  # the authors' cosine-similarity guard (a constant row correlates 0, never NaN)


def _row_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`: `[R]`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)


def _check(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise Ds2d2Error(f"DIST compares [samples, classes] {what} of one shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")


def dist_relations(p_student: Tensor, p_teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(inter, intra) for `[N, C]` probabilities: inter correlates each sample's C classes,
    intra each class's N samples; 0 each when the student's relations are the teacher's."""
    _check(p_student, p_teacher, "probabilities")
    s, t = working(p_student), working(p_teacher.detach())
    inter = 1 - _row_pearson(s, t).mean()
    intra = 1 - _row_pearson(s.t(), t.t()).mean()
    return inter, intra


def dist_relation_loss(p_student: Tensor, p_teacher: Tensor, beta: float = 1.0, gamma: float = 1.0) -> Tensor:
    """`beta * inter + gamma * intra` on `[N, C]` probabilities (no temperature factor); teacher detached."""
    inter, intra = dist_relations(p_student, p_teacher)
    return beta * inter + gamma * intra


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"DIST temperature must be positive, got {tau}")


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> Tensor:
    """DIST on `[N, C]` classification logits: softmax over classes at temperature `tau`,
    `tau^2 * (beta * inter + gamma * intra)` (the authors' classification form); teacher detached."""
    _check_tau(tau)
    _check(student_logits, teacher_logits, "logits")
    p_student = (working(student_logits) / tau).softmax(dim=1)
    p_teacher = (working(teacher_logits.detach()) / tau).softmax(dim=1)
    return tau ** 2 * dist_relation_loss(p_student, p_teacher, beta, gamma)


def dist_scores_loss(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor], *,
                     activation: Activation, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """DIST summed over relation matrices (a detector's heads: one per FPN level of a dense
    head, one for an RoI head): `[rows, classes]` logits per matrix, the scores sigmoid or
    softmax of `logits / tau`, each matrix's loss times `tau^2`. At tau 1 this is MasKD's
    `DIST(use_sigmoid=...)` summed over the head's outputs; softmax on one matrix is `dist_loss`."""
    _check_tau(tau)
    if activation not in ("softmax", "sigmoid"):
        raise Ds2d2Error(f"unknown DIST activation {activation!r} (softmax or sigmoid)")
    if len(student_logits) != len(teacher_logits) or not student_logits:
        raise Ds2d2Error(f"DIST needs the same number (at least one) of student and teacher score matrices, "
                         f"got {len(student_logits)} and {len(teacher_logits)}")
    total: Tensor | None = None
    for s, t in zip(student_logits, teacher_logits):
        _check(s, t, "logits")
        s, t = working(s) / tau, working(t.detach()) / tau
        if activation == "sigmoid":
            p_s, p_t = s.sigmoid(), t.sigmoid()
        else:
            p_s, p_t = s.softmax(dim=1), t.softmax(dim=1)
        term = tau ** 2 * dist_relation_loss(p_s, p_t, beta, gamma)
        total = term if total is None else total + term
    assert total is not None
    return total
