"""The COCO detection JSON every converter writes, and the summary every converter returns.

`CocoWriter` builds one file: categories 1..K from a class list, images and annotations
numbered 1.. in the order they are added, the `info` block (`info.ds2d2` the converter's
settings, `info.skipped` / `info.repaired` what bad input changed) and the per-class object
counts. `PrepareSummary` is the base of the typed results every converter returns
(`ds2d2_cli.data.prepared.PreparedSummary`); `to_dict()` is the `--json` summary.

Box modes (`--boxes`): `hbb`, the default, writes each object's horizontal `bbox` (and its
outline as `segmentation` when the source has one). `obb` adds to every annotation `rbox`:
`[cx, cy, w, h, theta]`, the minimum-area rectangle of the `segmentation` polygon as written
(`rbox_field`), in the le90 convention of `ds2d2_cli.rotated` (pixels, theta in radians,
w >= h, theta in [-pi/2, pi/2), clockwise on screen); `bbox` stays the polygon's envelope.
Such files record `"boxes": "obb"` and `"angle_convention": "le90"` once, in `info.ds2d2`
(`obb_meta`); files without them hold horizontal boxes only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ds2d2_cli.data.validate import ProblemReport


BOX_MODES = ("hbb", "obb")
ANGLE_CONVENTION = "le90"  # ds2d2_cli.rotated's, as MMRotate names it
ANGLE_DECIMALS = 6  # radians: 1e-6 rad moves a corner 1000 px away by 0.001 px


def round2(value: float) -> float:
    """Coordinates and areas in the JSON: 2 decimals."""
    return round(float(value), 2)


def check_boxes(boxes: str) -> str:
    """`--boxes` as given, or an InputError."""
    if boxes not in BOX_MODES:
        from ds2d2_cli.errors import InputError

        raise InputError(f"--boxes must be one of {', '.join(BOX_MODES)} (got {boxes!r})")
    return boxes


def obb_meta(boxes: str) -> dict[str, Any]:
    """What `info.ds2d2` records about the boxes: nothing for hbb (files as before), the mode and convention for obb."""
    return {"boxes": "obb", "angle_convention": ANGLE_CONVENTION} if check_boxes(boxes) == "obb" else {}


def rbox_field(poly: Sequence[float]) -> list[float]:
    """`rbox` of a polygon as written (flat x, y ... already rounded): its minimum-area rectangle, le90.

    Centre and sides are rounded as coordinates (2 decimals), theta to ANGLE_DECIMALS; a square
    whose sides round equal takes the square's le90 form. Taken from the written numbers, so
    `poly_to_rbox(segmentation)` rounded gives it back.
    """
    import numpy as np
    import torch

    from ds2d2_cli.rotated import normalize_le90, poly_to_rbox

    cx, cy, w, h, theta = poly_to_rbox(np.asarray(poly, dtype=np.float64).reshape(-1, 2))
    rounded = [round2(cx), round2(cy), round2(w), round2(h), round(float(theta), ANGLE_DECIMALS)]
    if rounded[2] == rounded[3]:
        rounded[4] = round(float(normalize_le90(torch.tensor(rounded, dtype=torch.float64))[4]), ANGLE_DECIMALS)
    return rounded


def relpath(path: Path, start: Path) -> str:
    """`file_name` of an image that stays where it is: its path relative to the output folder."""
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def clip_boxes(boxes: Sequence[Sequence[float]], width: int, height: int, fmt: str = "xyxy"
               ) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Boxes (`fmt`: "xyxy" or "xywh") and a `width` x `height` image: (the boxes as x1, y1, x2, y2;
    clipped to the image, as x1, y1, x2, y2; clipped, as x, y, w, h).

    Plain float64 arithmetic (torchvision's `box_convert` and `clip_boxes_to_image`), so
    the figures are those of the same sums done by hand.
    """
    import torch
    from torchvision.ops import box_convert, clip_boxes_to_image

    given = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    xyxy = box_convert(given, fmt, "xyxy") if fmt != "xyxy" else given
    clipped = clip_boxes_to_image(xyxy, (height, width))
    return xyxy.tolist(), clipped.tolist(), box_convert(clipped, "xyxy", "xywh").tolist()


def categories(class_names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]


class CocoWriter:
    """One COCO detection file being built (see the module docstring)."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.categories = categories(self.class_names)
        self.category_id = {name: i + 1 for i, name in enumerate(self.class_names)}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.per_class = {name: 0 for name in self.class_names}

    def add_image(self, fields: dict[str, Any], image_id: int | None = None) -> int:
        """Add an image (`id` first, then `fields`); its id is the next number unless given. Returns it."""
        image_id = len(self.images) + 1 if image_id is None else image_id
        self.images.append({"id": image_id, **fields})
        return image_id

    def add_annotation(self, image_id: int, category_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Add an annotation numbered next: id, image_id, category_id, then `fields`; counted for its class."""
        ann_id = len(self.annotations) + 1
        ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, **fields}
        self.annotations.append(ann)
        self.per_class[self.class_names[category_id - 1]] += 1
        return ann

    def document(self, meta: dict[str, Any], skipped: list[dict[str, Any]],
                 repaired: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole file: info (ds2d2 settings, skipped, repaired), images, annotations, categories."""
        return {"info": {"ds2d2": meta, "skipped": skipped, "repaired": repaired}, "images": self.images,
                "annotations": self.annotations, "categories": self.categories}


@dataclass
class PrepareSummary:
    """What a converter did. Subclasses add their own figures; `to_dict()` is the `--json` summary."""

    source: str
    out: str
    classes: str | None
    problems: ProblemReport
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain figures: the converter's own fields, then the bad-input report, then `seconds`."""
        own = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("problems", "seconds")}
        return {**own, **dataclasses.asdict(self.problems), "seconds": self.seconds}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
