"""What every converter hands over: labelled scenes, and the one policy their objects go through.

A converter (DOTA, VOC, YOLO, COCO, DIOR, HRSC2016, UCAS-AOD) only reads its format: it
turns each image and its labels into a `Scene` of `SceneObject`s, in scene pixels, and
reports what it could not parse. Everything after that is shared (`ds2d2_cli.data.prepared`):
the geometry policy below, the tiling (`ds2d2_cli.data.tiling`) and the COCO writer.

An object is a polygon: a DOTA quadrilateral, a rotated box's four corners, a YOLO or
COCO outline, or a horizontal box as its four corners (`polygon=False`: only the box is
written, no `segmentation`). One rule for all, so a box and the same box written as a
polygon give the same patches:

* a self-intersecting quadrilateral (corners clicked out of order) becomes its convex
  hull: repaired, counted, listed;
* an object of zero area is dropped and reported, whatever the options;
* an object reaching past its image is clipped to it (repaired); one wholly outside is a
  bad item (its label does not belong to this image).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.classes import ClassChoice, canonical_name, class_key
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.polygons import clip_polygon, dedupe_vertices, fix_bowtie, polygon_area
from ds2d2_cli.data.validate import BadItem, Problems
from ds2d2_cli.errors import InputError


def box_corners(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A horizontal box as the polygon the shared geometry works on (clockwise from top-left)."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


@dataclass(frozen=True)
class SceneObject:
    poly: np.ndarray  # (N, 2) float64, scene pixels
    name: str  # canonical class name
    difficult: int = 0
    line: int | None = None  # 1-based line in the scene's label file (text formats)
    item: str = "object"  # how messages name it: "object 3 (ship)", "annotation 17"
    polygon: bool = True  # a real outline (written as `segmentation`); False: a horizontal box
    iscrowd: int = 0
    area: float | None = None  # the source's own area (COCO), kept while the object is not clipped
    keep: dict[str, Any] = field(default_factory=dict)  # source fields written as they are (whole images only)


@dataclass
class Scene:
    image: Path
    name: str  # unique in its split: patch file names and the patches' `scene` field
    objects: list[SceneObject]
    label_path: Path | None = None  # the file messages about its objects name
    size: tuple[int, int] | None = None  # (width, height) the labels declare; checked against the image
    fields: dict[str, Any] = field(default_factory=dict)  # extra image fields (imagesource, gsd, source_id ...)
    where: dict[str, Any] = field(default_factory=dict)  # how reports place it (split, image)
    image_id: int | None = None  # the COCO image id to keep (DIOR's numeric ids); None: numbered in order
    item: str | None = None  # how messages name the image when its labels are one file for all (COCO's
    #                          "image 7: a.png"); None: the image file itself is named
    dropped_with: str = ""  # appended to a message that leaves the image out: what goes with it


@dataclass
class SplitPlan:
    """One split as read: its scenes in output order; `labelled` False for an image-only split (DOTA test)."""

    name: str
    folder: Path  # named when nothing usable is left
    scenes: list[Scene]
    labelled: bool = True


def object_message(scene: Scene, obj: SceneObject, text: str, reason: str) -> BadItem:
    """A BadItem about one object, naming its label file and line (or its item)."""
    lead = "" if obj.line is not None else f"{obj.item}: "
    return BadItem(f"{lead}{text}", scene.label_path, obj.line, reason=reason)


def usable_objects(scene: Scene, problems: Problems) -> list[SceneObject]:
    """The scene's objects after the repairs and drops every format shares (not the image border).

    Bow-ties become their hull (repaired); zero-area objects are dropped and reported (the
    summaries count them from the report).
    """
    kept: list[SceneObject] = []
    for obj in scene.objects:
        poly = obj.poly
        if obj.polygon and len(poly) == 4:
            fixed = fix_bowtie(poly)
            if fixed.shape != poly.shape or not np.array_equal(fixed, poly):
                problems.repair(object_message(scene, obj, "corners out of order (the outline crosses itself): "
                                               "replaced by their convex hull", "self-intersecting polygon"),
                                "object", **scene.where)
                obj = replace(obj, poly=fixed)
        if polygon_area(obj.poly) <= 0 or _r(np.ptp(obj.poly[:, 0])) <= 0 or _r(np.ptp(obj.poly[:, 1])) <= 0:
            what = "zero-area polygon (its corners lie on one line or point)" if obj.polygon else \
                f"zero-area box ({', '.join(f'{v:g}' for v in _extent(obj.poly))})"
            problems.drop(object_message(scene, obj, what, "zero-area object"), "object", **scene.where)
            continue
        kept.append(obj)
    return kept


def _extent(poly: np.ndarray) -> tuple[float, float, float, float]:
    return (float(poly[:, 0].min()), float(poly[:, 1].min()), float(poly[:, 0].max()), float(poly[:, 1].max()))


@dataclass
class Placed:
    """Objects in their `width x height` image: which are kept, their clipped outline, box and area."""

    kept: list[int] = field(default_factory=list)  # indices into the objects given
    pieces: list[np.ndarray] = field(default_factory=list)  # the outline inside the image
    boxes: list[list[float]] = field(default_factory=list)  # [x, y, w, h] inside the image
    areas: list[float] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)  # kept indices that reached past the border
    outside: list[int] = field(default_factory=list)  # no area inside: bad items


def place_in_image(polys: list[np.ndarray], width: int, height: int) -> Placed:
    """Clip each object to the image (see the module docstring); nothing is reported here."""
    scene = (0.0, 0.0, float(width), float(height))
    placed = Placed()
    for i, poly in enumerate(polys):
        inside = (poly[:, 0].min() >= 0 and poly[:, 1].min() >= 0
                  and poly[:, 0].max() <= width and poly[:, 1].max() <= height)
        piece = poly if inside else dedupe_vertices(clip_polygon(poly, scene))
        if len(piece) == 0:
            placed.outside.append(i)
            continue
        x0, y0 = _r(piece[:, 0].min()), _r(piece[:, 1].min())
        w, h = _r(piece[:, 0].max() - x0), _r(piece[:, 1].max() - y0)
        area = polygon_area(piece)
        if w <= 0 or h <= 0 or area <= 0:
            placed.outside.append(i)
            continue
        placed.kept.append(i)
        placed.pieces.append(piece)
        placed.boxes.append([x0, y0, w, h])
        placed.areas.append(area)
        if not inside:
            placed.clipped.append(i)
    return placed


def outside_message(scene: Scene, obj: SceneObject, width: int, height: int) -> BadItem:
    x0, y0, x1, y1 = _extent(obj.poly)
    return object_message(scene, obj, f"object lies outside its {width}x{height} image (x {x0:g} to {x1:g}, "
                          f"y {y0:g} to {y1:g})", "object outside image")


def clipped_message(scene: Scene, obj: SceneObject, width: int, height: int) -> BadItem:
    return object_message(scene, obj, f"object extends past its {width}x{height} image: clipped to it",
                          "object partly outside image")


def resolve_classes(plans: list[SplitPlan], choice: ClassChoice | None, declared: Sequence[str] | None,
                    problems: Problems) -> tuple[tuple[str, ...], dict[str, int]]:
    """Apply `--classes` to scenes whose objects carry the names their labels use; (class list, filtered).

    Without a choice the classes are the dataset's own: `declared` (YOLO's `names`, COCO's
    categories, in their order) or, for formats without a list (VOC), every name found,
    sorted. A named set is strict: a name outside it is a bad object. A list filters and
    orders: objects of other classes are left out and counted per name in `filtered`.
    Names are matched spelling-insensitively (`Small-Vehicle` is `small vehicle`).
    """
    if choice is None:
        if declared is not None:
            names = tuple(declared)
        else:
            seen: dict[str, str] = {}
            for plan in plans:
                for scene in plan.scenes:
                    for obj in scene.objects:
                        seen.setdefault(class_key(obj.name), obj.name)
            names = tuple(sorted(seen.values(), key=lambda n: (class_key(n), n)))
    else:
        names = choice.names
    filtered: dict[str, int] = {}
    for plan in plans:
        for scene in plan.scenes:
            kept: list[SceneObject] = []
            for obj in scene.objects:
                name = canonical_name(obj.name, names)
                if name is None:
                    if choice is not None and not choice.strict:
                        filtered[obj.name] = filtered.get(obj.name, 0) + 1
                        continue
                    where = f" of class set {choice.set_name}" if choice is not None else ""
                    problems.bad(object_message(scene, obj, f"unknown class {obj.name[:60]!r} (not one of the "
                                                f"{len(names)} classes{where}; pick others with --classes)",
                                                "unknown class"), "object", **scene.where)
                    continue
                kept.append(obj if name == obj.name else replace(obj, name=name))
            scene.objects = kept
    if not names:
        raise InputError("no classes: the labels name no object (give the class list with --classes)")
    return names, dict(sorted(filtered.items(), key=lambda kv: (-kv[1], kv[0])))
