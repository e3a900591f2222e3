"""Distillation terms and methods, chosen by name (as torchdistill's loss registry).

A *term* is one loss: its name (what `--streams` and the log call it), the `LossWeights`
field that weighs it, what it needs from the training step, and the function that
computes it from a `DistillStep`. A *method* is a list of terms (`none` has none); a
method with `ablatable=True` lets `--streams` pick a subset. Adding a loss is one
`register_term`, adding a method one `register_method`; the CLI, the config and
`DistillTask` read their choices from here. Importing this module is cheap (no torch):
the config validates names against it.

`DistillStep` is everything a term may read; the detector family supplies `implicit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# What a term needs from the step; DistillTask builds only what the chosen terms need.
NEEDS_ADAPTER = "adapter"  # the 1x1 adapter's output (student -> teacher channels)
NEEDS_IMPLICIT = "implicit"  # a head run on student features (raw, or adapted when widths differ)
NEEDS_AMPLIFIER = "amplifier"  # the trained high-frequency amplifier


@dataclass
class DistillStep:
    """One step's inputs to the distillation terms (all tensors in the student's batch frame)."""

    student_features: dict[str, Any]  # the student's raw FPN levels
    teacher_features: dict[str, Any]  # the frozen teacher's FPN levels
    adapted: dict[str, Any] | None  # adapter(student level), when a term needs it
    implicit_features: dict[str, Any] | None  # what the amplifiers read on the student side
    boxes: list[Any]  # ground-truth boxes per image, xyxy input pixels
    input_hw: tuple[int, int]  # padded batch size
    settings: Any  # config.DistillConfig
    implicit: Callable[[bool], dict[str, Any]]  # (high frequency?) -> {"cls", "box"}, unweighted
    _cache: dict[str, Any] = field(default_factory=dict)

    def explicit(self) -> tuple[Any, Any]:
        """(low, high) explicit losses, computed once per step for both bands."""
        if "explicit" not in self._cache:
            from ds2d2_cli.distill.explicit import explicit_losses

            self._cache["explicit"] = explicit_losses(
                list(self.adapted.values()), list(self.teacher_features.values()), self.boxes, self.input_hw,
                wavelet=self.settings.wavelet, disw=self.settings.disw)
        return self._cache["explicit"]


@dataclass(frozen=True)
class Term:
    name: str
    weight: str  # LossWeights field
    needs: frozenset[str]
    compute: Callable[[DistillStep], dict[str, Any]]  # unweighted losses by log name
    description: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    terms: tuple[str, ...]
    description: str
    ablatable: bool = False  # `--streams` selects a subset of `terms`

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)


TERMS: dict[str, Term] = {}
METHODS: dict[str, Method] = {}


def register_term(term: Term) -> Term:
    if term.name in TERMS:
        raise ValueError(f"distillation term {term.name!r} is already registered")
    TERMS[term.name] = term
    return term


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"distillation method {method.name!r} is already registered")
    unknown = [t for t in method.terms if t not in TERMS]
    if unknown:
        raise ValueError(f"method {method.name!r} uses unregistered terms {unknown}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown distillation method {name!r}; available: {', '.join(METHODS)}") from None


def active_terms(method: Method, streams: tuple[str, ...] | list[str], has_amplifier: bool = True) -> list[Term]:
    """The method's terms in registry order: `streams` picks among them when the method is
    ablatable; a term that needs the amplifier drops out without one."""
    chosen = set(streams) if method.ablatable else set(method.terms)
    return [TERMS[name] for name in method.terms
            if name in chosen and (has_amplifier or NEEDS_AMPLIFIER not in TERMS[name].needs)]


# ----------------------------------------------------------------------------- the terms


def _explicit_low(step: DistillStep) -> dict[str, Any]:
    return {"explicit_low": step.explicit()[0]}


def _explicit_high(step: DistillStep) -> dict[str, Any]:
    return {"explicit_high": step.explicit()[1]}


def _implicit(prefix: str, high: bool) -> Callable[[DistillStep], dict[str, Any]]:
    def compute(step: DistillStep) -> dict[str, Any]:
        kd = step.implicit(high)
        return {f"{prefix}_cls": kd["cls"], f"{prefix}_box": kd["box"]}

    return compute


def _fitnet(step: DistillStep) -> dict[str, Any]:
    from ds2d2_cli.distill.explicit import fitnet_loss

    return {"fitnet": fitnet_loss(list(step.adapted.values()), list(step.teacher_features.values()))}


register_term(Term("explicit-low", "explicit_low", frozenset({NEEDS_ADAPTER}), _explicit_low,
                   "DISW-weighted MSE of the wavelet low band (adapted student vs teacher)"))
register_term(Term("explicit-high", "explicit_high", frozenset({NEEDS_ADAPTER}), _explicit_high,
                   "DISW-weighted MSE of the three detail bands"))
register_term(Term("implicit-full", "implicit_full", frozenset({NEEDS_IMPLICIT}), _implicit("implicit_full", False),
                   "the teacher's own head on student and teacher features"))
register_term(Term("implicit-high", "implicit_high", frozenset({NEEDS_IMPLICIT, NEEDS_AMPLIFIER}),
                   _implicit("implicit_high", True), "the high-frequency amplifier on HF(student), HF(teacher)"))
register_term(Term("fitnet", "fitnet", frozenset({NEEDS_ADAPTER}), _fitnet,
                   "plain full-feature MSE through the adapter"))

register_method(Method("ds2d2", ("explicit-low", "explicit-high", "implicit-full", "implicit-high"),
                       "detection loss + explicit (low, high) + implicit (full, high) streams", ablatable=True))
register_method(Method("none", (), "the same student, schedule and seed with no teacher (the baseline)"))
register_method(Method("fitnet", ("fitnet",), "FitNet: full-feature MSE through the same adapter"))

DS2D2_STREAMS: tuple[str, ...] = METHODS["ds2d2"].terms
