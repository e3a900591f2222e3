"""Distillation terms and methods, chosen by name (as torchdistill's loss registry).

A *term* is one loss: its name (what `--streams` and the log call it), the `LossWeights`
field that weighs it, what it needs from the training step, and the function that
computes it from a `DistillStep`. A *method* is a list of terms (`none` has none); a
method with `ablatable=True` lets `--streams` pick a subset. Adding a loss is one
`register_term`, adding a method one `register_method`; the CLI, the config and
`DistillTask` read their choices from here. Importing this module is cheap (no torch):
the config validates names against it.

`DistillStep` is everything a term may read; the detector family supplies `implicit` and
`predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# What a term needs from the step; DistillTask builds only what the chosen terms need.
NEEDS_ADAPTER = "adapter"  # the 1x1 adapter's output (student -> teacher channels)
NEEDS_IMPLICIT = "implicit"  # a head run on student features (raw, or adapted when widths differ)
NEEDS_AMPLIFIER = "amplifier"  # the trained high-frequency amplifier
# the student's levels in the teacher's width: raw when the widths match, the adapter's
# output otherwise (the rule of DS2D2's implicit streams, used by the feature baselines)
NEEDS_ALIGNED = "aligned"


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
    aligned: dict[str, Any] | None = None  # NEEDS_ALIGNED
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # each image's size before padding
    parts: dict[str, Any] = field(default_factory=dict)  # a method's own trainable modules, by PARTS name
    rboxes: list[Any] | None = None  # oriented students: rotated boxes per image, le90 input pixels
    # () -> the family's ClassScores: the student's class logits and the frozen teacher's on the
    # same anchors or RoIs (`DetectorFamily.prediction_pair`), computed when a term asks
    predictions: Callable[[], Any] | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def object_boxes(self) -> list[Any]:
        """What DISW and FGD's masks take the objects' cells from: the rotated boxes when the
        student is oriented (their envelopes would mark background as object), else `boxes`."""
        return self.rboxes if self.rboxes is not None else self.boxes

    def finest(self, features: dict[str, Any], count: int | None) -> dict[str, Any]:
        """The `count` finest FPN levels (all with None): reference configs distill a prefix."""
        names = list(features)[:count] if count is not None else list(features)
        return {name: features[name] for name in names}

    def explicit(self) -> tuple[Any, Any]:
        """(low, high) explicit losses, computed once per step for both bands."""
        if "explicit" not in self._cache:
            from ds2d2_cli.distill.explicit import explicit_losses

            self._cache["explicit"] = explicit_losses(
                list(self.adapted.values()), list(self.teacher_features.values()), self.object_boxes, self.input_hw,
                wavelet=self.settings.wavelet, disw=self.settings.disw)
        return self._cache["explicit"]


@dataclass(frozen=True)
class Term:
    name: str
    weight: str  # LossWeights field
    needs: frozenset[str]
    compute: Callable[[DistillStep], dict[str, Any]]  # unweighted losses by log name
    description: str = ""
    parts: str | None = None  # name in PARTS of the trainable modules the term needs
    outputs: tuple[str, ...] = ()  # the log names `compute` returns, where a step may leave the term out

    @property
    def implicit(self) -> bool:
        return NEEDS_IMPLICIT in self.needs


@dataclass(frozen=True)
class Method:
    name: str
    terms: tuple[str, ...]
    description: str
    ablatable: bool = False  # `--streams` selects a subset of `terms`

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    @property
    def needs_amplifier(self) -> bool:
        """Whether one of its terms reads the high-frequency amplifier (with all of them running)."""
        return any(NEEDS_AMPLIFIER in TERMS[name].needs for name in self.terms)


TERMS: dict[str, Term] = {}
METHODS: dict[str, Method] = {}
# name -> builder(teacher channels, FPN level names, DistillConfig) -> nn.Module: modules a
# method trains with the student (MGD's generators, FGD's context blocks), saved beside it.
PARTS: dict[str, Callable[[int, list[str], Any], Any]] = {}


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


def register_parts(name: str, builder: Callable[[int, list[str], Any], Any]) -> None:
    if name in PARTS:
        raise ValueError(f"distillation parts {name!r} are already registered")
    PARTS[name] = builder


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
                   "the teacher's own head on student and teacher features",
                   outputs=("implicit_full_cls", "implicit_full_box")))
register_term(Term("implicit-high", "implicit_high", frozenset({NEEDS_IMPLICIT, NEEDS_AMPLIFIER}),
                   _implicit("implicit_high", True), "the high-frequency amplifier on HF(student), HF(teacher)",
                   outputs=("implicit_high_cls", "implicit_high_box")))
register_term(Term("fitnet", "fitnet", frozenset({NEEDS_ADAPTER}), _fitnet,
                   "plain full-feature MSE through the adapter"))

def _cwd(step: DistillStep) -> dict[str, Any]:
    from ds2d2_cli.distill.cwd import cwd_loss

    cwd = step.settings.cwd
    return {"cwd": cwd_loss(step.finest(step.aligned, cwd.levels), step.finest(step.teacher_features, cwd.levels),
                            tau=cwd.tau)}


def _pkd(step: DistillStep) -> dict[str, Any]:
    from ds2d2_cli.distill.pkd import pkd_loss

    levels = step.settings.pkd.levels
    return {"pkd": pkd_loss(step.finest(step.aligned, levels), step.finest(step.teacher_features, levels))}


def _mgd(step: DistillStep) -> dict[str, Any]:
    from ds2d2_cli.distill.mgd import mgd_loss

    mgd = step.settings.mgd
    return {"mgd": mgd_loss(step.finest(step.aligned, mgd.levels), step.finest(step.teacher_features, mgd.levels),
                            step.parts["mgd"], mask_ratio=mgd.mask_ratio)}


def _fgd(part: str) -> Callable[[DistillStep], dict[str, Any]]:
    def compute(step: DistillStep) -> dict[str, Any]:
        if "fgd" not in step._cache:
            from ds2d2_cli.distill.fgd import fgd_losses

            fgd = step.settings.fgd
            step._cache["fgd"] = fgd_losses(
                step.finest(step.aligned, fgd.levels), step.finest(step.teacher_features, fgd.levels), step.object_boxes,
                step.image_sizes, step.parts["fgd"], temperature=fgd.temperature)
        return {f"fgd_{part}": step._cache["fgd"][part]}

    return compute


def _mgd_parts(channels: int, level_names: list[str], settings: Any) -> Any:
    from ds2d2_cli.distill.mgd import mgd_generators

    return mgd_generators(channels, level_names[:settings.mgd.levels])


def _fgd_parts(channels: int, level_names: list[str], settings: Any) -> Any:
    from ds2d2_cli.distill.fgd import fgd_context_blocks

    return fgd_context_blocks(channels, level_names[:settings.fgd.levels])


def _dist(step: DistillStep) -> dict[str, Any]:
    from ds2d2_cli.distill.dist import dist_scores_loss

    dist = step.settings.dist
    scores = step.predictions()
    return {"dist": dist_scores_loss(scores.student, scores.teacher, activation=scores.activation,
                                     beta=dist.beta, gamma=dist.gamma, tau=dist.tau)}


register_parts("mgd", _mgd_parts)
register_parts("fgd", _fgd_parts)
_ALIGNED = frozenset({NEEDS_ALIGNED})
register_term(Term("cwd", "cwd", _ALIGNED, _cwd, "channel-wise KL of spatial softmax maps (Shu et al. 2021)"))
register_term(Term("pkd", "pkd", _ALIGNED, _pkd, "MSE of per-channel standardised features (Cao et al. 2022)"))
register_term(Term("mgd", "mgd", _ALIGNED, _mgd, "teacher features generated from randomly masked student "
                   "features (Yang et al. 2022)", parts="mgd"))
for _part, _what in (("fg", "attention-weighted MSE inside the boxes"), ("bg", "... outside them"),
                     ("attention", "L1 between spatial and channel attention maps"),
                     ("global", "MSE after a global-context block each")):
    register_term(Term(f"fgd-{_part}", f"fgd_{_part}", _ALIGNED, _fgd(_part), f"FGD: {_what}", parts="fgd"))

register_term(Term("dist", "dist", frozenset(), _dist, "DIST: Pearson relations of the student's and the "
                   "teacher's class scores on the same anchors / RoIs, per sample and per class (Huang et al. 2022)"))

register_method(Method("ds2d2", ("explicit-low", "explicit-high", "implicit-full", "implicit-high"),
                       "detection loss + explicit (low, high) + implicit (full, high) streams", ablatable=True))
register_method(Method("none", (), "the same student, schedule and seed with no teacher (the baseline)"))
register_method(Method("fitnet", ("fitnet",), "FitNet: full-feature MSE through the same adapter"))
register_method(Method("cwd", ("cwd",), "CWD, channel-wise distillation (Shu et al., ICCV 2021)"))
register_method(Method("pkd", ("pkd",), "PKD, Pearson-correlation feature distillation (Cao et al., NeurIPS 2022)"))
register_method(Method("mgd", ("mgd",), "MGD, masked generative distillation (Yang et al., ECCV 2022)"))
register_method(Method("fgd", ("fgd-fg", "fgd-bg", "fgd-attention", "fgd-global"),
                       "FGD, focal and global distillation (Yang et al., CVPR 2022)"))
register_method(Method("dist", ("dist",), "DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022): "
                       "inter- and intra-class Pearson relations of the heads' class scores"))
# Issue 24 asks whether DIST's relation matching keeps DS2D2's gain growing with the teacher: both
# methods' terms in one step, each at its own weight (the preset's DS2D2 weights and DIST's reference 1).
register_method(Method("ds2d2-dist", (*METHODS["ds2d2"].terms, "dist"),
                       "DS2D2's four streams plus DIST's class-score relations, each term at its own weight"))

# The baselines' defaults per detector family, from each method's own reference config
# (256-channel FPNs, COCO); a preset states them, `--set distill...` overrides them.
# `levels`: how many of the finest FPN levels the reference config distills.
REFERENCE_SETTINGS: dict[str, dict[str, dict[str, float | int]]] = {
    "retinanet": {
        "weights": {
            "cwd": 10.0,  # MMRazor configs/distill/mmdet/cwd/cwd_fpn_retina_r101_retina_r50_1x_coco.py
            "pkd": 10.0,  # MMRazor configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py
            "mgd": 2e-5,  # MMRazor configs/distill/mmdet/mgd/mgd_fpn_retina_x101_retina_r50_2x_coco.py (alpha_mgd)
            # yzd-v/FGD configs/distillers/fgd/fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py
            "fgd_fg": 1e-3, "fgd_bg": 5e-4, "fgd_attention": 5e-4, "fgd_global": 5e-6,
            "dist": 1.0,  # hunto/MasKD mmrazor/configs/distill/dist/dist_retinanet_x101-retinanet-r50_coco.py
        },
        "cwd": {"tau": 1.0, "levels": 5},  # P3-P7
        "pkd": {"levels": 4},  # P3-P6 (P7 is not distilled there)
        "mgd": {"mask_ratio": 0.65, "levels": 5},  # lambda_mgd; P3-P7
        "fgd": {"temperature": 0.5, "levels": 5},  # P3-P7
        # same DIST config: sigmoid scores of bbox_head.retina_cls on every level; no temperature (1)
        "dist": {"beta": 1.0, "gamma": 1.0, "tau": 1.0},
    },
    "faster_rcnn": {
        "weights": {
            "cwd": 10.0,  # MMRazor configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py
            "pkd": 6.0,  # MMRazor configs/distill/mmdet/pkd/pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py
            # MGD has no Faster R-CNN-teacher config anywhere; the closest, a Faster R-CNN student:
            # yzd-v/MGD det/configs/distillers/mgd/cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py
            "mgd": 5e-7,
            # yzd-v/FGD configs/distillers/fgd/fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py
            "fgd_fg": 5e-5, "fgd_bg": 2.5e-5, "fgd_attention": 5e-5, "fgd_global": 5e-7,
            # DIST's only two-stage config (a Cascade Mask R-CNN X101 teacher, a Faster R-CNN R50 student):
            # hunto/MasKD mmrazor/configs/distill/dist/dist_cascade_mask_rcnn_x101-fpn_x50_coco.py
            "dist": 1.0,
        },
        "cwd": {"tau": 1.0, "levels": 5},  # P2-P6
        "pkd": {"levels": 4},  # P2-P5
        "mgd": {"mask_ratio": 0.45, "levels": 4},  # P2-P5
        "fgd": {"temperature": 0.5, "levels": 4},  # P2-P5
        # same DIST config: softmax scores of the box head's fc_cls on the student's RoIs; no temperature (1)
        "dist": {"beta": 1.0, "gamma": 1.0, "tau": 1.0},
    },
}
# The oriented RetinaNet is the RetinaNet body and head with a fifth regression output; no
# baseline has a rotated-detector config, so it takes the RetinaNet values.
REFERENCE_SETTINGS["retinanet_obb"] = REFERENCE_SETTINGS["retinanet"]

DS2D2_STREAMS: tuple[str, ...] = METHODS["ds2d2"].terms
