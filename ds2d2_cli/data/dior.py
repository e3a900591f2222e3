"""DIOR (Pascal-VOC style XML) -> COCO JSON per split; images stay where they are.

Layout read (the official download; the alternatives in brackets are accepted too)::

    ROOT/Annotations/Horizontal Bounding Boxes/*.xml   [ROOT/Annotations/*.xml]
    ROOT/ImageSets/Main/{train,val,test}.txt
    ROOT/JPEGImages-trainval/*.jpg, ROOT/JPEGImages-test/*.jpg   [ROOT/JPEGImages/*.jpg]

Written: `OUT/{train,val,trainval,test}.json` (those whose lists exist); `file_name`
is the image's path relative to OUT. Box convention: the XML's `xmin, ymin, xmax, ymax`
are taken as given (no 1-based shift) and written as `[xmin, ymin, xmax - xmin,
ymax - ymin]`. Boxes reaching past the image are clipped to it (counted); zero-area boxes
are dropped and reported; bad input (malformed XML, missing fields, unknown classes, an
XML <size> that disagrees with the image, unreadable images, boxes wholly outside their
image) stops the run with one line naming the file, or is skipped and reported with
`skip_bad` (see `ds2d2_cli.data.validate`).
"""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ds2d2_cli.classes import DIOR, canonical_name
from ds2d2_cli.data.coco_writer import CocoWriter, PrepareSummary, clip_boxes, relpath
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.validate import (
    IMAGE_EXTS,
    BadItem,
    Problems,
    check_image,
    held_progress,
    one_line,
    unsupported_extension,
)
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import staging
from ds2d2_cli.progress import NullReporter, Reporter

SPLITS = ("train", "val", "test")
MAX_SIDE = 1_000_000  # px: a <size> beyond this is a broken file, not an image


def annotation_dir(root: Path) -> Path:
    for candidate in (root / "Annotations" / "Horizontal Bounding Boxes", root / "Annotations"):
        if candidate.is_dir() and any(candidate.glob("*.xml")):
            return candidate
    raise InputError("no DIOR annotations: expected Annotations/Horizontal Bounding Boxes/*.xml", root)


def index_images(root: Path) -> dict[str, Path]:
    """stem -> image path over JPEGImages-trainval/, JPEGImages-test/ and JPEGImages/ (nesting allowed).

    Files of other formats are indexed too (a supported one wins a shared stem), so that
    a listed image in an unsupported format is reported as such, not as missing.
    """
    index: dict[str, Path] = {}
    try:
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower().startswith("jpegimages")]
        if not folders:
            raise InputError("no image folder: expected JPEGImages-trainval/ and JPEGImages-test/ (or JPEGImages/)",
                             root)
        for folder in folders:
            for path in sorted(folder.rglob("*")):
                if path.name.startswith(".") or not path.is_file():
                    continue
                known = index.get(path.stem)
                if known is None or (known.suffix.lower() not in IMAGE_EXTS and path.suffix.lower() in IMAGE_EXTS):
                    index[path.stem] = path
    except OSError as exc:
        raise InputError(f"cannot list images: {one_line(exc.strerror or exc)}", root) from None
    return index


def _text(node: ET.Element, tag: str, path: Path, what: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise BadItem(f"{what} has no <{tag}>", path, reason="missing field")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    value = _text(node, tag, path, what)
    try:
        number = float(value)
    except ValueError:
        raise BadItem(f"{what}: <{tag}> is not a number ({value[:40]!r})", path, reason="malformed field") from None
    if not math.isfinite(number):
        raise BadItem(f"{what}: <{tag}> is not a finite number ({value[:40]!r})", path, reason="malformed field")
    return number


def _object(obj: ET.Element, i: int, path: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    raw = _text(obj, "name", path, f"object {i}")
    name = canonical_name(raw, classes)
    if name is None:
        raise BadItem(f"object {i}: unknown class {raw[:60]!r} (not one of the {len(classes)} DIOR classes)", path,
                      reason="unknown class")
    box_node = obj.find("bndbox")
    if box_node is None:
        raise BadItem(f"object {i} ({name}) has no <bndbox>", path, reason="missing field")
    box = tuple(_number(box_node, tag, path, f"object {i} ({name})") for tag in ("xmin", "ymin", "xmax", "ymax"))
    if box[2] < box[0] or box[3] < box[1]:
        raise BadItem(f"object {i} ({name}): box is inside out (xmin {box[0]:g}, xmax {box[2]:g}, ymin {box[1]:g}, "
                      f"ymax {box[3]:g})", path, reason="bad box")
    difficult_node = obj.find("difficult")
    text = difficult_node.text.strip() if difficult_node is not None and difficult_node.text else ""
    try:
        flag = float(text) if text else 0.0
    except ValueError:
        flag = math.nan
    if not math.isfinite(flag):
        raise BadItem(f"object {i} ({name}): <difficult> must be 0 or 1, got {text[:20]!r}", path,
                      reason="malformed field")
    return {"name": name, "box": box, "difficult": 1 if flag else 0, "index": i}


def parse_voc_xml(path: str | Path, classes: tuple[str, ...] = DIOR,
                  on_bad: Callable[[BadItem], None] | None = None) -> dict[str, Any]:
    """{width, height, objects: [{name (canonical), box (xmin, ymin, xmax, ymax), difficult, index}]}.

    Class names are matched spelling-insensitively (`Expressway-Service-area`,
    `golf-field` ...). Problems raise a BadItem (an InputError naming the file, and the
    object by its 1-based index): the whole file when it is not XML or its <size> is
    missing or broken; one object when its name is unknown or its box is missing, not
    numeric or inside out, which `on_bad` receives instead (--skip-bad) when given.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise BadItem("annotation file not found", path, reason="image without annotation") from None
    except ET.ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else None
        raise BadItem(f"not valid XML: {one_line(exc)}", path, line, reason="malformed XML") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadItem(f"cannot read annotation file: {one_line(getattr(exc, 'strerror', None) or exc)}", path,
                      reason="malformed XML") from None
    size = root.find("size")
    if size is None:
        raise BadItem("no <size> element", path, reason="missing field")
    width, height = _number(size, "width", path, "<size>"), _number(size, "height", path, "<size>")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width != int(width) or height != int(height):
        raise BadItem(f"<size> must be whole positive pixel counts, got {width:g}x{height:g}", path,
                      reason="malformed field")
    objects = []
    for i, obj in enumerate(root.iter("object"), start=1):
        try:
            objects.append(_object(obj, i, path, classes))
        except BadItem as exc:
            if on_bad is None:
                raise
            on_bad(exc)
    return {"width": int(width), "height": int(height), "objects": objects}


def read_split_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read split list: {one_line(getattr(exc, 'strerror', None) or exc)}", path) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _boxes(info: dict[str, Any], xml_path: Path, problems: Problems, where: dict[str, Any]) -> tuple[list, int, int]:
    """Objects clipped to their image: ([(category name, [x, y, w, h], difficult)], clipped, zero-area).

    Partly outside: clipped and counted (a repair). No area at all: dropped and reported.
    Wholly outside: a bad item (the annotation does not belong to this image).
    """
    w_img, h_img = info["width"], info["height"]
    kept: list[tuple[str, list[float], int]] = []
    clipped = zero = 0
    objects = info["objects"]
    _, inside, inside_xywh = clip_boxes([obj["box"] for obj in objects], w_img, h_img)
    for obj, box, (cx0, cy0, cw, ch) in zip(objects, inside, inside_xywh):
        x0, y0, x1, y1 = obj["box"]
        what = f"object {obj['index']} ({obj['name']})"
        if _r(x1 - x0) <= 0 or _r(y1 - y0) <= 0:
            problems.drop(BadItem(f"{what}: zero-area box ({x0:g}, {y0:g}, {x1:g}, {y1:g})", xml_path,
                                  reason="zero-area object"), "object", **where)
            zero += 1
            continue
        w, h = _r(cw), _r(ch)
        if w <= 0 or h <= 0:
            problems.bad(BadItem(f"{what}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside its {w_img}x{h_img} "
                                 "image", xml_path, reason="object outside image"), "object", **where)
            continue
        if tuple(box) != (x0, y0, x1, y1):
            clipped += 1
            problems.repair(BadItem(f"{what}: box extends past its {w_img}x{h_img} image: clipped to it", xml_path,
                                    reason="object partly outside image"), "object", **where)
        kept.append((obj["name"], [_r(cx0), _r(cy0), w, h], obj["difficult"]))
    return kept, clipped, zero


@dataclass
class DiorSplitSummary:
    """One split of `prepare_dior`."""

    images: int
    objects: int
    clipped: int
    degenerate: int
    skipped: int
    repaired: int
    objects_per_class: dict[str, int]
    json: str


@dataclass
class DiorSummary(PrepareSummary):
    """What `prepare_dior` did, per split (`to_dict()`: the --json summary)."""

    splits: dict[str, DiorSplitSummary]


def prepare_dior(root: str | Path, out: str | Path, reporter: Reporter | None = None, *,
                 skip_bad: bool = False) -> DiorSummary:
    """Write COCO JSON for every DIOR split list found (plus trainval); returns the summary figures.

    Every listed image must have its XML and a readable image of the XML's <size>.
    Problems stop the run with one line naming the file (nothing is written), or with
    `skip_bad` skip the image (or only the object) and are reported; the summary and each
    JSON's `info.skipped` list everything left out.
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        return _prepare_dior(Path(root), Path(out), skip_bad, held)


def _prepare_dior(root: Path, out: Path, skip_bad: bool, reporter: Reporter) -> DiorSummary:
    problems = Problems(skip_bad, reporter)
    if not root.is_dir():
        raise InputError("DIOR folder not found", root)
    started = time.perf_counter()
    ann_dir = annotation_dir(root)
    lists_dir = root / "ImageSets" / "Main"
    split_ids: dict[str, list[str]] = {}
    for split in SPLITS:
        path = lists_dir / f"{split}.txt"
        if path.is_file():
            split_ids[split] = read_split_list(path)
    if not split_ids:
        raise InputError("no split lists: expected ImageSets/Main/train.txt, val.txt, test.txt", root)
    images = index_images(root)
    all_ids = [i for ids in split_ids.values() for i in ids]
    numeric = all(i.isdigit() and int(i) > 0 for i in all_ids) and len({int(i) for i in all_ids}) == len(set(all_ids))

    # id -> (COCO image id, image fields, [(class, box, difficult)], clipped, zero-area); bad images are not in it
    parsed: dict[str, tuple[int, dict[str, Any], list, int, int]] = {}
    tried: set[str] = set()
    kept_ids: dict[str, list[str]] = {}
    task = reporter.task("read DIOR", total=len(set(all_ids)))
    try:
        order = 0
        for split, ids in split_ids.items():
            seen: set[str] = set()
            kept_ids[split] = []
            for image_id in ids:
                where = {"split": split, "image": image_id}
                if image_id in seen:
                    problems.bad(BadItem(f"image {image_id} is listed twice (the second is left out)",
                                         lists_dir / f"{split}.txt", reason="duplicate id"), "list entry", **where)
                    continue
                seen.add(image_id)
                if image_id not in tried:
                    tried.add(image_id)
                    order += 1
                    entry = _read_image(root, ann_dir, images, image_id, split, out, order if not numeric else None,
                                        problems, where)
                    task.update(1)
                    if entry is not None:
                        parsed[image_id] = entry
                if image_id in parsed:
                    kept_ids[split].append(image_id)
    finally:
        task.close()
    listed = set(all_ids)
    unlisted = sorted(p.stem for p in ann_dir.glob("*.xml") if p.stem not in listed)
    if unlisted:
        problems.note(f"{len(unlisted)} annotation file(s) are in no split list and not converted "
                      f"(e.g. {unlisted[0]}.xml)")

    def build(split: str, ids: list[str]) -> tuple[CocoWriter, dict[str, Any]]:
        coco = CocoWriter(DIOR)
        for image_id in ids:
            coco_id, fields, boxes, _, _ = parsed[image_id]
            coco.add_image(fields, coco_id)
            for name, box, difficult in boxes:
                coco.add_annotation(coco_id, coco.category_id[name], {
                    "bbox": list(box), "area": _r(box[2] * box[3]), "iscrowd": 0, "difficult": difficult})
        members = set(ids) | set(split_ids.get(split, []))
        if split == "trainval":
            members |= set(split_ids["train"]) | set(split_ids["val"])
        skipped = [e for e in problems.skipped if e.get("image") in members]
        repaired = [e for e in problems.repaired if e.get("image") in members]
        return coco, coco.document({"source": "dior", "classes": "dior", "split": split}, skipped, repaired)

    outputs: dict[str, dict[str, Any]] = {}
    splits: dict[str, DiorSplitSummary] = {}
    lists = dict(kept_ids)
    if "train" in kept_ids and "val" in kept_ids:
        train = set(kept_ids["train"])
        lists = {"train": kept_ids["train"], "val": kept_ids["val"],
                 "trainval": kept_ids["train"] + [i for i in kept_ids["val"] if i not in train],
                 **{k: v for k, v in kept_ids.items() if k not in ("train", "val")}}
    for split, ids in lists.items():
        if not ids:
            raise InputError(f"no usable image left in split {split!r}: every one was skipped as bad",
                             lists_dir / f"{split}.txt")
        coco, outputs[split] = build(split, ids)
        info = outputs[split]["info"]
        splits[split] = DiorSplitSummary(
            images=len(ids), objects=len(coco.annotations), clipped=sum(parsed[i][3] for i in ids),
            degenerate=sum(parsed[i][4] for i in ids), skipped=len(info["skipped"]), repaired=len(info["repaired"]),
            objects_per_class=coco.per_class, json=str(out / f"{split}.json"))
    problems.note_repairs("")
    with staging(out) as stage:
        for split, data in outputs.items():
            stage.write_json(out / f"{split}.json", data)
    problems.flush()
    return DiorSummary(source=str(root), out=str(out), classes="dior", splits=splits, problems=problems.report(),
                       seconds=round(time.perf_counter() - started, 3))


def _read_image(root: Path, ann_dir: Path, images: dict[str, Path], image_id: str, split: str, out: Path,
                order: int | None, problems: Problems, where: dict[str, Any]):
    """One listed image: its XML parsed, its file checked, its boxes clipped; None when skipped as bad."""
    xml_path = ann_dir / f"{image_id}.xml"
    try:
        if not xml_path.is_file():
            raise BadItem(f"no annotation for image {image_id} (listed in {split}.txt)", xml_path,
                          reason="image without annotation")
        image_path = images.get(image_id)
        if image_path is None:
            raise BadItem(f"image {image_id} (listed in {split}.txt) not found under the JPEGImages folders",
                          xml_path, reason="annotation without image")
        if image_path.suffix.lower() not in IMAGE_EXTS:
            raise unsupported_extension(image_path)
        info = parse_voc_xml(xml_path, on_bad=lambda exc: problems.bad(exc, "object", **where))
        actual = check_image(image_path)
        if actual != (info["width"], info["height"]):
            raise BadItem(f"<size> says {info['width']}x{info['height']} but {image_path.name} is "
                          f"{actual[0]}x{actual[1]}", xml_path, reason="size mismatch")
        boxes, clipped, zero = _boxes(info, xml_path, problems, where)
    except BadItem as exc:
        problems.bad(exc, "image", **where)
        return None
    fields = {"file_name": relpath(image_path, out), "width": actual[0], "height": actual[1]}
    return int(image_id) if order is None else order, fields, boxes, clipped, zero
