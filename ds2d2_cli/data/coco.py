"""Validate an existing COCO detection JSON and rewrite it in the layout ds2d2 trains on.

Checks: unique image / annotation / category ids, every image file present (its size
read from the file header and compared with the JSON's), every annotation pointing to
a known image and category, bboxes of 4 finite numbers with non-negative width and
height. Boxes sticking out of the image by a little (at most `OVERFLOW_TOLERANCE`
of the image side, or 2 px) are clipped and counted; more than that is an error. Boxes
with no area are dropped and reported. Image files are decoded (cheaply) to catch
truncated and corrupt ones. Bad entries stop the run, or are skipped and reported with
`skip_bad` (see `ds2d2_cli.data.validate`).

Output (through the writer every converter shares, `ds2d2_cli.data.prepared`):
`OUT/<name>.json` with images renumbered 1..N (the original id kept as `source_id`),
annotations 1..M, categories 1..K (in the order of the original ids, of a ds2d2 class set,
or of a `--classes` list, which also leaves other classes out), `file_name` relative to
OUT pointing at the original images. With a `Tiling` (`--split`) the images are cut into
patches as `prepare-data dota` cuts scenes; polygons and RLE masks then stay in the
whole-scene file only as boxes (a box is what ds2d2 trains on).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ds2d2_cli.classes import ClassChoice, canonical_name, class_choice
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan, box_corners
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import BadItem, Problems, held_progress, image_size, one_line
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

OVERFLOW_TOLERANCE = 0.02  # fraction of the image side a box may overflow before it is an error
OVERFLOW_PIXELS = 2.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_id(value: Any, what: str, path: Path) -> int:
    if not _is_int(value):
        raise InputError(f"{what} has a missing or non-integer id ({_short(value)})", path)
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_box(bbox: Any, width: int, height: int, ann_path: Path, what: str) -> tuple[float, float, float, float] | None:
    """The box as x0, y0, x1, y1, or None when it has no area (the caller drops it).

    Raises BadItem for a box that is not 4 finite numbers, has a negative side, or lies
    outside its image by more than the tolerance (a broken file, not a slip of the
    labelling tool). Boxes within the tolerance are clipped by the shared policy.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise BadItem(f"{what}: bbox must be 4 numbers [x, y, w, h], got {_short(bbox)}", ann_path,
                      reason="bad box")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise BadItem(f"{what}: bbox must be 4 numbers [x, y, w, h], got {_short(bbox)}", ann_path,
                      reason="bad box")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BadItem(f"{what}: bbox has a non-finite number: {_short(bbox)}", ann_path, reason="bad box")
    if w < 0 or h < 0:
        raise BadItem(f"{what}: bbox width and height must not be negative: {_short(bbox)}", ann_path,
                      reason="bad box")
    if _r(w) <= 0 or _r(h) <= 0:
        return None
    tol_x = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * width)
    tol_y = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * height)
    outside = x >= width or y >= height or x + w <= 0 or y + h <= 0
    if outside or x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y:
        raise BadItem(f"{what}: bbox {_short(bbox)} lies outside its {width}x{height} image", ann_path,
                      reason="object outside image")
    return x, y, x + w, y + h


def _segmentation(seg: Any) -> list[list[float]] | None:
    """Polygons of finite numbers (at least 3 points each), or None when there is none usable."""
    if not isinstance(seg, list) or not seg:
        return None
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            return None
    return seg


def _load(ann_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("annotation file not found", ann_path) from None
    except IsADirectoryError:
        raise InputError("a folder, not an annotation file", ann_path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read: not UTF-8 text (bad byte at offset {exc.start})", ann_path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {one_line(exc.strerror or exc)}", ann_path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (column {exc.colno})", ann_path, exc.lineno) from None
    except RecursionError:
        raise InputError("not valid JSON: nested too deeply", ann_path) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise InputError("not a COCO detection file (needs 'images' and 'categories' lists)", ann_path)
    if not isinstance(data.get("annotations", []), list):
        raise InputError("'annotations' must be a list", ann_path)
    return data


def _categories(data: dict[str, Any], classes: ClassChoice | None, ann_path: Path
                ) -> tuple[list[str], dict[int, int | None]]:
    """(class names in output order, original category id -> output id 1..K, or None for a category a
    `--classes` list leaves out); problems here stop the run."""
    source_cats: dict[int, str] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict):
            raise InputError(f"category entry is not an object: {_short(cat)}", ann_path)
        cid = _int_id(cat.get("id"), f"category {_short(cat.get('name', '?'))}", ann_path)
        if cid in source_cats:
            raise InputError(f"category id {cid} appears twice", ann_path)
        cname = cat.get("name")
        if not isinstance(cname, str) or not cname.strip():
            raise InputError(f"category {cid} has no name", ann_path)
        source_cats[cid] = cname.strip()
    if not source_cats:
        raise InputError("no categories", ann_path)
    if classes is not None:
        class_names = list(classes.names)
        remap: dict[int, int | None] = {}
        for cid, cname in source_cats.items():
            canonical = canonical_name(cname, class_names)
            if canonical is None and classes.strict:
                raise InputError(f"category {cid} {_short(cname)} is not a class of {classes.label}", ann_path)
            remap[cid] = None if canonical is None else class_names.index(canonical) + 1
        chosen = [v for v in remap.values() if v is not None]
        if len(set(chosen)) != len(chosen):
            raise InputError(f"two categories map to the same {classes.label} class", ann_path)
    else:
        class_names = [source_cats[cid] for cid in sorted(source_cats)]
        if len(set(class_names)) != len(class_names):
            raise InputError("two categories share a name", ann_path)
        remap = {cid: i + 1 for i, cid in enumerate(sorted(source_cats))}
    return class_names, remap


@dataclass
class CocoSummary(PreparedSummary):
    """What `ingest_coco` did (`out`: the file written; `to_dict()`: the --json summary)."""

    @property
    def _split(self):
        return next(iter(self.splits.values()))

    @property
    def images(self) -> int:
        return self._split.images

    @property
    def objects(self) -> int:
        return self._split.objects

    @property
    def clipped(self) -> int:
        return self._split.clipped

    @property
    def degenerate(self) -> int:
        return self._split.degenerate

    @property
    def objects_per_class(self) -> dict[str, int]:
        return self._split.objects_per_class

    def to_dict(self) -> dict[str, Any]:
        figures = super().to_dict()
        return {**figures, "images": self.images, "objects": self.objects, "clipped": self.clipped,
                "degenerate": self.degenerate, "objects_per_class": self.objects_per_class}


def ingest_coco(annotations: str | Path, images_dir: str | Path, out: str | Path, *, name: str | None = None,
                classes: str | ClassChoice | None = None, skip_bad: bool = False, tiling: Tiling | None = None,
                workers: int = 1, reporter: Reporter | None = None, scaling: str = "auto",
                band_names: Sequence[str] | None = None) -> CocoSummary:
    """Validate `annotations` against the images in `images_dir`; write `OUT/<name>.json`.

    `classes` (a ds2d2 class-set name such as `dior`, or a `ClassChoice`) fixes the category
    order and names: a set must hold every category of the file (spelling-insensitively); a
    list keeps and orders its classes and leaves the others out (counted in `filtered`).
    Without it the categories keep their names, ordered by their original ids. A problem
    with the file as a whole (not JSON, no categories, a broken category list) stops the
    run; a bad image entry (duplicate id, missing, unreadable or mis-sized file) or
    annotation (duplicate id, unknown image or category, bad box) stops it too, or with
    `skip_bad` is skipped (an image with its annotations) and reported. Zero-size boxes are
    always dropped and reported; boxes overflowing a little are clipped and counted. With
    `tiling` the images are cut into patches (`OUT/<name>/images/`, `OUT/<name>_scenes.json`).
    """
    choice = class_choice(classes) if isinstance(classes, str) else classes
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        return _ingest_coco(Path(annotations), Path(images_dir), Path(out), name, choice, skip_bad, tiling,
                            workers, held, scaling, band_names)


def _ingest_coco(ann_path: Path, images_dir: Path, out: Path, name: str | None, classes: ClassChoice | None,
                 skip_bad: bool, tiling: Tiling | None, workers: int, reporter: Reporter, scaling: str,
                 band_names: Sequence[str] | None) -> CocoSummary:
    problems = Problems(skip_bad, reporter)
    name = name or ann_path.stem
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"--name must be a plain file name (got {name!r})")
    if tiling is not None:
        tiling.check()
    started = time.perf_counter()
    data = _load(ann_path)
    raw_anns = data.get("annotations", [])
    if not images_dir.is_dir():
        raise InputError("image folder not found", images_dir)
    class_names, remap = _categories(data, classes, ann_path)

    # Images: ids, files and sizes (the pixels are decoded once, by the writer).
    id_count = Counter(img.get("id") for img in data["images"] if isinstance(img, dict) and _is_int(img.get("id")))
    anns_per_image = Counter(a.get("image_id") for a in raw_anns if isinstance(a, dict) and _is_int(a.get("image_id")))
    scenes: dict[int, Scene] = {}
    skipped_images: set[int] = set()
    task = reporter.task("read images", total=len(data["images"]))
    try:
        for position, img in enumerate(data["images"], start=1):
            iid = img.get("id") if isinstance(img, dict) else None
            try:
                scene = _image_scene(img, position, id_count, images_dir, ann_path, anns_per_image, name)
            except BadItem as exc:
                problems.bad(exc, "image", split=name, image=iid if _is_int(iid) else None)
                if _is_int(iid):
                    skipped_images.add(iid)
                task.update(1)
                continue
            scenes[scene.fields["source_id"]] = scene
            task.update(1)
    finally:
        task.close()
    if not scenes:
        raise InputError("no usable image: every image entry was skipped as bad" if data["images"] else "no images",
                         ann_path)
    _unique_names(list(scenes.values()))

    # Annotations.
    seen_ann: set[int] = set()
    filtered: dict[str, int] = {}
    for position, ann in enumerate(raw_anns, start=1):
        if isinstance(ann, dict) and _is_int(ann.get("image_id")) and ann["image_id"] in skipped_images:
            continue  # reported with its image
        try:
            obj, iid = _annotation_object(ann, position, seen_ann, scenes, remap, class_names, ann_path)
        except BadItem as exc:
            if exc.reason == "zero-area object":
                problems.drop(exc, "annotation", split=name)
            else:
                problems.bad(exc, "annotation", split=name)
            continue
        if obj is None:
            category = next(c["name"] for c in data["categories"] if c.get("id") == ann["category_id"])
            filtered[category] = filtered.get(category, 0) + 1
            continue
        if "segmentation" not in obj.keep and ann.get("segmentation") not in (None, [], {}):
            # boxes are what ds2d2 trains on; polygons are kept, anything else (RLE masks, junk) is not
            problems.repair(BadItem(f"annotation {ann['id']}: segmentation is not a list of polygons (RLE or "
                                    "malformed): left out, the box is kept", ann_path,
                                    reason="segmentation left out"), "annotation", split=name)
        scenes[iid].objects.append(obj)
    if tiling is not None and any("segmentation" in o.keep for s in scenes.values() for o in s.objects):
        problems.note("--split: polygons (segmentation) are not cut with the patches; the patches carry boxes")

    plan = SplitPlan(name, ann_path, list(scenes.values()))
    figures = write_prepared([plan], out, source="coco", class_names=class_names,
                             classes_label=classes.label if classes is not None else None, tiling=tiling,
                             problems=problems, reporter=reporter, workers=workers,
                             meta={"source_file": str(ann_path)}, scaling=scaling, band_names=band_names)
    problems.flush()
    return CocoSummary(source=str(ann_path), out=str(out / f"{name}.json"),
                       classes=classes.label if classes is not None else None, problems=problems.report(),
                       seconds=round(time.perf_counter() - started, 3), format="coco",
                       tiling=tiling.meta() if tiling is not None else None, splits=figures,
                       filtered=dict(sorted(filtered.items(), key=lambda kv: (-kv[1], kv[0]))))


def _unique_names(scenes: list[Scene]) -> None:
    """Patch names come from scene names: two files of one stem (a/1.png, b/1.png) get their id added."""
    stems = Counter(scene.name for scene in scenes)
    for scene in scenes:
        if stems[scene.name] > 1:
            scene.name = f"{scene.name}_{scene.fields['source_id']}"


def _image_scene(img: Any, position: int, id_count: Counter, images_dir: Path, ann_path: Path,
                 anns_per_image: Counter, split: str) -> Scene:
    """The scene (no objects yet) of one 'images' entry, or BadItem."""
    if not isinstance(img, dict):
        raise BadItem(f"image entry {position} is not an object: {_short(img)}", ann_path, reason="malformed entry")
    iid = img.get("id")
    if not _is_int(iid):
        raise BadItem(f"image entry {position} ({_short(img.get('file_name', '?'))}) has a missing or non-integer "
                      f"id ({_short(iid)})", ann_path, reason="malformed entry")
    along = f" (its {anns_per_image[iid]} annotation(s) left out with it)" if anns_per_image[iid] else ""
    if id_count[iid] > 1:
        times = "twice" if id_count[iid] == 2 else f"{id_count[iid]} times"
        raise BadItem(f"image id {iid} appears {times}: which annotations belong to which is ambiguous{along}",
                      ann_path, reason="duplicate id")
    file_name = img.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise BadItem(f"image {iid} has no file_name{along}", ann_path, reason="malformed entry")
    path = images_dir / file_name
    if not path.is_file():
        raise BadItem(f"image {iid}: file {file_name!r} not found in {images_dir}{along}", ann_path,
                      reason="missing image")
    try:
        width, height = image_size(path)
    except BadItem as exc:
        raise BadItem(f"image {iid}: {file_name}: {exc.message}{along}", ann_path, reason=exc.reason) from None
    declared = (img.get("width"), img.get("height"))
    if declared != (None, None) and declared != (width, height):
        raise BadItem(f"image {iid}: the JSON says {_short(declared[0], 20)}x{_short(declared[1], 20)} but "
                      f"{file_name} is {width}x{height}{along}", ann_path, reason="size mismatch")
    return Scene(path, Path(file_name).stem, [], label_path=ann_path, size=(width, height),
                 fields={"source_id": iid}, where={"split": split, "image": iid},
                 item=f"image {iid}: {file_name}", dropped_with=along)


def _annotation_object(ann: Any, position: int, seen: set[int], scenes: dict[int, Scene],
                       remap: dict[int, int | None], class_names: list[str], ann_path: Path
                       ) -> tuple[SceneObject | None, int]:
    """(the object, or None when --classes leaves its category out; its image's source id), or BadItem."""
    if not isinstance(ann, dict):
        raise BadItem(f"annotation entry {position} is not an object: {_short(ann)}", ann_path,
                      reason="malformed entry")
    aid = ann.get("id")
    if not _is_int(aid):
        raise BadItem(f"annotation entry {position} has a missing or non-integer id ({_short(aid)})", ann_path,
                      reason="malformed entry")
    what = f"annotation {aid}"
    if aid in seen:
        raise BadItem(f"annotation id {aid} appears twice (the later one is left out)", ann_path,
                      reason="duplicate id")
    seen.add(aid)
    iid = ann.get("image_id")
    if not _is_int(iid) or iid not in scenes:
        raise BadItem(f"{what} refers to image {_short(iid)}, which is not in 'images'", ann_path,
                      reason="unknown image id")
    cid = ann.get("category_id")
    if not _is_int(cid) or cid not in remap:
        raise BadItem(f"{what} refers to category {_short(cid)}, which is not in 'categories'", ann_path,
                      reason="unknown category")
    box = _check_box(ann.get("bbox"), *scenes[iid].size, ann_path, what)  # type: ignore[misc]
    if box is None:
        raise BadItem(f"{what}: zero-size bbox {_short(ann.get('bbox'))}", ann_path, reason="zero-area object")
    if remap[cid] is None:
        return None, iid
    area = ann.get("area")
    given_area = isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) and area > 0
    seg = _segmentation(ann.get("segmentation"))
    return SceneObject(box_corners(*box), class_names[remap[cid] - 1], 1 if ann.get("difficult") else 0,
                       item=what, polygon=False, iscrowd=1 if ann.get("iscrowd") else 0,
                       area=float(area) if given_area else None,
                       keep={"segmentation": seg} if seg is not None else {}), iid
