"""Validate an existing COCO detection JSON and rewrite it in the layout ds2d2 trains on.

Checks: unique image / annotation / category ids, every image file present (its size
read from the file header and compared with the JSON's), every annotation pointing to
a known image and category, bboxes of 4 finite numbers with non-negative width and
height. Boxes sticking out of the image by a little (at most `OVERFLOW_TOLERANCE`
of the image side, or 2 px) are clipped and counted; more than that is an error. Boxes
with no area are dropped and reported. Image files are decoded (cheaply) to catch
truncated and corrupt ones. Bad entries stop the run, or are skipped and reported with
`skip_bad` (see `ds2d2_cli.data.validate`).

Output: `OUT/<name>.json` with images renumbered 1..N (the original id kept as
`source_id`), annotations 1..M, categories 1..K (in the order of the original ids, or
of a ds2d2 class set), `file_name` relative to OUT pointing at the original images.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds2d2_cli.classes import canonical_name, get_class_set
from ds2d2_cli.data.coco_writer import CocoWriter, PrepareSummary, clip_boxes, relpath
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.validate import BadItem, Problems, check_image, held_progress, one_line
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import staging
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


def _clip_box(bbox: Any, width: int, height: int, ann_path: Path, what: str) -> tuple[list[float] | None, bool]:
    """(clipped [x, y, w, h] or None when the box has no area, whether it was clipped).

    Raises BadItem for a box that is not 4 finite numbers, has a negative side, or lies
    outside its image by more than the tolerance (or wholly).
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
        return None, False
    tol_x = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * width)
    tol_y = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * height)
    if x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y:
        raise BadItem(f"{what}: bbox {_short(bbox)} lies outside its {width}x{height} image", ann_path,
                      reason="object outside image")
    (given,), (inside,), ((x0, y0, cw, ch),) = clip_boxes([(x, y, w, h)], width, height, "xywh")
    clipped = inside != given
    cw, ch = _r(cw), _r(ch)
    if cw <= 0 or ch <= 0:
        raise BadItem(f"{what}: bbox {_short(bbox)} lies outside its {width}x{height} image", ann_path,
                      reason="object outside image")
    return [_r(x0), _r(y0), cw, ch], clipped


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


def _categories(data: dict[str, Any], classes: str | None, ann_path: Path) -> tuple[list[str], dict[int, int]]:
    """(class names in output order, original category id -> output id 1..K); problems here stop the run."""
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
        class_names = list(get_class_set(classes))
        remap = {}
        for cid, cname in source_cats.items():
            canonical = canonical_name(cname, class_names)
            if canonical is None:
                raise InputError(f"category {cid} {_short(cname)} is not a class of {classes}", ann_path)
            remap[cid] = class_names.index(canonical) + 1
        if len(set(remap.values())) != len(remap):
            raise InputError(f"two categories map to the same {classes} class", ann_path)
    else:
        class_names = [source_cats[cid] for cid in sorted(source_cats)]
        if len(set(class_names)) != len(class_names):
            raise InputError("two categories share a name", ann_path)
        remap = {cid: i + 1 for i, cid in enumerate(sorted(source_cats))}
    return class_names, remap


@dataclass
class CocoSummary(PrepareSummary):
    """What `ingest_coco` did (`out`: the file written; `to_dict()`: the --json summary)."""

    images: int
    objects: int
    clipped: int
    degenerate: int
    objects_per_class: dict[str, int]


def ingest_coco(annotations: str | Path, images_dir: str | Path, out: str | Path, *, name: str | None = None,
                classes: str | None = None, skip_bad: bool = False,
                reporter: Reporter | None = None) -> CocoSummary:
    """Validate `annotations` against the images in `images_dir`; write `OUT/<name>.json`.

    `classes` (a ds2d2 class-set name, e.g. `dior`) fixes the category order and names
    (every category of the file must match one, spelling-insensitively); without it the
    categories keep their names, ordered by their original ids. A problem with the file
    as a whole (not JSON, no categories, a broken category list) stops the run; a bad
    image entry (duplicate id, missing, unreadable or mis-sized file) or annotation
    (duplicate id, unknown image or category, bad box) stops it too, or with `skip_bad`
    is skipped (an image with its annotations) and reported. Zero-size boxes are always
    dropped and reported; boxes overflowing a little are clipped and counted. The output's
    `info.skipped` lists everything left out.
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        return _ingest_coco(Path(annotations), Path(images_dir), Path(out), name, classes, skip_bad, held)


def _ingest_coco(ann_path: Path, images_dir: Path, out: Path, name: str | None, classes: str | None,
                 skip_bad: bool, reporter: Reporter) -> CocoSummary:
    problems = Problems(skip_bad, reporter)
    name = name or ann_path.stem
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"--name must be a plain file name (got {name!r})")
    started = time.perf_counter()
    data = _load(ann_path)
    raw_anns = data.get("annotations", [])
    if not images_dir.is_dir():
        raise InputError("image folder not found", images_dir)
    class_names, remap = _categories(data, classes, ann_path)
    coco = CocoWriter(class_names, annotation_id_last=True)

    # Images.
    id_count = Counter(img.get("id") for img in data["images"] if isinstance(img, dict) and _is_int(img.get("id")))
    anns_per_image = Counter(a.get("image_id") for a in raw_anns if isinstance(a, dict) and _is_int(a.get("image_id")))
    new_image_id: dict[int, int] = {}
    sizes: dict[int, tuple[int, int]] = {}
    skipped_images: set[int] = set()
    task = reporter.task("check images", total=len(data["images"]))
    try:
        for position, img in enumerate(data["images"], start=1):
            iid = img.get("id") if isinstance(img, dict) else None
            try:
                entry = _check_image_entry(img, position, id_count, images_dir, out, ann_path, anns_per_image)
            except BadItem as exc:
                problems.bad(exc, "image", image=iid if _is_int(iid) else None)
                if _is_int(iid):
                    skipped_images.add(iid)
                task.update(1)
                continue
            new_image_id[entry["source_id"]] = coco.add_image(entry)
            sizes[entry["source_id"]] = (entry["width"], entry["height"])
            task.update(1)
    finally:
        task.close()
    if not coco.images:
        raise InputError("no usable image: every image entry was skipped as bad" if data["images"] else "no images",
                         ann_path)

    # Annotations.
    seen_ann: set[int] = set()
    clipped = degenerate = 0
    for position, ann in enumerate(raw_anns, start=1):
        if isinstance(ann, dict) and _is_int(ann.get("image_id")) and ann["image_id"] in skipped_images:
            continue  # reported with its image
        try:
            entry, was_clipped = _check_annotation(ann, position, seen_ann, new_image_id, remap, sizes, ann_path)
        except BadItem as exc:
            if exc.reason == "zero-area object":
                degenerate += 1
                problems.drop(exc, "annotation")
            else:
                problems.bad(exc, "annotation")
            continue
        if was_clipped:
            clipped += 1
            problems.repair(BadItem(f"annotation {ann['id']}: bbox extends past its image: clipped to it", ann_path,
                                    reason="object partly outside image"), "annotation")
        if "segmentation" not in entry and ann.get("segmentation") not in (None, [], {}):
            # boxes are what ds2d2 trains on; polygons are kept, anything else (RLE masks, junk) is not
            problems.repair(BadItem(f"annotation {ann['id']}: segmentation is not a list of polygons (RLE or "
                                    "malformed): left out, the box is kept", ann_path,
                                    reason="segmentation left out"), "annotation")
        coco.add_annotation(entry.pop("image_id"), entry.pop("category_id"), entry)
    problems.note_repairs("")

    out_path = out / f"{name}.json"
    with staging(out) as stage:
        stage.write_json(out_path, coco.document(
            {"source": "coco", "classes": classes, "split": name, "source_file": str(ann_path)},
            problems.skipped, problems.repaired))
    problems.flush()
    return CocoSummary(source=str(ann_path), out=str(out_path), classes=classes, images=len(coco.images),
                       objects=len(coco.annotations), clipped=clipped, degenerate=degenerate,
                       objects_per_class=coco.per_class, problems=problems.report(),
                       seconds=round(time.perf_counter() - started, 3))


def _check_image_entry(img: Any, position: int, id_count: Counter, images_dir: Path, out: Path, ann_path: Path,
                       anns_per_image: Counter) -> dict[str, Any]:
    """The output entry (without its new id) of one 'images' entry, or BadItem."""
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
        width, height = check_image(path)
    except BadItem as exc:
        raise BadItem(f"image {iid}: {file_name}: {exc.message}{along}", ann_path, reason=exc.reason) from None
    declared = (img.get("width"), img.get("height"))
    if declared != (None, None) and declared != (width, height):
        raise BadItem(f"image {iid}: the JSON says {_short(declared[0], 20)}x{_short(declared[1], 20)} but "
                      f"{file_name} is {width}x{height}{along}", ann_path, reason="size mismatch")
    return {"file_name": relpath(path, out), "width": width, "height": height, "source_id": iid}


def _check_annotation(ann: Any, position: int, seen: set[int], new_image_id: dict[int, int], remap: dict[int, int],
                      sizes: dict[int, tuple[int, int]], ann_path: Path) -> tuple[dict[str, Any], bool]:
    """(output entry without its id, whether its box was clipped), or BadItem."""
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
    if not _is_int(iid) or iid not in new_image_id:
        raise BadItem(f"{what} refers to image {_short(iid)}, which is not in 'images'", ann_path,
                      reason="unknown image id")
    cid = ann.get("category_id")
    if not _is_int(cid) or cid not in remap:
        raise BadItem(f"{what} refers to category {_short(cid)}, which is not in 'categories'", ann_path,
                      reason="unknown category")
    box, was_clipped = _clip_box(ann.get("bbox"), *sizes[iid], ann_path, what)
    if box is None:
        raise BadItem(f"{what}: zero-size bbox {_short(ann.get('bbox'))}", ann_path, reason="zero-area object")
    area = ann.get("area")
    given_area = isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) and area > 0
    entry: dict[str, Any] = {
        "image_id": new_image_id[iid], "category_id": remap[cid], "bbox": box,
        "area": _r(area) if given_area and not was_clipped else _r(box[2] * box[3]),
        "iscrowd": 1 if ann.get("iscrowd") else 0,
        "difficult": 1 if ann.get("difficult") else 0,
    }
    seg = _segmentation(ann.get("segmentation"))
    if seg is not None:
        entry["segmentation"] = seg
    return entry, was_clipped
