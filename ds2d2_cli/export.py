"""Export a teacher or student checkpoint for deployment: ONNX, TorchScript or fp16 safetensors.

ONNX (`export_onnx`)
    The whole torchvision detector - its transform (normalisation + resize) and its
    post-processing (box decoding, score threshold, NMS, top-K) - traced by the
    TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`; the dynamo
    exporter needs `onnxscript`, which ds2d2 does not depend on). Opset 17-20.

    Input  ``image``:  float32 ``[N, S, S]``, one image (not a batch: the torchvision
                       detectors take a list of images, and one [N, S, S] tensor is what
                       traces cleanly); N = the checkpoint's bands, in its order, each
                       stored value v scaled as (v - low) / (high - low) (SampleSpec; for
                       8-bit RGB: v / 255, RGB in 0..1); S = the checkpoint's ``input.size``.
    Output ``boxes``:  float32 ``[K, 4]`` x1, y1, x2, y2 in input pixels.
           ``scores``: float32 ``[K]``, sorted high to low, all >= the model's score_thresh.
           ``labels``: int64 ``[K]``, category id 1..C: class name = classes[label - 1].

    Oriented detectors (``retinanet_obb``): rotated NMS has no standard ONNX operator, so the
    graph stops just before it (`ORIENTED_OUTPUTS`); the caller finishes with
    `ds2d2_cli.models.families.retinanet_obb.select_oriented` (as ``ds2d2 predict`` does):

    Output ``rboxes``:  float32 ``[M, 5]`` cx, cy, w, h, theta (le90: radians, w >= h up to
                        `normalize_le90`, which select_oriented applies) in input pixels: the
                        decoded boxes of each pyramid level's ``nms_pre`` best anchors.
           ``scores``:  float32 ``[M, C]`` their per-class scores (column c is classes[c]).
           ``anchors``: int64 ``[M]`` each row's anchor (index among all anchors, levels in order).

    Then: every (row, class) with score > score_thresh, rotated NMS per class at ``nms_iou``
    (`ds2d2_cli.rotated.batched_rotated_nms`, dropping IoU > nms_iou), the best
    ``detections_per_img``; labels are column + 1. The metadata says so (``nms``: "caller",
    ``nms_iou``, ``boxes``: "obb", ``angle``: "le90").

    ``metadata_props`` carry the class names (JSON), the bands (``bands``, JSON list), how
    stored values become the input floats (``sample``, the SampleSpec as JSON; in words:
    ``input_description``), normalisation (JSON), input size, detector, backbone, stage,
    score threshold, ds2d2 version and the source checkpoint's sha256, so the file explains
    itself.

TorchScript (`export_torchscript`)
    ``torch.jit.script`` of the detector in a thin wrapper:
    ``model(images: List[Tensor[N, H, W]]) -> List[Dict[str, Tensor]]`` (boxes / scores /
    labels per image, as eager torchvision; the bands and scaling as for ONNX). Any image
    size works (the transform resizes).
    The same metadata travels as the extra file ``ds2d2_meta.json``
    (``torch.jit.load(path, _extra_files={"ds2d2_meta.json": ""})``).

fp16 safetensors (`export_safetensors_fp16`)
    The checkpoint with its floating-point tensors in half precision and metadata
    ``dtype=float16``; `load_checkpoint` + `model_from_checkpoint` read it back (weights are
    upcast to float32 when loaded into the model).

Verification (`verify_onnx`, ``verify=True``) runs PyTorch (the reference) and the exported
model on the same images and matches their detections (see `compare_detections`); for an
oriented detector also the pre-NMS outputs, row by row through their anchors
(`compare_candidates`), and the detections are compared as rotated boxes (their corners).
Everything is written atomically; a failed export or verification leaves no file.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from ds2d2_cli import __version__
from ds2d2_cli.checkpoint import Checkpoint, load_checkpoint
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import atomic_path
from ds2d2_cli.sample import SampleSpec, bands_text

FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".fp16.safetensors"}
MIN_OPSET = 17
MAX_OPSET = 20  # torch.onnx's TorchScript-based exporter stops here
# 18: its GroupNormalization export handles the 1x1 top pyramid levels of small inputs
# (opset 17's decomposition runs batch norm in training mode there and fails).
DEFAULT_OPSET = 18
EXPORTER = "torch.onnx.export (TorchScript-based, dynamo=False)"
TORCHSCRIPT_META_FILE = "ds2d2_meta.json"

# Verification tolerances: matched boxes within BOX_RTOL x max(|coordinate|, 1 px);
# matched scores within SCORE_ATOL; detections whose score lies within CUTOFF_ATOL of a
# cut-off (the score threshold, or the last kept score when detections_per_img is full)
# may be present in one output only (float noise decides which side of the cut-off they land).
BOX_RTOL = 1e-3
SCORE_ATOL = 1e-4
CUTOFF_ATOL = 1e-4
# fp16 weights move outputs by more than float noise: looser pairing, figures informational.
FP16_TOLERANCE = {"box_rel": 1e-2, "score_abs": 1e-2, "cutoff_abs": 1e-2}
STRICT_TOLERANCE = {"box_rel": BOX_RTOL, "score_abs": SCORE_ATOL, "cutoff_abs": CUTOFF_ATOL}
ImageLike = str | Path | torch.Tensor


# ----------------------------------------------------------------------------- inputs


def default_output(checkpoint_path: str | Path, fmt: str) -> Path:
    """`runs/student/model.safetensors` -> `runs/student/model.onnx` (or .torchscript.pt / .fp16.safetensors)."""
    check_format(fmt)
    path = Path(checkpoint_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    return path.with_name(stem + SUFFIXES[fmt])


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")


def load_detector_checkpoint(checkpoint_path: str | Path) -> Checkpoint:
    """A teacher or student checkpoint; amplifiers (no detector of their own) are refused."""
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.meta.stage not in ("teacher", "student"):
        raise InputError(
            f"this is an {checkpoint.meta.stage} checkpoint, not a detector; export a teacher or student checkpoint",
            checkpoint.path,
        )
    return checkpoint


def _detector(checkpoint: Checkpoint) -> nn.Module:
    from ds2d2_cli.models.detectors import model_from_checkpoint

    return model_from_checkpoint(checkpoint, "cpu")


def _check_out(out: str | Path, checkpoint: Checkpoint) -> Path:
    out = Path(out)
    if out.resolve() == checkpoint.path.resolve():
        raise InputError("the output would overwrite the checkpoint; choose another --out", out)
    if out.is_dir():
        raise InputError("the output is a folder; give a file name", out)
    return out


def synthetic_image(size: int, seed: int = 0, bands: int = 3) -> torch.Tensor:
    """A deterministic [bands, size, size] test scene: a smooth background with rectangles of
    random values per band (bands beyond three repeat the three backgrounds)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.25, 0.55, size, dtype=np.float32)
    backgrounds = [ramp[None, :] * np.ones((size, 1), np.float32), ramp[:, None] * np.ones((1, size), np.float32),
                   np.full((size, size), 0.4, np.float32)]
    image = np.stack([backgrounds[b % 3] for b in range(bands)])
    for _ in range(12):
        w, h = rng.integers(max(2, size // 24), max(3, size // 4), size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        image[:, y:y + h, x:x + w] = rng.uniform(0.0, 1.0, size=(bands, 1, 1)).astype(np.float32)
    image += rng.normal(0.0, 0.02, size=image.shape).astype(np.float32)
    return torch.from_numpy(np.clip(image, 0.0, 1.0))


def input_description(checkpoint: Checkpoint) -> str:
    """What the exported model reads, in words: the float image's bands and value scaling."""
    resolved = checkpoint.meta.input.resolved
    spec, size = resolved.sample, resolved.size
    head = f"image float32 [{len(resolved.bands)}, {size}, {size}]"
    if spec.is_rgb8 and resolved.bands == spec.bands:
        return f"{head} RGB 0..1 (8-bit values / 255)"
    value = "10*log10(v)" if spec.scaling == "db" else "v"
    return (f"{head}, {bands_text(resolved.bands)}: stored {spec.dtype} values v as ({value} - low) / (high - low) "
            f"per band ({spec.scaling} scaling; low and high in the metadata's sample)")


def verification_images(images: Sequence[ImageLike] | None, size: int, spec: SampleSpec = SampleSpec(),
                        bands: Sequence[str] | None = None) -> list[torch.Tensor]:
    """User images (paths read with `spec`, or float [N, H, W] tensors as the model reads them)
    resized to size x size, or the synthetic scene; N = len(bands) (default: the spec's)."""
    bands = tuple(spec.bands if bands is None else bands)
    if not images:
        return [synthetic_image(size, bands=len(bands))]
    from ds2d2_cli.data.dataset import read_image

    result = []
    for item in images:
        image = item if isinstance(item, torch.Tensor) else read_image(Path(item), spec, bands)
        if image.dim() != 3:
            raise InputError(f"verification images must be [{len(bands)}, H, W] tensors (got {tuple(image.shape)})")
        if image.shape[0] != len(bands):
            raise InputError(f"the model reads {bands_text(bands)}; the image has {image.shape[0]}",
                             None if isinstance(item, torch.Tensor) else item)
        image = image.float()
        if tuple(image.shape[1:]) != (size, size):
            image = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                                    align_corners=False)[0]
            if spec.is_rgb8:
                image = image.clamp_(0.0, 1.0)  # other scalings are not clipped (see ds2d2_cli.sample)
        result.append(image.contiguous())
    return result


def _checkpoint_images(images: Sequence[ImageLike] | None, checkpoint: Checkpoint) -> list[torch.Tensor]:
    """`verification_images` for what `checkpoint`'s model reads."""
    resolved = checkpoint.meta.input.resolved
    return verification_images(images, resolved.size, resolved.sample, resolved.bands)


def is_oriented_checkpoint(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's detector family predicts rotated boxes (`retinanet_obb`)."""
    from ds2d2_cli.models.families import get_family

    return bool(getattr(get_family(checkpoint.meta.model.detector), "oriented", False))


def oriented_nms_iou(checkpoint: Checkpoint) -> float:
    """The rotated NMS IoU threshold of the checkpoint's oriented detector (MMRotate's 0.1)."""
    from ds2d2_cli.models.families.retinanet_obb import NMS_THRESH

    return NMS_THRESH


def export_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """What an exported file says about itself (all strings; JSON where structured)."""
    meta = checkpoint.meta
    data = {
        "ds2d2_version": __version__,
        "stage": meta.stage,
        "detector": meta.model.detector,
        "backbone": meta.model.backbone,
        "fpn_channels": str(meta.model.fpn_channels),
        "classes": json.dumps(meta.classes),
        "labels": "label l is classes[l - 1] (category ids 1..C)",
        "input_size": str(meta.input.size),
        "bands": json.dumps(list(meta.input.resolved.bands)),
        "sample": meta.input.resolved.sample.model_dump_json(),
        "input_description": input_description(checkpoint),
        "normalisation": json.dumps({"mean": list(meta.input.resolved.mean), "std": list(meta.input.resolved.std)}),
        "score_thresh": str(meta.model.score_thresh),
        "detections_per_img": str(meta.model.detections_per_img),
        "source_checkpoint": checkpoint.path.name,
        "source_sha256": checkpoint.sha256,
        "preset": meta.preset,
    }
    if meta.method:
        data["method"] = meta.method
    if is_oriented_checkpoint(checkpoint):
        data.update({
            "boxes": "obb", "angle": "le90", "nms": "caller", "nms_iou": str(oriented_nms_iou(checkpoint)),
            "postprocess": "outputs stop before NMS: keep (row, class) with scores > score_thresh, rotated NMS "
                           "per class at nms_iou (ds2d2_cli.rotated.batched_rotated_nms, drops IoU > nms_iou), "
                           "best detections_per_img, labels = class column + 1, angles by normalize_le90 "
                           "(ds2d2_cli.models.families.retinanet_obb.select_oriented does all of it)",
        })
    return data


# ----------------------------------------------------------------------------- comparison


def _arr(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _as_numpy(det: dict[str, Any]) -> dict[str, np.ndarray]:
    """Boxes as x1, y1, x2, y2 `[K, 4]`, or, where the detections carry "rboxes", their corners `[K, 8]`."""
    if "rboxes" in det:
        from ds2d2_cli.rotated import rbox_to_poly

        boxes = rbox_to_poly(torch.from_numpy(_arr(det["rboxes"], np.float64).reshape(-1, 5))).numpy().reshape(-1, 8)
    else:
        boxes = _arr(det["boxes"], np.float64).reshape(-1, 4)
    return {"boxes": boxes, "scores": _arr(det["scores"], np.float64).reshape(-1),
            "labels": _arr(det["labels"], np.int64).reshape(-1)}


def _box_gaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far each of `others` `[C, D]` lies from `box` `[D]`: (largest coordinate difference, that
    over max(|coordinate of box|, 1)). Rotated boxes (D = 8, corners) are compared as corner sets (the
    larger of the two directed Chebyshev distances between them), so the first corner, a swap of w
    and h with the angle turned by 90 degrees, or an angle at the le90 wrap change nothing."""
    if box.shape[-1] == 8:
        a = box.reshape(1, 4, 1, 2)
        b = others.reshape(-1, 1, 4, 2)
        dist = np.abs(a - b).max(axis=-1)  # [C, 4 (box corners), 4 (other corners)]
        gap = np.maximum(dist.min(axis=2).max(axis=1), dist.min(axis=1).max(axis=1))
        return gap, gap / max(float(np.abs(box).max(initial=0.0)), 1.0)
    delta = np.abs(others - box)
    return delta.max(axis=1), (delta / np.maximum(np.abs(box), 1.0)).max(axis=1)


def compare_detections(reference: dict[str, Any], exported: dict[str, Any], *, score_thresh: float,
                       detections_per_img: int, tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    """Match one image's detections (boxes/scores/labels) of the exported model to PyTorch's.

    Detections are sorted by score; each reference detection is paired with the unused
    exported detection of the same label whose box is closest. A pair counts as matched
    when its boxes agree within BOX_RTOL (relative to max(|coordinate|, 1 px)) and its
    scores within SCORE_ATOL. Unpaired detections are allowed only near a cut-off (the
    score threshold, or the lowest kept score when the output is full): an untrained
    model's near-tied scores can fall either side of it by float noise. Anything else
    is a mismatch. `tolerance` overrides box_rel / score_abs / cutoff_abs. Detections with
    "rboxes" (both sides) are compared by their corners (`_box_gaps`).
    """
    tol = {**STRICT_TOLERANCE, **(tolerance or {})}
    ref, exp = _as_numpy(reference), _as_numpy(exported)
    ref_order = np.argsort(-ref["scores"], kind="stable")
    used = np.zeros(len(exp["scores"]), dtype=bool)
    box_abs: list[float] = []
    box_rel: list[float] = []
    score_abs: list[float] = []
    score_rel: list[float] = []
    unmatched_ref: list[int] = []
    for i in ref_order:
        candidates = np.flatnonzero((~used) & (exp["labels"] == ref["labels"][i]))
        if len(candidates) == 0:
            unmatched_ref.append(int(i))
            continue
        gaps, rels = _box_gaps(ref["boxes"][i], exp["boxes"][candidates])
        best = int(np.argmin(gaps))
        j = int(candidates[best])
        gap, rel = float(gaps[best]), float(rels[best])
        s_abs = float(abs(exp["scores"][j] - ref["scores"][i]))
        if rel > tol["box_rel"] or s_abs > tol["score_abs"]:
            unmatched_ref.append(int(i))
            continue
        used[j] = True
        box_abs.append(gap)
        box_rel.append(rel)
        score_abs.append(s_abs)
        score_rel.append(s_abs / max(float(abs(ref["scores"][i])), 1e-12))
    unmatched_exp = [int(j) for j in np.flatnonzero(~used)]

    def near_cutoff(scores: np.ndarray, index: int) -> bool:
        cutoffs = [score_thresh]
        if len(scores) >= detections_per_img:
            cutoffs.append(float(scores.min()))
        return any(abs(float(scores[index]) - c) <= tol["cutoff_abs"] for c in cutoffs)

    bad_ref = [i for i in unmatched_ref if not near_cutoff(ref["scores"], i)]
    bad_exp = [j for j in unmatched_exp if not near_cutoff(exp["scores"], j)]
    return {
        "detections_reference": int(len(ref["scores"])),
        "detections_exported": int(len(exp["scores"])),
        "matched": len(box_abs),
        "unmatched_near_cutoff": len(unmatched_ref) - len(bad_ref) + len(unmatched_exp) - len(bad_exp),
        "mismatched": len(bad_ref) + len(bad_exp),
        "max_box_abs_diff": max(box_abs, default=0.0),
        "max_box_rel_diff": max(box_rel, default=0.0),
        "max_score_abs_diff": max(score_abs, default=0.0),
        "max_score_rel_diff": max(score_rel, default=0.0),
        "example_mismatch": _describe(ref, bad_ref[0]) if bad_ref else (
            _describe(exp, bad_exp[0], "only in the export") if bad_exp else None),
    }


def compare_candidates(reference: dict[str, Any], exported: dict[str, Any],
                       tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    """An oriented export's pre-NMS outputs (rboxes `[M, 5]`, scores `[M, C]`, anchors `[M]`) against
    PyTorch's (`OrientedRetinaNet.candidates`), row by row through the anchor index: the rboxes'
    corners within box_rel (`_box_gaps`) and every class score within score_abs. An anchor kept
    by one runtime's per-level top-k only is allowed when it pairs with one kept by the other only
    whose best score lies within cutoff_abs (near-ties at the top-k cut-off); anything else is a
    mismatch."""
    tol = {**STRICT_TOLERANCE, **(tolerance or {})}
    ref = {k: _arr(reference[k], np.float64 if k != "anchors" else np.int64) for k in ("rboxes", "scores", "anchors")}
    exp = {k: _arr(exported[k], np.float64 if k != "anchors" else np.int64) for k in ("rboxes", "scores", "anchors")}
    common, ref_rows, exp_rows = np.intersect1d(ref["anchors"], exp["anchors"], return_indices=True)
    from ds2d2_cli.rotated import rbox_to_poly

    def corners(rboxes: np.ndarray) -> np.ndarray:
        return rbox_to_poly(torch.from_numpy(rboxes.reshape(-1, 5))).numpy().reshape(-1, 8)

    ref_poly, exp_poly = corners(ref["rboxes"][ref_rows]), corners(exp["rboxes"][exp_rows])
    box_abs = np.array([_box_gaps(r, e[None])[0][0] for r, e in zip(ref_poly, exp_poly)])
    box_rel = np.array([_box_gaps(r, e[None])[1][0] for r, e in zip(ref_poly, exp_poly)])
    score_abs = np.abs(ref["scores"][ref_rows] - exp["scores"][exp_rows]).max(axis=1, initial=0.0)
    bad_rows = int(((box_rel > tol["box_rel"]) | (score_abs > tol["score_abs"])).sum())
    only_ref = np.setdiff1d(np.arange(len(ref["anchors"])), ref_rows)
    only_exp = np.setdiff1d(np.arange(len(exp["anchors"])), exp_rows)
    best_ref = np.sort(ref["scores"][only_ref].max(axis=1, initial=0.0))
    best_exp = np.sort(exp["scores"][only_exp].max(axis=1, initial=0.0))
    unpaired = abs(len(best_ref) - len(best_exp))
    n = min(len(best_ref), len(best_exp))
    unpaired += int((np.abs(best_ref[:n] - best_exp[:n]) > tol["cutoff_abs"]).sum())
    return {"rows_reference": int(len(ref["anchors"])), "rows_exported": int(len(exp["anchors"])),
            "rows_matched": int(len(common)) - bad_rows, "rows_swapped_at_top_k": n,
            "mismatched": bad_rows + unpaired,
            "max_box_abs_diff": float(box_abs.max(initial=0.0)), "max_box_rel_diff": float(box_rel.max(initial=0.0)),
            "max_score_abs_diff": float(score_abs.max(initial=0.0))}


def _describe(det: dict[str, np.ndarray], index: int, where: str = "only in PyTorch") -> str:
    box = ", ".join(f"{v:.1f}" for v in det["boxes"][index])
    return f"label {det['labels'][index]} score {det['scores'][index]:.4f} box [{box}] {where}"


def _summarise(per_image: list[dict[str, Any]], what: str, *, strict: bool = True,
               tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = {"reference": "pytorch", "compared_with": what, "images": len(per_image)}
    for key in ("detections_reference", "detections_exported", "matched", "unmatched_near_cutoff", "mismatched"):
        summary[key] = sum(r[key] for r in per_image)
    for key in ("max_box_abs_diff", "max_box_rel_diff", "max_score_abs_diff", "max_score_rel_diff"):
        summary[key] = max((r[key] for r in per_image), default=0.0)
    summary["tolerance"] = {**STRICT_TOLERANCE, **(tolerance or {})}
    summary["passed"] = summary["mismatched"] == 0  # no detection without its counterpart
    # An untrained model (or an empty image) detects nothing in either runtime: a pass that checked nothing.
    summary["nothing_compared"] = summary["detections_reference"] == 0 and summary["detections_exported"] == 0
    summary["strict"] = strict
    summary["status"] = ("inconclusive" if summary["nothing_compared"] else "passed" if summary["passed"]
                         else "failed" if strict else "differs")
    if strict and not summary["passed"]:
        first = next(r["example_mismatch"] for r in per_image if r["mismatched"])
        raise Ds2d2Error(
            f"verification failed: {what} and PyTorch detections differ ({summary['mismatched']} without a "
            f"match; PyTorch {summary['detections_reference']}, {what} {summary['detections_exported']}, "
            f"{summary['matched']} matched), e.g. {first}"
        )
    return summary


@torch.no_grad()
def _torch_detections(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [model([image])[0] for image in images]


# ----------------------------------------------------------------------------- ONNX


ORIENTED_OUTPUTS = ("rboxes", "scores", "anchors")
DETECTION_OUTPUTS = ("boxes", "scores", "labels")


class _OnnxOrientedCandidates(nn.Module):
    """One [N, S, S] image in; an oriented detector's pre-NMS rboxes, scores, anchors out (see the module
    docstring). The image has the input size, so the detector's resize keeps it and its pixels are the input's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.model.candidates([image])[0]
        return found["rboxes"], found["scores"], found["anchors"]


class _OnnxDetector(nn.Module):
    """One [N, S, S] image in; boxes, scores, labels out (fixed order for both detectors)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def _require(*modules: str) -> None:
    """The optional `export` extra: a clear error instead of an ImportError when it is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Ds2d2Error(f"ONNX export needs {' and '.join(missing)}: pip install 'ds2d2[export]'")


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (got {opset})")


def onnx_bytes(model: nn.Module, size: int, opset: int = DEFAULT_OPSET) -> bytes:
    """The traced detector as an ONNX model (bytes), without metadata; its input has one
    channel per band the model normalises."""
    from ds2d2_cli.models.families import is_oriented

    _check_opset(opset)
    buffer = io.BytesIO()
    example = synthetic_image(size, bands=len(model.transform.image_mean))
    oriented = is_oriented(model)
    wrapper = _OnnxOrientedCandidates(model) if oriented else _OnnxDetector(model)
    outputs = ORIENTED_OUTPUTS if oriented else DETECTION_OUTPUTS
    rows = "candidates" if oriented else "detections"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer / deprecation chatter about torchvision internals
            torch.onnx.export(
                wrapper.eval(), (example,), buffer, opset_version=opset, dynamo=False,
                input_names=["image"], output_names=list(outputs),
                dynamic_axes={name: {0: rows} for name in outputs},
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - exporter failures are not the user's input
        first = (str(exc).strip().splitlines() or [""])[0]
        raise Ds2d2Error(f"ONNX export failed ({type(exc).__name__}: {first})") from None
    return buffer.getvalue()


def _onnx_with_metadata(data: bytes, metadata: dict[str, str], description: str) -> Any:
    """The ONNX model with ds2d2's metadata and a doc string naming its input and outputs."""
    import onnx

    model = onnx.load_from_string(data)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"ds2d2 detector: input {description}; outputs {_outputs_text(metadata.get('boxes') == 'obb')}"
    onnx.checker.check_model(model)
    return model


def _outputs_text(oriented: bool) -> str:
    if oriented:
        return ("rboxes [M, 5] le90 pixels, scores [M, C], anchors [M], before rotated NMS (left to the caller: "
                "see the metadata's postprocess)")
    return "boxes [K, 4] xyxy pixels, scores [K], labels [K] (classes[label - 1])"


def onnx_session(model: Any | bytes | str | Path, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session; `device="cuda"` uses the CUDA provider when this onnxruntime has it."""
    import onnxruntime as ort

    if not isinstance(model, (bytes, str, Path)):
        model = model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)


def verify_onnx(onnx_model: Any | bytes | str | Path, checkpoint: Checkpoint | str | Path,
                images: Sequence[ImageLike] | None = None, *, model: nn.Module | None = None) -> dict[str, Any]:
    """Run onnxruntime (CPU) and PyTorch on the same images; raise Ds2d2Error when detections differ."""
    _require("onnxruntime")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_detector_checkpoint(checkpoint)
    model = model if model is not None else _detector(checkpoint)
    inputs = _checkpoint_images(images, checkpoint)
    oriented = is_oriented_checkpoint(checkpoint)
    outputs = ORIENTED_OUTPUTS if oriented else DETECTION_OUTPUTS
    try:
        session = onnx_session(onnx_model)
        name = session.get_inputs()[0].name
        raw = [dict(zip(outputs, session.run(list(outputs), {name: image.numpy()}))) for image in inputs]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise Ds2d2Error(f"onnxruntime cannot run the exported model ({type(exc).__name__}: {first})") from None
    reference = _torch_detections(model, inputs)
    pre_nms = None
    if oriented:
        from ds2d2_cli.models.families.retinanet_obb import select_oriented

        with torch.no_grad():
            found = [model.candidates([image])[0] for image in inputs]
        pre_nms = _summarise_candidates([compare_candidates(f, r) for f, r in zip(found, raw)])
        meta = checkpoint.meta.model
        exported = [select_oriented(torch.from_numpy(r["rboxes"]), torch.from_numpy(r["scores"]), meta.score_thresh,
                                    oriented_nms_iou(checkpoint), meta.detections_per_img) for r in raw]
    else:
        exported = raw
    per_image = [compare_detections(r, e, score_thresh=checkpoint.meta.model.score_thresh,
                                    detections_per_img=checkpoint.meta.model.detections_per_img)
                 for r, e in zip(reference, exported)]
    summary = _summarise(per_image, "onnxruntime" + (" + select_oriented" if oriented else ""))
    if pre_nms is not None:
        summary["pre_nms"] = pre_nms
    return summary


def _summarise_candidates(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """The pre-NMS comparison over images; a Ds2d2Error when a row has no counterpart."""
    summary: dict[str, Any] = {"images": len(per_image)}
    for key in ("rows_reference", "rows_exported", "rows_matched", "rows_swapped_at_top_k", "mismatched"):
        summary[key] = sum(r[key] for r in per_image)
    for key in ("max_box_abs_diff", "max_box_rel_diff", "max_score_abs_diff"):
        summary[key] = max((r[key] for r in per_image), default=0.0)
    summary["passed"] = summary["mismatched"] == 0
    if not summary["passed"]:
        raise Ds2d2Error(
            f"verification failed: onnxruntime and PyTorch differ before NMS ({summary['mismatched']} of "
            f"{summary['rows_reference']} candidate rows; largest gaps: box {summary['max_box_abs_diff']:.3g} px, "
            f"score {summary['max_score_abs_diff']:.3g})")
    return summary


def export_onnx(checkpoint_path: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, verify: bool = False,
                images: Sequence[ImageLike] | None = None) -> dict[str, Any]:
    """Export the full detector (transform + post-processing) to ONNX; see the module docstring."""
    _check_opset(opset)
    _require("onnx", *(("onnxruntime",) if verify else ()))
    checkpoint = load_detector_checkpoint(checkpoint_path)
    out = _check_out(out, checkpoint)
    model = _detector(checkpoint)
    inputs = _checkpoint_images(images, checkpoint) if verify else None
    onnx_model = _onnx_with_metadata(onnx_bytes(model, checkpoint.meta.input.size, opset),
                                     export_metadata(checkpoint), input_description(checkpoint))
    figures = verify_onnx(onnx_model, checkpoint, inputs, model=model) if verify else None
    with atomic_path(out) as tmp:
        tmp.write_bytes(onnx_model.SerializeToString())
    oriented = is_oriented_checkpoint(checkpoint)
    extra = {"nms": "caller", "nms_iou": oriented_nms_iou(checkpoint)} if oriented else {}
    return _result(checkpoint, out, "onnx", figures, opset=opset, exporter=EXPORTER,
                   input=input_description(checkpoint), outputs=_outputs_text(oriented), **extra)


def _result(checkpoint: Checkpoint, out: Path, fmt: str, figures: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {
        "format": fmt, "file": str(out), "bytes": out.stat().st_size, "source": str(checkpoint.path),
        "source_bytes": checkpoint.path.stat().st_size, "source_sha256": checkpoint.sha256,
        "stage": checkpoint.meta.stage, "detector": checkpoint.meta.model.detector,
        "backbone": checkpoint.meta.model.backbone, "input_size": checkpoint.meta.input.size,
        "classes": list(checkpoint.meta.classes), **extra, "verify": figures,
    }


# ----------------------------------------------------------------------------- TorchScript


class _ScriptedDetector(nn.Module):
    """`model(images)` -> detections, without the (losses, detections) tuple of scripted torchvision."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        return self.model(images)[1]


def load_torchscript(path: str | Path) -> tuple[Any, dict[str, str]]:
    """A TorchScript export and its ds2d2 metadata."""
    extra = {TORCHSCRIPT_META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[TORCHSCRIPT_META_FILE]
    return module, json.loads(raw.decode() if isinstance(raw, bytes) else raw or "{}")


@torch.no_grad()
def _scripted_detections(module: Any, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "always returns a (Losses, Detections) tuple in scripting"
        return [module([image])[0] for image in images]


def export_torchscript(checkpoint_path: str | Path, out: str | Path, *, verify: bool = False,
                       images: Sequence[ImageLike] | None = None) -> dict[str, Any]:
    """`torch.jit.script` of the detector; with `verify`, the saved file is reloaded and compared."""
    checkpoint = load_detector_checkpoint(checkpoint_path)
    if is_oriented_checkpoint(checkpoint):
        raise InputError(f"TorchScript cannot script the oriented detector {checkpoint.meta.model.detector}; "
                         "export it with --format onnx (rotated NMS left to the caller) or safetensors",
                         checkpoint.path)
    out = _check_out(out, checkpoint)
    model = _detector(checkpoint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(_ScriptedDetector(model).eval())
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        raise Ds2d2Error(f"TorchScript export failed ({type(exc).__name__}: {first})") from None
    figures = None
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(scripted, str(tmp),
                           _extra_files={TORCHSCRIPT_META_FILE: json.dumps(export_metadata(checkpoint))})
        if verify:
            inputs = _checkpoint_images(images, checkpoint)
            loaded, _ = load_torchscript(tmp)
            reference = _torch_detections(model, inputs)
            exported = _scripted_detections(loaded, inputs)
            figures = _summarise([
                compare_detections(r, e, score_thresh=checkpoint.meta.model.score_thresh,
                                   detections_per_img=checkpoint.meta.model.detections_per_img)
                for r, e in zip(reference, exported)], "TorchScript")
    return _result(checkpoint, out, "torchscript", figures, exporter="torch.jit.script",
                   input=f"List[Tensor[{checkpoint.meta.input.channels}, H, W]] as the ONNX image (any H, W)",
                   outputs="List[Dict[boxes, scores, labels]]")


# ----------------------------------------------------------------------------- fp16 safetensors


def export_safetensors_fp16(checkpoint_path: str | Path, out: str | Path, *, verify: bool = False,
                            images: Sequence[ImageLike] | None = None) -> dict[str, Any]:
    """Half-precision weights with the checkpoint's metadata (+ `dtype=float16`).

    With `verify`, the written file is loaded back through `load_checkpoint` and
    `model_from_checkpoint` and its detections compared with the float32 model's. fp16
    rounding moves scores and boxes slightly, so pairs are matched with FP16_TOLERANCE and
    the figures are informational (the check fails only when the file cannot be loaded back).
    """
    from safetensors.torch import save_file

    checkpoint = load_detector_checkpoint(checkpoint_path)
    out = _check_out(out, checkpoint)
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
               for k, v in checkpoint.tensors.items()}
    metadata = checkpoint.meta.to_strings()
    metadata.update({"dtype": "float16", "source_sha256": checkpoint.sha256})
    figures = None
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if verify:
            half = load_checkpoint(tmp)
            inputs = _checkpoint_images(images, checkpoint)
            reference = _torch_detections(_detector(checkpoint), inputs)
            exported = _torch_detections(_detector(half), inputs)
            figures = _summarise([
                compare_detections(r, e, score_thresh=checkpoint.meta.model.score_thresh,
                                   detections_per_img=checkpoint.meta.model.detections_per_img,
                                   tolerance=FP16_TOLERANCE)
                for r, e in zip(reference, exported)], "fp16 weights", strict=False, tolerance=FP16_TOLERANCE)
    return _result(checkpoint, out, "safetensors", figures, dtype="float16")


def export_checkpoint(checkpoint_path: str | Path, out: str | Path | None = None, fmt: str = "onnx", *,
                      verify: bool = False, images: Sequence[ImageLike] | None = None,
                      opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Dispatch on `fmt` (onnx / torchscript / safetensors); `out` defaults to `default_output`."""
    check_format(fmt)
    out = Path(out) if out is not None else default_output(checkpoint_path, fmt)
    if fmt == "onnx":
        return export_onnx(checkpoint_path, out, opset=opset, verify=verify, images=images)
    if fmt == "torchscript":
        return export_torchscript(checkpoint_path, out, verify=verify, images=images)
    return export_safetensors_fp16(checkpoint_path, out, verify=verify, images=images)
