"""Validate an existing COCO detection JSON and rewrite it in the layout ds2d2 trains on.

Checks: unique image / annotation / category ids, every image file present (its size
read from the file header and compared with the JSON's), every annotation pointing to
a known image and category, bboxes of 4 finite numbers with non-negative width and
height. Boxes sticking out of the image by a little (at most `OVERFLOW_TOLERANCE`
of the image side, or 2 px) are clipped; more than that is an error. Boxes with no
area (after clipping) are dropped and counted.

Output: `OUT/<name>.json` with images renumbered 1..N (the original id kept as
`source_id`), annotations 1..M, categories 1..K (in the order of the original ids, or
of a ds2d2 class set), `file_name` relative to OUT pointing at the original images.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ds2d2_cli.classes import canonical_name, get_class_set
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import write_json
from ds2d2_cli.progress import NullReporter, Reporter

OVERFLOW_TOLERANCE = 0.02  # fraction of the image side a box may overflow before it is an error
OVERFLOW_PIXELS = 2.0


def _r(value: float) -> float:
    return round(float(value), 2)


def _relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


def _int_id(value: Any, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} has a missing or non-integer id ({value!r})", path)
    return value


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as img:  # header only
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image: {exc}", path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _clip_box(bbox: Any, width: int, height: int, ann_path: Path, what: str) -> tuple[list[float] | None, bool]:
    """(clipped [x, y, w, h] or None when no area is left, whether it was clipped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise InputError(f"{what}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}", ann_path)
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InputError(f"{what}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}", ann_path) from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise InputError(f"{what}: bbox has a non-finite number: {bbox!r}", ann_path)
    if w < 0 or h < 0:
        raise InputError(f"{what}: bbox width and height must not be negative: {bbox!r}", ann_path)
    tol_x = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * width)
    tol_y = max(OVERFLOW_PIXELS, OVERFLOW_TOLERANCE * height)
    if x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y:
        raise InputError(f"{what}: bbox {bbox!r} lies outside its {width}x{height} image", ann_path)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    cw, ch = _r(x1 - x0), _r(y1 - y0)
    if cw <= 0 or ch <= 0:
        return None, clipped
    return [_r(x0), _r(y0), cw, ch], clipped


def ingest_coco(annotations: str | Path, images_dir: str | Path, out: str | Path, *, name: str | None = None,
                classes: str | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Validate `annotations` against the images in `images_dir`; write `OUT/<name>.json`.

    `classes` (a ds2d2 class-set name, e.g. `dior`) fixes the category order and names
    (every category of the file must match one, spelling-insensitively); without it the
    categories keep their names, ordered by their original ids.
    """
    reporter = reporter or NullReporter()
    ann_path, images_dir, out = Path(annotations), Path(images_dir), Path(out)
    name = name or ann_path.stem
    if not name or "/" in name or "\\" in name:
        raise InputError(f"--name must be a plain file name (got {name!r})")
    started = time.perf_counter()
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("annotation file not found", ann_path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc}", ann_path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (column {exc.colno})", ann_path, exc.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise InputError("not a COCO detection file (needs 'images' and 'categories' lists)", ann_path)
    raw_anns = data.get("annotations", [])
    if not isinstance(raw_anns, list):
        raise InputError("'annotations' must be a list", ann_path)
    if not images_dir.is_dir():
        raise InputError("image folder not found", images_dir)

    # Categories.
    source_cats: dict[int, str] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict):
            raise InputError(f"category entry is not an object: {cat!r}", ann_path)
        cid = _int_id(cat.get("id"), f"category {cat.get('name', '?')!r}", ann_path)
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
                raise InputError(f"category {cid} {cname!r} is not a class of {classes}", ann_path)
            remap[cid] = class_names.index(canonical) + 1
        if len(set(remap.values())) != len(remap):
            raise InputError(f"two categories map to the same {classes} class", ann_path)
    else:
        class_names = [source_cats[cid] for cid in sorted(source_cats)]
        if len(set(class_names)) != len(class_names):
            raise InputError("two categories share a name", ann_path)
        remap = {cid: i + 1 for i, cid in enumerate(sorted(source_cats))}
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]

    # Images.
    images_out: list[dict[str, Any]] = []
    new_image_id: dict[int, int] = {}
    sizes: dict[int, tuple[int, int]] = {}
    task = reporter.task("check images", total=len(data["images"]))
    try:
        for img in data["images"]:
            if not isinstance(img, dict):
                raise InputError(f"image entry is not an object: {img!r}", ann_path)
            iid = _int_id(img.get("id"), f"image {img.get('file_name', '?')!r}", ann_path)
            if iid in new_image_id:
                raise InputError(f"image id {iid} appears twice", ann_path)
            file_name = img.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise InputError(f"image {iid} has no file_name", ann_path)
            path = images_dir / file_name
            if not path.is_file():
                raise InputError(f"image {iid}: file {file_name!r} not found in {images_dir}", ann_path)
            width, height = _image_size(path)
            declared = (img.get("width"), img.get("height"))
            if declared != (None, None) and declared != (width, height):
                raise InputError(
                    f"image {iid}: the JSON says {declared[0]}x{declared[1]} but {file_name} is {width}x{height}",
                    ann_path,
                )
            new_image_id[iid] = len(images_out) + 1
            sizes[iid] = (width, height)
            images_out.append({"id": new_image_id[iid], "file_name": _relpath(path, out), "width": width,
                               "height": height, "source_id": iid})
            task.update(1)
    finally:
        task.close()

    # Annotations.
    anns_out: list[dict[str, Any]] = []
    seen_ann: set[int] = set()
    clipped = degenerate = 0
    per_class = {n: 0 for n in class_names}
    for ann in raw_anns:
        if not isinstance(ann, dict):
            raise InputError(f"annotation entry is not an object: {ann!r}", ann_path)
        aid = _int_id(ann.get("id"), "an annotation", ann_path)
        what = f"annotation {aid}"
        if aid in seen_ann:
            raise InputError(f"annotation id {aid} appears twice", ann_path)
        seen_ann.add(aid)
        iid = ann.get("image_id")
        if iid not in new_image_id:
            raise InputError(f"{what} refers to image {iid!r}, which is not in 'images'", ann_path)
        cid = ann.get("category_id")
        if cid not in remap:
            raise InputError(f"{what} refers to category {cid!r}, which is not in 'categories'", ann_path)
        box, was_clipped = _clip_box(ann.get("bbox"), *sizes[iid], ann_path, what)
        clipped += was_clipped
        if box is None:
            degenerate += 1
            continue
        entry: dict[str, Any] = {
            "id": len(anns_out) + 1, "image_id": new_image_id[iid], "category_id": remap[cid], "bbox": box,
            "area": _r(box[2] * box[3]) if was_clipped or not isinstance(ann.get("area"), (int, float))
            else _r(ann["area"]),
            "iscrowd": 1 if ann.get("iscrowd") else 0,
            "difficult": 1 if ann.get("difficult") else 0,
        }
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 for p in seg):
            entry["segmentation"] = seg
        anns_out.append(entry)
        per_class[class_names[remap[cid] - 1]] += 1

    out_path = out / f"{name}.json"
    write_json(out_path, {
        "info": {"ds2d2": {"source": "coco", "classes": classes, "split": name, "source_file": str(ann_path)}},
        "images": images_out, "annotations": anns_out, "categories": categories,
    })
    return {"source": str(ann_path), "out": str(out_path), "classes": classes, "images": len(images_out),
            "objects": len(anns_out), "clipped": clipped, "degenerate": degenerate,
            "objects_per_class": per_class, "seconds": round(time.perf_counter() - started, 3)}
