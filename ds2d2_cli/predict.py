"""Detections on new images: a checkpoint or an exported ONNX model over image files, whole or tiled.

Models (`load_predictor`)
    A teacher or student ``.safetensors`` checkpoint (run by PyTorch on the chosen device,
    images batched) or an ONNX file written by ``ds2d2 export`` (run by onnxruntime on the
    CPU; class names, input size, score threshold, bands and sample spec come from its
    ``metadata_props``; an export without ``bands``/``sample`` reads 8-bit RGB).
    Both are a `Predictor`: it names the bands it reads (``.bands``) and how stored pixels
    become its floats (``.sample``, the training data's `SampleSpec`); ``predictor(images)``
    takes a list of ``[C, H, W]`` float tensors (those bands, already scaled) and returns one
    dict per image with ``boxes`` ``[K, 4]`` (x1, y1, x2, y2 in that image's pixels),
    ``scores`` ``[K]`` and ``labels`` ``[K]`` (category id 1..C: class name =
    ``classes[label - 1]``). The checkpoint's detector resizes each image to its input size
    itself; the ONNX graph takes one ``[C, S, S]`` image, so each image is padded with zeros
    to a square on the right/bottom, resized to S x S and its boxes are scaled back (the
    aspect ratio is kept, as the checkpoint's detector keeps it).

Oriented models (``retinanet_obb``; `is_oriented_predictor`)
    Their detections also carry ``rboxes`` ``[K, 5]`` (cx, cy, w, h, theta; le90, image
    pixels) and ``boxes`` are those boxes' envelopes. An oriented ONNX export stops before
    rotated NMS (see `ds2d2_cli.export`); its predictor finishes it with the checkpoint's own
    last step (`retinanet_obb.select_oriented`: score cut-off, rotated NMS at the metadata's
    ``nms_iou``, top ``detections_per_img``), so ``--score-thr`` can lower its cut-off too.
    Tiles are merged by class-wise rotated NMS (`tiling.rotated_merge_order`) at the DOTA
    devkit's ResultMerge threshold 0.3 (`dota_task1.MERGE_IOU_THRESHOLD`, the rule
    ``eval --merge-patches`` uses; `merge_iou`), rotated boxes are not clipped to the scene
    (those whose centre lies in a window's padding past the border are dropped), pictures
    show their polygons and GeoJSON their own corners. ``task1=True`` (``--task1``) also
    writes ``OUT/task1/Task1_<class>.txt`` (`dota_task1.write_task1_submission`; each image
    named by its file stem, which must be unique and free of white space), the files the
    DOTA evaluation server takes; a horizontal model refuses it.

Bands (`image_bands`)
    Files are read by `raster.read_raster` (PNG/JPEG/BMP through PIL, TIFF/GeoTIFF through
    rasterio) and the model's bands picked from them by name; an image without one of them
    is refused with one line naming it. Pixels are scaled exactly as in training
    (`SampleSpec.to_float`; /255 for 8-bit RGB).

Large scenes (`slice_windows`, `predict_scene`)
    Aerial scenes are far larger than the input size and their objects a few pixels wide;
    shrinking a whole 4000 px scene to 1024 px loses them. With ``slice_size`` the scene
    is cut into ``slice_size`` windows as the DOTA devkit's ImgSplit does (step
    ``slice_size - overlap``; the last window in each direction moved back to end at the
    border; a scene smaller than the window gets one window at 0, padded with zeros), each
    window is detected on its own, and the detections are shifted to scene coordinates,
    clipped to the scene and merged with class-wise NMS (`torchvision.ops.batched_nms`, IoU 0.5),
    so an object seen by two overlapping windows is reported once. A TIFF is then read
    window by window from the file, never decoded whole, so scenes larger than memory work.

Files (`predict_paths`)
    ``OUT/predictions.json``: a COCO results list ``[{image_id, category_id, bbox [x, y, w,
    h], score[, rbox]}]``; ``OUT/images.json``: ``{"images": [{id, file_name (absolute), width,
    height[, crs, transform]}], "categories": [{id, name}]}``, so ``COCO("images.json").loadRes(
    "predictions.json")`` pairs them; ``OUT/<stem>.png``: each image with its detections
    drawn (non-RGB8 images on a stretched picture, see `picture`); ``OUT/<stem>.geojson``
    for each georeferenced image: its detections as map polygons (`detections_geojson`).
    Nothing is left behind on failure: every file is written to a hidden staging folder
    inside OUT and moved into place (`os.replace`, predictions.json last) only once every
    image is done; a failed run removes the staging folder (and OUT, if it created it).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ds2d2_cli.data import raster, validate
from ds2d2_cli.data.coco_writer import categories
from ds2d2_cli.data.raster import RasterInfo
from ds2d2_cli.data.tiling import (check_window, merge_order, rotated_merge_order,  # noqa: F401
                                   slice_windows)  # slice_windows: public API here too
from ds2d2_cli.dota_task1 import MERGE_IOU_THRESHOLD
from ds2d2_cli.errors import Ds2d2Error, InputError, one_line
from ds2d2_cli.evaluation import detections_to_coco
from ds2d2_cli.fileio import staging, write_json
from ds2d2_cli.geojson import crs_member, detections_geojson, map_corners  # noqa: F401 - public API here too
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.sample import RGB, SampleSpec, bands_text

IMAGE_EXTS: tuple[str, ...] = validate.IMAGE_EXTS  # what `raster.read_raster` reads
DEFAULT_NMS_IOU = 0.5
DEFAULT_OVERLAP = 200
DEFAULT_BATCH_SIZE = 8
LARGE_FACTOR = 2.0  # without slicing, warn about images whose longer side exceeds this x the input size
PREDICTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
TASK1_FOLDER = "task1"  # OUT/task1/Task1_<class>.txt with --task1
ONNX_META_KEYS = ("classes", "input_size", "score_thresh")
STRETCH_PIXELS = 1 << 22  # pixels sampled for a picture's 1st..99th percentile stretch
STRIP_ROWS = 512  # rows read at a time when a picture is made from a TIFF read window by window

Detections = dict[str, torch.Tensor]
Window = tuple[int, int, int, int]  # left, top, width, height


class Predictor(Protocol):
    """A detector over the model's floats `[C, H, W]` (see the module docstring).

    `bands` and `sample` may be left out: such a predictor reads 8-bit RGB (`SampleSpec()`).
    """

    classes: list[str]
    input_size: int
    score_thresh: float  # the lowest score it reports
    description: str
    bands: tuple[str, ...]  # the bands it reads, in order
    sample: SampleSpec  # how stored pixels become its floats (the training data's spec)

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]: ...


# ----------------------------------------------------------------------------- models


class CheckpointPredictor:
    """A teacher or student checkpoint rebuilt as its torchvision detector (eval mode, no autograd)."""

    kind = "checkpoint"

    def __init__(self, checkpoint: Any, device: torch.device | str = "cpu", score_thresh: float | None = None):
        from ds2d2_cli.models.detectors import model_from_checkpoint
        from ds2d2_cli.models.families import family_of

        meta = checkpoint.meta
        resolved = meta.input.resolved  # older checkpoints (no sample spec) read 8-bit RGB
        self.path = Path(checkpoint.path)
        self.classes = list(meta.classes)
        self.input_size = int(meta.input.size)
        self.bands = tuple(resolved.bands)
        self.sample = resolved.sample
        self.device = torch.device(device)
        self.score_thresh = float(meta.model.score_thresh if score_thresh is None else score_thresh)
        self.description = f"{meta.stage}: {meta.model.detector} {meta.model.backbone}"
        self.model = model_from_checkpoint(checkpoint, self.device)
        family = family_of(self.model)
        family.set_score_thresh(self.model, self.score_thresh)
        self.oriented = bool(getattr(family, "oriented", False))

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        if not images:
            return []
        outputs = self.model([image.to(self.device, torch.float32) for image in images])
        keys = ("boxes", "scores", "labels", "rboxes") if self.oriented else ("boxes", "scores", "labels")
        return [{k: (out[k].cpu() if k == "labels" else out[k].float().cpu()) for k in keys} for out in outputs]


class OnnxPredictor:
    """An ONNX file from `ds2d2 export`, run by onnxruntime on the CPU, one image at a time."""

    kind = "onnx"
    device = torch.device("cpu")

    def __init__(self, path: str | Path, score_thresh: float | None = None):
        from ds2d2_cli.export import DETECTION_OUTPUTS, ORIENTED_OUTPUTS, onnx_session

        self.path = Path(path)
        try:
            self.session = onnx_session(self.path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputError(f"not a readable ONNX model ({type(exc).__name__}: {first})", self.path) from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if any(key not in meta for key in ONNX_META_KEYS):
            raise InputError("an ONNX model without ds2d2 metadata (classes, input size); "
                             "predict with a file written by `ds2d2 export`", self.path)
        try:
            self.classes = [str(c) for c in json.loads(meta["classes"])]
            self.input_size = int(meta["input_size"])
            self.score_thresh = float(meta["score_thresh"])
            # exports written before bands existed carry neither: they read 8-bit RGB
            self.sample = SampleSpec.model_validate_json(meta["sample"]) if "sample" in meta else SampleSpec()
            self.bands = (tuple(str(b) for b in json.loads(meta["bands"])) if "bands" in meta
                          else self.sample.bands)
            reading_spec(self.sample, self.bands)
            # an oriented export stops before rotated NMS, so its score cut-off is applied here and may be lowered
            self.oriented = meta.get("boxes") == "obb"
            if self.oriented:
                self.nms_iou = float(meta["nms_iou"])
                self.detections_per_img = int(meta["detections_per_img"])
                if score_thresh is not None:
                    self.score_thresh = float(score_thresh)
        except (ValueError, TypeError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
            raise InputError(f"damaged ds2d2 metadata in this ONNX model ({one_line(exc)})", self.path) from None
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        self.outputs = ORIENTED_OUTPUTS[:2] if self.oriented else DETECTION_OUTPUTS
        expected = ORIENTED_OUTPUTS if self.oriented else DETECTION_OUTPUTS
        if len(inputs) != 1 or not set(expected) <= outputs or self.input_size <= 0:
            raise InputError(f"not a ds2d2 detector export (expected input `image` and outputs {', '.join(expected)})",
                             self.path)
        channels = (list(inputs[0].shape) or [None])[0]
        if isinstance(channels, int) and channels != len(self.bands):
            raise InputError(f"damaged ds2d2 metadata in this ONNX model (its input has {channels} channels, "
                             f"its metadata names {len(self.bands)} bands)", self.path)
        self.input_name = inputs[0].name
        self.description = f"{meta.get('stage', '?')}: {meta.get('detector', '?')} {meta.get('backbone', '?')} (ONNX)"

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        return [self._one(image) for image in images]

    def _one(self, image: torch.Tensor) -> Detections:
        size = self.input_size
        _, height, width = image.shape
        side = max(height, width)
        square = image.float()
        if height != width:
            square = torch.nn.functional.pad(square, (0, side - width, 0, side - height))
        if side != size:
            square = torch.nn.functional.interpolate(square[None], size=(size, size), mode="bilinear",
                                                     align_corners=False)[0]
            if self.sample.is_rgb8:  # 0..1 values stay in 0..1; other scalings are not clipped
                square = square.clamp_(0.0, 1.0)
        try:
            found = self.session.run(list(self.outputs), {self.input_name: square.contiguous().numpy()})
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [""])[0]
            raise Ds2d2Error(f"onnxruntime failed on an image ({type(exc).__name__}: {first})", self.path) from None
        if self.oriented:
            return self._oriented(*found, scale=side / size, width=width, height=height)
        boxes, scores, labels = found
        boxes = torch.from_numpy(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * (side / size)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return {"boxes": boxes, "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)).reshape(-1),
                "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)).reshape(-1)}


    def _oriented(self, rboxes: np.ndarray, scores: np.ndarray, *, scale: float, width: int,
                  height: int) -> Detections:
        """The export's pre-NMS rows finished as the checkpoint finishes them (`select_oriented`), then
        scaled back to the image (one ratio: centres and sides, the angle kept), centres clamped into it."""
        from ds2d2_cli.models.families.retinanet_obb import select_oriented
        from ds2d2_cli.rotated import rbox_envelope

        det = select_oriented(torch.from_numpy(np.asarray(rboxes, np.float32)).reshape(-1, 5),
                              torch.from_numpy(np.asarray(scores, np.float32)).reshape(len(rboxes), -1),
                              self.score_thresh, self.nms_iou, self.detections_per_img)
        rb = det["rboxes"] * torch.tensor([scale, scale, scale, scale, 1.0])
        rb[:, 0] = rb[:, 0].clamp(0, width)
        rb[:, 1] = rb[:, 1].clamp(0, height)
        return {"rboxes": rb, "boxes": rbox_envelope(rb), "scores": det["scores"], "labels": det["labels"]}


def _require_onnxruntime() -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise Ds2d2Error("running an ONNX model needs onnxruntime: pip install 'ds2d2[export]'")


def load_predictor(path: str | Path, device: torch.device | str = "cpu",
                   score_thresh: float | None = None) -> CheckpointPredictor | OnnxPredictor:
    """A `.onnx` export or a teacher/student checkpoint, ready to predict.

    `score_thresh` replaces a checkpoint detector's own cut-off (lower finds more), and an
    oriented export's (it stops before the cut-off); a horizontal ONNX export has its cut-off
    built in (`.score_thresh`), so there it only filters afterwards.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise InputError("model file not found", path)
        _require_onnxruntime()
        return OnnxPredictor(path, score_thresh)
    from ds2d2_cli.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    if checkpoint.meta.stage not in ("teacher", "student"):
        raise InputError(f"this is an {checkpoint.meta.stage} checkpoint, not a detector; "
                         "predict with a teacher or student checkpoint (or its ONNX export)", path)
    return CheckpointPredictor(checkpoint, device, score_thresh)


# ----------------------------------------------------------------------------- bands


def reading_spec(sample: SampleSpec, bands: Sequence[str]) -> SampleSpec:
    """`sample` narrowed to `bands` (in that order): how the stored values of just those bands become floats."""
    bands = tuple(bands)
    if bands == sample.bands:
        return sample
    missing = [b for b in bands if b not in sample.bands]
    if missing:
        raise ValueError(f"bands {', '.join(missing)} are not in the sample spec ({', '.join(sample.bands)})")
    index = sample.band_indices(bands)

    def pick(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if values is None else tuple(values[i] for i in index)

    return SampleSpec(bands=bands, dtype=sample.dtype, scaling=sample.scaling, low=pick(sample.low),
                      high=pick(sample.high), mean=pick(sample.mean), std=pick(sample.std),
                      box_format=sample.box_format)


def model_reading(predictor: Predictor) -> tuple[tuple[str, ...], SampleSpec]:
    """The bands a predictor reads and the spec that scales exactly those (8-bit RGB if it names none)."""
    sample = getattr(predictor, "sample", None) or SampleSpec()
    bands = tuple(getattr(predictor, "bands", None) or sample.bands)
    return bands, reading_spec(sample, bands)


def _unnamed(bands: Sequence[str]) -> bool:
    return tuple(bands) == tuple(f"b{i}" for i in range(1, len(bands) + 1))


def image_bands(info: RasterInfo, bands: Sequence[str], sample: SampleSpec) -> list[int]:
    """Where the model's `bands` are among the image's (indices into what `read_raster` returns).

    Matched by name. Unnamed bands (``b1 .. bN``, on the image's side or the training
    data's) carry no names to match, so when the image has exactly as many bands as the
    training data (`sample.bands`) they are taken in that data's order. An image without
    one of the model's bands is an InputError naming it.
    """
    names = tuple(info.bands)
    if len(names) == len(sample.bands) and (_unnamed(names) or _unnamed(sample.bands)):
        names = sample.bands
    if any(b not in names for b in bands):
        raise InputError(f"the model reads {bands_text(bands)}; this image has {len(info.bands)} "
                         f"({', '.join(info.bands)})", info.path)
    return [names.index(b) for b in bands]


# ----------------------------------------------------------------------------- tiling


def check_slice(size: int, overlap: int) -> None:
    check_window(size, overlap, "--slice", "--overlap")


def default_overlap(slice_size: int) -> int:
    """200 px (the usual DOTA split gap) for 1024 px windows; a quarter of smaller windows."""
    return min(DEFAULT_OVERLAP, slice_size // 4)


@dataclass(frozen=True)
class _Scene:
    """One image's stored values of the model's bands, read whole (`None`) or one window at a time."""

    width: int
    height: int
    read: Callable[[Window | None], Any]  # -> [C, h, w] (numpy or torch), the window clipped to the image


def _in_memory(pixels: Any) -> _Scene:
    def read(window: Window | None) -> Any:
        if window is None:
            return pixels
        left, top, width, height = window
        return pixels[:, top:top + height, left:left + width]

    return _Scene(int(pixels.shape[2]), int(pixels.shape[1]), read)


def _window(scene: _Scene, origin: tuple[int, int] | None, size: int | None, reading: SampleSpec) -> torch.Tensor:
    """The whole image, or one `size` x `size` window of it padded with zeros past the border, as model floats."""
    if origin is None or size is None:
        return reading.to_float(scene.read(None)).contiguous()
    x0, y0 = origin
    crop = reading.to_float(scene.read((x0, y0, size, size)))
    if crop.shape[1:] == (size, size):
        return crop.contiguous()
    tile = torch.zeros((crop.shape[0], size, size), dtype=torch.float32)
    tile[:, :crop.shape[1], :crop.shape[2]] = crop
    return tile


def is_oriented_predictor(predictor: Predictor) -> bool:
    """Whether the predictor's detections carry rotated boxes ("rboxes", le90) beside their envelopes."""
    return bool(getattr(predictor, "oriented", False))


def merge_iou(predictor: Predictor, nms_iou: float | None = None) -> float:
    """The IoU above which tile detections of one class are merged: `nms_iou`, or by default 0.5
    (`DEFAULT_NMS_IOU`) for horizontal boxes and the DOTA devkit's ResultMerge threshold
    (`dota_task1.MERGE_IOU_THRESHOLD`, 0.3) for rotated ones, the rule `eval --merge-patches` uses."""
    if nms_iou is not None:
        return float(nms_iou)
    return MERGE_IOU_THRESHOLD if is_oriented_predictor(predictor) else DEFAULT_NMS_IOU


def _empty(oriented: bool = False) -> Detections:
    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    if oriented:
        empty["rboxes"] = torch.zeros((0, 5), dtype=torch.float64)
    return empty


def _merge_oriented(pieces: list[tuple[tuple[int, int] | None, Detections]], width: int, height: int,
                    score_thresh: float, nms_iou: float) -> Detections:
    """Oriented window detections -> scene detections: centres shifted (float64), detections whose
    centre lies past the scene border (in a window's zero padding) dropped, class-wise rotated NMS
    across windows (`tiling.rotated_merge_order`). Rotated boxes are not clipped (the devkit's
    ResultMerge does not clip either), so their envelopes ("boxes") may reach past the border."""
    from ds2d2_cli.rotated import rbox_envelope

    if not pieces:
        return _empty(oriented=True)
    rboxes, scores, labels = [], [], []
    for origin, det in pieces:
        r = det["rboxes"].detach().cpu().to(torch.float64).reshape(-1, 5).clone()
        if origin is not None:
            r[:, 0] += origin[0]
            r[:, 1] += origin[1]
        rboxes.append(r)
        scores.append(det["scores"].detach().float().cpu().reshape(-1))
        labels.append(det["labels"].detach().cpu().reshape(-1).to(torch.int64))
    rbox, score, label = torch.cat(rboxes), torch.cat(scores), torch.cat(labels)
    keep = ((score >= score_thresh) & (label > 0) & (rbox[:, 2] > 0) & (rbox[:, 3] > 0)
            & (rbox[:, 0] >= 0) & (rbox[:, 0] <= width) & (rbox[:, 1] >= 0) & (rbox[:, 1] <= height))
    rbox, score, label = rbox[keep], score[keep], label[keep]
    if len(pieces) > 1:
        order = rotated_merge_order(rbox, score, label, nms_iou)
    else:  # one window: the detector has already run its own NMS
        order = torch.argsort(score, descending=True, stable=True)
    rbox = rbox[order]
    return {"boxes": rbox_envelope(rbox).float(), "scores": score[order], "labels": label[order], "rboxes": rbox}


def _merge(pieces: list[tuple[tuple[int, int] | None, Detections]], width: int, height: int,
           score_thresh: float, nms_iou: float, oriented: bool = False) -> Detections:
    """Window detections -> scene detections: shift, clip, filter, class-wise NMS across windows
    (rotated boxes: `_merge_oriented`)."""
    from torchvision.ops import clip_boxes_to_image

    if oriented:
        return _merge_oriented(pieces, width, height, score_thresh, nms_iou)
    if not pieces:
        return _empty()
    boxes, scores, labels = [], [], []
    for origin, det in pieces:
        b = det["boxes"].detach().float().cpu().reshape(-1, 4).clone()
        if origin is not None:
            b[:, 0::2] += origin[0]
            b[:, 1::2] += origin[1]
        boxes.append(b)
        scores.append(det["scores"].detach().float().cpu().reshape(-1))
        labels.append(det["labels"].detach().cpu().reshape(-1).to(torch.int64))
    box = clip_boxes_to_image(torch.cat(boxes), (height, width))
    score, label = torch.cat(scores), torch.cat(labels)
    keep = (score >= score_thresh) & (label > 0) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    box, score, label = box[keep], score[keep], label[keep]
    if len(pieces) > 1:
        order = merge_order(box, score, label, nms_iou)
    else:  # one window: the detector has already run its own NMS
        order = torch.argsort(score, descending=True, stable=True)
    return {"boxes": box[order], "scores": score[order], "labels": label[order]}


def _predict(predictor: Predictor, scenes: Sequence[_Scene], reading: SampleSpec, slice_size: int | None,
             overlap: int, nms_iou: float | None, threshold: float, batch_size: int) -> list[Detections]:
    """Whole scenes (or all windows of all scenes) through the predictor `batch_size` at a time;
    windows are read and scaled only when their batch comes, so a huge scene never exists as floats."""
    jobs: list[tuple[int, tuple[int, int] | None]] = []
    for index, scene in enumerate(scenes):
        if slice_size is None:
            jobs.append((index, None))
        else:
            jobs.extend((index, origin) for origin in slice_windows(scene.width, scene.height, slice_size, overlap))
    pieces: list[list[tuple[tuple[int, int] | None, Detections]]] = [[] for _ in scenes]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        outputs = predictor([_window(scenes[i], origin, slice_size, reading) for i, origin in batch])
        for (index, origin), det in zip(batch, outputs):
            pieces[index].append((origin, det))
    oriented = is_oriented_predictor(predictor)
    iou = merge_iou(predictor, nms_iou)
    return [_merge(pieces[i], s.width, s.height, threshold, iou, oriented) for i, s in enumerate(scenes)]


def predict_images(predictor: Predictor, images: Sequence[torch.Tensor | np.ndarray], *,
                   slice_size: int | None = None, overlap: int = DEFAULT_OVERLAP, nms_iou: float | None = None,
                   score_thresh: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> list[Detections]:
    """Scene detections for each image, whole or tiled.

    Each image is `[C, H, W]` STORED pixel values (tensor or array) of the model's bands in
    its order (`predictor.bands`; red, green, blue for a predictor that names none): uint8,
    uint16 or float as `raster.read_raster` returns them, scaled here by the model's
    `SampleSpec` exactly as in training (uint8 RGB: /255). Floats already scaled to 0..1
    are refused for a model trained on integer pixels, rather than scaled a second time.
    Returned boxes are in scene pixels, sorted by score, all scores >= `score_thresh`
    (default: the predictor's own); an oriented predictor's also carry "rboxes" (le90, float64).
    Tiles are merged at `nms_iou` (default: `merge_iou`).
    """
    _check_numbers(nms_iou, score_thresh, batch_size)
    if slice_size is not None:
        check_slice(slice_size, overlap)
    bands, reading = model_reading(predictor)
    integer = np.dtype(reading.dtype).kind in "ui"
    for image in images:
        if image.ndim != 3 or image.shape[0] != len(bands):
            raise InputError(f"images must be [{len(bands)}, H, W]: the model reads {bands_text(bands)} "
                             f"(got {tuple(image.shape)})")
        floating = image.is_floating_point() if isinstance(image, torch.Tensor) else image.dtype.kind == "f"
        if floating and integer:
            raise InputError(f"images are stored pixel values ({reading.dtype} for this model, as "
                             f"raster.read_raster returns them), not floats (got {image.dtype})")
    threshold = predictor.score_thresh if score_thresh is None else float(score_thresh)
    return _predict(predictor, [_in_memory(image) for image in images], reading, slice_size, overlap, nms_iou,
                    threshold, batch_size)


def predict_scene(predictor: Predictor, image: torch.Tensor | np.ndarray, *, slice_size: int | None = None,
                  overlap: int = DEFAULT_OVERLAP, nms_iou: float | None = None, score_thresh: float | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> Detections:
    """One scene's detections in scene pixels (see `predict_images`)."""
    return predict_images(predictor, [image], slice_size=slice_size, overlap=overlap, nms_iou=nms_iou,
                          score_thresh=score_thresh, batch_size=batch_size)[0]


def _check_numbers(nms_iou: float | None, score_thresh: float | None, batch_size: int) -> None:
    if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
        raise InputError(f"--nms-iou must be in (0, 1] (got {nms_iou})")
    if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
        raise InputError(f"--score-thr must be between 0 and 1 (got {score_thresh})")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")


# ----------------------------------------------------------------------------- images


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (folders: their PNG/JPEG/BMP/TIFF files, not recursive, sorted)."""
    if not inputs:
        raise InputError("give at least one image file or folder")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not images:
                raise InputError("no PNG, JPEG, BMP or TIFF images in this folder", path)
            found.extend(images)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTS:
                raise InputError(f"unsupported image type {path.suffix or '(no extension)'!r}; "
                                 "use PNG, JPEG, BMP or TIFF", path)
            found.append(path)
        elif path.exists():
            raise InputError("not a file or folder", path)
        else:
            raise InputError("no such file or folder", path)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _select(array: Any, index: list[int]) -> Any:
    return array if index == list(range(array.shape[0])) else array[index]


def _decode(path: Path) -> np.ndarray:
    """The whole file as `read_raster` returns it, writable (PIL's pixels are a read-only view; torch wants
    its own)."""
    array = raster.read_raster(path)
    return array if array.flags.writeable else array.copy()


def load_image(path: str | Path, predictor: Predictor | None = None) -> np.ndarray:
    """A whole image's stored pixels of `predictor`'s bands (`[C, H, W]`, in its order; RGB without
    one), ready for `predict_scene`; an InputError naming the file when it lacks one of them."""
    path = Path(path)
    bands, reading = model_reading(predictor)
    return _select(_decode(path), image_bands(raster.probe(path), bands, reading))


def _file_scene(info: RasterInfo, index: list[int], stored: np.ndarray | None) -> _Scene:
    """The model's bands of a file: from its decoded pixels, or (`stored` None) window by window from the file."""
    if stored is not None:
        return _in_memory(_select(stored, index))

    def read(window: Window | None) -> np.ndarray:
        return _select(raster.read_raster(info.path, window=window), index)

    return _Scene(info.width, info.height, read)


def picture(info: RasterInfo, stored: np.ndarray | None = None) -> Any:
    """An 8-bit RGB picture (PIL) of an image, to draw detections on.

    8-bit red/green/blue images as they are; any other image from its red, green and blue
    bands if it has them, else its first band as grey, each band stretched linearly from its
    1st to its 99th percentile (measured on at most `STRETCH_PIXELS` pixels) to 0..255.
    `stored` is the whole image as `read_raster` returns it; without it the file is read
    `STRIP_ROWS` rows at a time, so only the 8-bit picture is ever whole in memory.
    """
    from PIL import Image

    rgb8 = info.dtype == "uint8" and tuple(info.bands) == RGB
    chosen = [info.bands.index(b) for b in RGB] if set(RGB) <= set(info.bands) else [0]
    width, height = info.width, info.height

    def rows(top: int, count: int) -> np.ndarray:
        if stored is not None:
            return stored[chosen, top:top + count]
        return raster.read_raster(info.path, window=(0, top, width, count))[chosen]

    if rgb8 and stored is not None:
        return Image.fromarray(np.ascontiguousarray(stored.transpose(1, 2, 0)))
    low = high = None
    if not rgb8:
        step = max(1, math.ceil(math.sqrt(width * height / STRETCH_PIXELS)))
        if stored is not None:
            sample = stored[chosen, ::step, ::step]
        else:
            shape = (max(1, height // step), max(1, width // step))
            sample = raster.read_raster(info.path, out_shape=None if step == 1 else shape)[chosen]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a band of NaN only: stretched to black below
            low, high = np.nanpercentile(sample.reshape(len(chosen), -1).astype(np.float64), (1.0, 99.0), axis=1)
        low, high = np.nan_to_num(low), np.nan_to_num(high)
        high = np.where(high > low, high, low + 1.0)
    canvas = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, STRIP_ROWS):
        strip = rows(top, min(STRIP_ROWS, height - top))
        if low is not None:
            scaled = (strip.astype(np.float32) - low[:, None, None].astype(np.float32)) \
                / (high - low)[:, None, None].astype(np.float32)
            strip = np.rint(np.nan_to_num(np.clip(scaled, 0.0, 1.0)) * 255.0).astype(np.uint8)
        canvas[top:top + strip.shape[1]] = strip.transpose(1, 2, 0)  # a grey band fills all three
    return Image.fromarray(canvas)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _put_text(draw: Any, xy: tuple[float, float], text: str, font: Any, fill: Any) -> None:
    """Text whose ink box starts exactly at `xy` (top left)."""
    left, top, _, _ = font.getbbox(text)
    draw.text((xy[0] - left, xy[1] - top), text, fill=fill, font=font)


def draw_detections(image: Any, detections: Detections, classes: Sequence[str]) -> Any:
    """The image (PIL, RGB) with its detections, for dense aerial scenes.

    Thin boxes in the class colour (`plots.PALETTE`), the higher scores on top (rotated boxes,
    "rboxes", as their polygons); a small "class score" label on a dark background at the
    box's (or rotated box's envelope's) top left, only where it is wide enough to carry it
    and the label does not cover a better one; below the image, a legend strip with each
    class's colour and count. Returns a new image (the input is drawn on and pasted in).
    """
    from PIL import Image, ImageDraw

    from ds2d2_cli.plots import PALETTE

    width, height = image.size
    line = max(1, round(max(width, height) / 1500))
    font = _font(int(np.clip(max(width, height) / 110, 10, 22)))
    _, text_h = _text_size(font, "Ag 0.99")
    pad = max(1, text_h // 4)
    draw = ImageDraw.Draw(image)
    boxes = detections["boxes"].numpy()
    scores = detections["scores"].numpy()
    labels = detections["labels"].numpy()

    def colour(label: int) -> str:
        return PALETTE[(int(label) - 1) % len(PALETTE)]

    def name(label: int) -> str:
        return classes[label - 1] if 0 < label <= len(classes) else str(label)

    polygons = None
    if "rboxes" in detections:
        from ds2d2_cli.rotated import rbox_to_poly

        polygons = rbox_to_poly(detections["rboxes"].detach().cpu().double()).numpy()
    by_score = np.argsort(scores, kind="stable")
    for i in by_score:
        if polygons is not None:
            draw.polygon([tuple(p) for p in polygons[i].tolist()], outline=colour(labels[i]), width=line)
            continue
        x0, y0, x1, y1 = boxes[i]
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour(labels[i]), width=line)
    placed = np.zeros((0, 4))
    for i in by_score[::-1]:
        x0, y0, x1, y1 = boxes[i]
        text = f"{name(int(labels[i]))} {scores[i]:.2f}"
        text_w, _ = _text_size(font, text)
        if x1 - x0 < text_w / 2 or y1 - y0 < text_h:
            continue  # too small to carry a label: its colour (legend) says the class
        top = y0 - text_h - 2 * pad if y0 >= text_h + 2 * pad else y0
        rect = np.array([x0, top, x0 + text_w + 2 * pad, top + text_h + 2 * pad])
        if len(placed) and np.any((placed[:, 0] < rect[2]) & (rect[0] < placed[:, 2])
                                  & (placed[:, 1] < rect[3]) & (rect[1] < placed[:, 3])):
            continue
        placed = np.vstack([placed, rect])
        draw.rectangle(rect.tolist(), fill=(16, 16, 16))
        _put_text(draw, (rect[0] + pad, rect[1] + pad), text, font, colour(labels[i]))
    # legend strip below the scene: colour swatch + "class count", wrapped to the image width
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    entries = [(colour(c), f"{name(c)} {n}") for c, n in sorted(counts.items())] or [(None, "no detections")]
    row_h = text_h + 2 * pad
    rows: list[list[tuple[str | None, str, int]]] = [[]]
    x = pad
    for fill, text in entries:
        w = text_h + pad + _text_size(font, text)[0] + 3 * pad
        if rows[-1] and x + w > width:
            rows.append([])
            x = pad
        rows[-1].append((fill, text, x))
        x += w
    canvas = Image.new("RGB", (width, height + len(rows) * row_h + pad), (16, 16, 16))
    canvas.paste(image, (0, 0))
    legend = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = height + pad + r * row_h
        for fill, text, x in row:
            tx = x
            if fill is not None:
                legend.rectangle([x, y + pad, x + text_h - 1, y + pad + text_h - 1], fill=fill)
                tx = x + text_h + pad
            _put_text(legend, (tx, y + pad), text, font, (235, 235, 235))
    return canvas


# ----------------------------------------------------------------------------- files


def _per_stem_files(infos: Sequence[RasterInfo], draw: bool) -> list[tuple[RasterInfo, str]]:
    """The files named after their image (`<stem>.png`, `<stem>.geojson`) a run writes."""
    files = []
    for info in infos:
        if draw:
            files.append((info, f"{info.path.stem}.png"))
        if info.georeferenced:
            files.append((info, f"{info.path.stem}.geojson"))
    return files


def _check_task1_names(infos: Sequence[RasterInfo]) -> None:
    """Task1 lines name an image by its file stem (as the devkit does): one word, one image each."""
    owners: dict[str, Path] = {}
    for info in infos:
        stem = info.path.stem
        if not stem or any(c.isspace() for c in stem):
            raise InputError("--task1 names images by their file stem, which here holds white space (a Task1 line "
                             "cannot carry it); rename the file", info.path)
        if stem in owners:
            raise InputError(f"two inputs share the name {stem!r} ({owners[stem]}, {info.path}), so --task1 could "
                             "not tell their detections apart; rename one", info.path)
        owners[stem] = info.path


def _check_outputs(infos: Sequence[RasterInfo], out: Path, draw: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("--out must be a folder (this is a file)", out)
    inputs = {info.path.resolve() for info in infos}
    reserved = {out.resolve() / PREDICTIONS_FILE, out.resolve() / IMAGES_FILE}
    if reserved & inputs:
        raise InputError("an input would be overwritten by the predictions; choose another --out", out)
    owners: dict[str, Path] = {}
    for info, name in _per_stem_files(infos, draw):
        path = info.path
        what = "annotated images" if name.endswith(".png") else "GeoJSON files"
        if name in owners:
            hint = " or use --no-images" if name.endswith(".png") else ""
            raise InputError(f"two inputs share the name {path.stem!r} ({owners[name]}, {path}), so their {what} "
                             f"would collide; rename one{hint}", path)
        owners[name] = path
        if (out.resolve() / name) in inputs:
            raise InputError(f"its {what[:-1]} would overwrite an input; choose another --out", path)


def _note_images(reporter: Reporter, infos: Sequence[RasterInfo], what: str) -> None:
    """One note for images sharing a condition: naming the image when it is one, counting them when more."""
    if len(infos) == 1:
        reporter.note(f"{infos[0].path} {what}")
    elif infos:
        reporter.note(f"{len(infos)} images (first: {infos[0].path}) {what}")


def _task1_rows(det: Detections, num_classes: int) -> dict[str, Any]:
    """One scene's detections as `dota_task1.write_task1_submission` takes them: polygons in scene
    pixels, scores, class indices 0..C-1 (labels are 1..C)."""
    from ds2d2_cli.rotated import rbox_to_poly

    labels = det["labels"].detach().cpu().to(torch.int64)
    keep = (labels >= 1) & (labels <= num_classes)
    return {"polys": rbox_to_poly(det["rboxes"].detach().cpu().double()[keep]).numpy(),
            "scores": det["scores"].detach().cpu().double()[keep].numpy(), "labels": (labels[keep] - 1).numpy()}


def predict_paths(model: str | Path | Predictor, inputs: Sequence[str | Path], out: str | Path, *,
                  device: str | torch.device = "auto", slice_size: int | None = None, overlap: int | None = None,
                  nms_iou: float | None = None, score_thresh: float | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, draw: bool = True, task1: bool = False,
                  reporter: Reporter | None = None) -> dict[str, Any]:
    """Detect on image files/folders; write OUT/predictions.json, OUT/images.json, OUT/<stem>.png
    and, for georeferenced images, OUT/<stem>.geojson; with `task1` (oriented models only), the
    DOTA devkit's submission files OUT/task1/Task1_<class>.txt (images named by file stem).

    `model`: a checkpoint or ONNX path (loaded with `load_predictor`) or a `Predictor`.
    `overlap` defaults to `default_overlap(slice_size)`. Every image must have the model's
    bands (`image_bands`); that is checked on the file headers before anything is predicted.
    Returns the summary the CLI prints (counts per class, timing, the files written).
    """
    reporter = reporter or NullReporter()
    out = Path(out)
    if slice_size is not None:
        overlap = default_overlap(slice_size) if overlap is None else overlap
        check_slice(slice_size, overlap)
    elif overlap is not None:
        raise InputError("--overlap only applies with --slice")
    _check_numbers(nms_iou, score_thresh, batch_size)
    paths = collect_images(inputs)
    infos = [raster.probe(p) for p in paths]
    _check_outputs(infos, out, draw)
    if task1:
        _check_task1_names(infos)

    from ds2d2_cli.engine import resolve_device

    resolved = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if isinstance(model, (str, Path)):
        predictor: Predictor = load_predictor(model, resolved, score_thresh)
        source = str(model)
    else:
        predictor, source = model, getattr(model, "description", type(model).__name__)
    oriented = is_oriented_predictor(predictor)
    if task1 and not oriented:
        raise InputError(f"--task1 writes DOTA Task 1 files of rotated boxes; this model ({predictor.description}) "
                         "detects horizontal boxes")
    nms_iou = merge_iou(predictor, nms_iou)
    bands, reading = model_reading(predictor)
    band_index = [image_bands(info, bands, reading) for info in infos]
    kind = getattr(predictor, "kind", "custom")
    if kind == "onnx" and str(device).startswith("cuda"):
        reporter.note("ONNX models run on the CPU here (onnxruntime); --device applies to checkpoints")
    threshold = predictor.score_thresh if score_thresh is None else float(score_thresh)
    if threshold < predictor.score_thresh:
        reporter.note(f"the model keeps only scores >= {predictor.score_thresh:g} (set when it was exported); "
                      f"--score-thr {threshold:g} cannot add lower ones")
        threshold = predictor.score_thresh  # what the results really hold
    limit = LARGE_FACTOR * predictor.input_size
    large = [info for info in infos if max(info.width, info.height) > limit]
    if slice_size is None and large:
        big = max(large, key=lambda info: max(info.width, info.height))
        reporter.note(f"{len(large)} image(s) are more than {LARGE_FACTOR:g}x the model's {predictor.input_size} px "
                      f"input (largest: {big.path.name}, {big.width}x{big.height} px) and are shrunk to it whole, so "
                      f"small objects may be lost; tile them with --slice (e.g. --slice {predictor.input_size})")
    _note_images(reporter, [i for i in infos if i.dtype != reading.dtype],
                 f"stores {'/'.join(sorted({i.dtype for i in infos if i.dtype != reading.dtype}))} values, the model "
                 f"was trained on {reading.dtype} ({reading.scaling}-scaled): its detections may be off")
    # a TIFF may carry a CRS; PNG, JPEG and BMP never do, so only a TIFF without one is worth a word
    _note_images(reporter, [i for i in infos if raster.is_tiff(i.path) and not i.georeferenced],
                 "has no georeferencing: pixel coordinates only")

    classes = list(predictor.classes)
    images_meta: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    annotated: list[str] = []
    geojson: list[str] = []
    per_class = np.zeros(len(classes) + 1, dtype=np.int64)
    task1_rows: dict[str, dict[str, Any]] = {}  # file stem -> polygons, scores, class indices
    tiles = 0
    # sliced: one scene at a time (its windows fill the batches); whole images: batch_size files at a time
    chunk = 1 if slice_size is not None else batch_size
    with staging(out, create=True) as stage:
        folder = stage.folder(".ds2d2-predict-")
        progress = reporter.task("predict", total=len(paths))
        start = time.perf_counter()
        try:
            for first in range(0, len(paths), chunk):
                group = range(first, min(first + chunk, len(paths)))
                # PNG/JPEG/BMP are decoded once; with --slice a TIFF is read window by window instead
                stored = [None if slice_size is not None and raster.is_tiff(paths[i]) else _decode(paths[i])
                          for i in group]
                scenes = [_file_scene(infos[i], band_index[i], s) for i, s in zip(group, stored)]
                results = _predict(predictor, scenes, reading, slice_size, overlap or 0, nms_iou, threshold,
                                   batch_size)
                for i, pixels, det in zip(group, stored, results):
                    path, info, image_id = paths[i], infos[i], i + 1
                    n_tiles = len(slice_windows(info.width, info.height, slice_size, overlap or 0)) if slice_size else 1
                    tiles += n_tiles
                    entry: dict[str, Any] = {"id": image_id, "file_name": str(path.resolve()), "width": info.width,
                                             "height": info.height}
                    if info.georeferenced:
                        entry.update(crs=info.crs, transform=list(info.transform))
                    images_meta.append(entry)
                    rows.extend(detections_to_coco(image_id, det))
                    if task1:
                        task1_rows[path.stem] = _task1_rows(det, len(classes))
                    counts = np.bincount(det["labels"].numpy().clip(0, len(classes)), minlength=len(classes) + 1)
                    per_class += counts[:len(classes) + 1]
                    record = {"id": image_id, "file": str(path), "width": info.width, "height": info.height,
                              "tiles": n_tiles, "detections": int(det["scores"].numel())}
                    if info.georeferenced:
                        name = f"{path.stem}.geojson"
                        write_json(folder / name, detections_geojson(det, classes, info, image_id))
                        stage.publish(folder / name, out / name)
                        geojson.append(name)
                        record["geojson"] = str(out / name)
                    if draw:
                        name = f"{path.stem}.png"
                        draw_detections(picture(info, pixels), det, classes).save(folder / name, format="PNG",
                                                                                  compress_level=3)
                        stage.publish(folder / name, out / name)
                        annotated.append(name)
                        record["annotated"] = str(out / name)
                    per_image.append(record)
                    progress.update(1, detections=len(rows))
                del stored, scenes
            seconds = time.perf_counter() - start
            if task1:
                from ds2d2_cli.dota_task1 import write_task1_submission

                write_task1_submission(folder / TASK1_FOLDER, task1_rows, classes)
                stage.publish_contents(folder / TASK1_FOLDER, out / TASK1_FOLDER, "the Task1 files")
            info = {"description": f"ds2d2 predict: {source}", "model": source}
            if oriented:
                info.update(boxes="obb", angle="le90",
                            rbox="cx, cy, w, h (pixels), theta (radians; w >= h, clockwise on screen); bbox: its "
                                 "envelope")
            write_json(folder / IMAGES_FILE, {
                "info": info,
                "licenses": [], "images": images_meta, "categories": categories(classes),
            }, indent=1)
            write_json(folder / PREDICTIONS_FILE, rows)
            for name in (IMAGES_FILE, PREDICTIONS_FILE):  # the results file last
                stage.publish(folder / name, out / name)
        finally:
            progress.close()
    return {
        "model": source, "model_format": kind, "model_description": predictor.description,
        "classes": classes, "input_size": predictor.input_size, "bands": list(bands),
        "device": str(getattr(predictor, "device", resolved)),
        "oriented": oriented,
        "slice": slice_size, "overlap": overlap if slice_size is not None else None, "nms_iou": nms_iou,
        "score_thr": threshold, "batch_size": batch_size,
        "images": len(paths), "tiles": tiles, "detections": len(rows),
        "per_class": {n: int(per_class[i + 1]) for i, n in enumerate(classes)},
        "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 3) if seconds > 0 else 0.0,
        "out": str(out), "predictions": str(out / PREDICTIONS_FILE), "images_json": str(out / IMAGES_FILE),
        "annotated": [str(out / n) for n in annotated], "geojson": [str(out / n) for n in geojson],
        "task1": str(out / TASK1_FOLDER) if task1 else None,
        "per_image": per_image,
    }
