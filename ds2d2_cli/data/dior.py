"""DIOR (Pascal-VOC style XML) -> COCO JSON per split; images stay where they are.

Layout read (the official download; the alternatives in brackets are accepted too)::

    ROOT/Annotations/Horizontal Bounding Boxes/*.xml   [ROOT/Annotations/*.xml]
    ROOT/ImageSets/Main/{train,val,test}.txt
    ROOT/JPEGImages-trainval/*.jpg, ROOT/JPEGImages-test/*.jpg   [ROOT/JPEGImages/*.jpg]

Written: `OUT/{train,val,trainval,test}.json` (those whose lists exist); `file_name`
is the image's path relative to OUT. Box convention: the XML's `xmin, ymin, xmax, ymax`
are taken as given (no 1-based shift) and written as `[xmin, ymin, xmax - xmin,
ymax - ymin]`, clipped to the image; boxes with no area left are dropped and counted.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ds2d2_cli.classes import DIOR, canonical_name
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import write_json
from ds2d2_cli.progress import NullReporter, Reporter

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _r(value: float) -> float:
    return round(float(value), 2)


def annotation_dir(root: Path) -> Path:
    for candidate in (root / "Annotations" / "Horizontal Bounding Boxes", root / "Annotations"):
        if candidate.is_dir() and any(candidate.glob("*.xml")):
            return candidate
    raise InputError("no DIOR annotations: expected Annotations/Horizontal Bounding Boxes/*.xml", root)


def index_images(root: Path) -> dict[str, Path]:
    """stem -> image path over JPEGImages-trainval/, JPEGImages-test/ and JPEGImages/ (nesting allowed)."""
    index: dict[str, Path] = {}
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower().startswith("jpegimages")]
    if not folders:
        raise InputError("no image folder: expected JPEGImages-trainval/ and JPEGImages-test/ (or JPEGImages/)", root)
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTS and path.is_file():
                index.setdefault(path.stem, path)
    return index


def _text(node: ET.Element, tag: str, path: Path, what: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise InputError(f"{what} has no <{tag}>", path)
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    value = _text(node, tag, path, what)
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{what}: <{tag}> is not a number ({value!r})", path) from None


def parse_voc_xml(path: str | Path, classes: tuple[str, ...] = DIOR) -> dict[str, Any]:
    """{width, height, objects: [{name (canonical), box (xmin, ymin, xmax, ymax), difficult}]}.

    Class names are matched spelling-insensitively (`Expressway-Service-area`,
    `golf-field` ...); an unknown name raises InputError naming the file.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise InputError("annotation file not found", path) from None
    except ET.ParseError as exc:
        raise InputError(f"not valid XML: {exc}", path, exc.position[0] if exc.position else None) from None
    except OSError as exc:
        raise InputError(f"cannot read annotation file: {exc}", path) from None
    size = root.find("size")
    if size is None:
        raise InputError("no <size> element", path)
    width, height = _number(size, "width", path, "<size>"), _number(size, "height", path, "<size>")
    objects = []
    for i, obj in enumerate(root.iter("object"), start=1):
        raw = _text(obj, "name", path, f"object {i}")
        name = canonical_name(raw, classes)
        if name is None:
            raise InputError(f"object {i}: unknown class {raw!r} (not one of the {len(classes)} DIOR classes)", path)
        box_node = obj.find("bndbox")
        if box_node is None:
            raise InputError(f"object {i} has no <bndbox>", path)
        box = tuple(_number(box_node, tag, path, f"object {i}") for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult_node = obj.find("difficult")
        try:
            difficult = int(float(difficult_node.text)) if difficult_node is not None and difficult_node.text else 0
        except ValueError:
            raise InputError(f"object {i}: <difficult> must be 0 or 1", path) from None
        objects.append({"name": name, "box": box, "difficult": 1 if difficult else 0})
    return {"width": int(width), "height": int(height), "objects": objects}


def read_split_list(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return ids


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image: {exc}", path) from None


def _relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


def prepare_dior(root: str | Path, out: str | Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """Write COCO JSON for every DIOR split list found (plus trainval); returns summary figures."""
    reporter = reporter or NullReporter()
    root, out = Path(root), Path(out)
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
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(DIOR)]
    cat_id = {name: i + 1 for i, name in enumerate(DIOR)}
    all_ids = [i for ids in split_ids.values() for i in ids]
    numeric = all(i.isdigit() and int(i) > 0 for i in all_ids) and len({int(i) for i in all_ids}) == len(set(all_ids))

    parsed: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # id -> (image entry, parsed xml)
    task = reporter.task("read DIOR", total=len(set(all_ids)))
    try:
        order = 0
        for split, ids in split_ids.items():
            seen: set[str] = set()
            for image_id in ids:
                if image_id in seen:
                    raise InputError(f"image {image_id} is listed twice", lists_dir / f"{split}.txt")
                seen.add(image_id)
                if image_id in parsed:
                    continue
                order += 1
                xml_path = ann_dir / f"{image_id}.xml"
                if not xml_path.is_file():
                    raise InputError(f"no annotation for image {image_id} (listed in {split}.txt)", xml_path)
                image_path = images.get(image_id)
                if image_path is None:
                    raise InputError(f"image {image_id} (listed in {split}.txt) not found under the JPEGImages folders",
                                     root)
                info = parse_voc_xml(xml_path)
                actual = image_size(image_path)
                if actual != (info["width"], info["height"]):
                    raise InputError(
                        f"<size> says {info['width']}x{info['height']} but {image_path.name} is {actual[0]}x{actual[1]}",
                        xml_path,
                    )
                entry = {"id": int(image_id) if numeric else order, "file_name": _relpath(image_path, out),
                         "width": actual[0], "height": actual[1]}
                parsed[image_id] = (entry, info)
                task.update(1)
    finally:
        task.close()

    def build(split: str, ids: list[str], counts: dict[str, int], per_class: dict[str, int]) -> dict[str, Any]:
        anns: list[dict[str, Any]] = []
        images_out = []
        for image_id in ids:
            entry, info = parsed[image_id]
            images_out.append(entry)
            w_img, h_img = entry["width"], entry["height"]
            for obj in info["objects"]:
                x0, y0, x1, y1 = obj["box"]
                cx0, cy0 = min(max(x0, 0.0), w_img), min(max(y0, 0.0), h_img)
                cx1, cy1 = min(max(x1, 0.0), w_img), min(max(y1, 0.0), h_img)
                if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                    counts["clipped"] += 1
                w, h = _r(cx1 - cx0), _r(cy1 - cy0)
                if w <= 0 or h <= 0:
                    counts["degenerate"] += 1
                    continue
                anns.append({"id": len(anns) + 1, "image_id": entry["id"], "category_id": cat_id[obj["name"]],
                             "bbox": [_r(cx0), _r(cy0), w, h], "area": _r(w * h), "iscrowd": 0,
                             "difficult": obj["difficult"]})
                per_class[obj["name"]] += 1
        return {"info": {"ds2d2": {"source": "dior", "classes": "dior", "split": split}},
                "images": images_out, "annotations": anns, "categories": categories}

    outputs: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"source": str(root), "out": str(out), "classes": "dior", "splits": {}}
    lists = dict(split_ids)
    if "train" in split_ids and "val" in split_ids:
        lists = {"train": split_ids["train"], "val": split_ids["val"],
                 "trainval": split_ids["train"] + [i for i in split_ids["val"] if i not in set(split_ids["train"])],
                 **{k: v for k, v in split_ids.items() if k not in ("train", "val")}}
    for split, ids in lists.items():
        counts = {"clipped": 0, "degenerate": 0}
        per_class = {name: 0 for name in DIOR}
        outputs[split] = build(split, ids, counts, per_class)
        summary["splits"][split] = {
            "images": len(ids), "objects": len(outputs[split]["annotations"]),
            "clipped": counts["clipped"], "degenerate": counts["degenerate"],
            "objects_per_class": per_class, "json": str(out / f"{split}.json"),
        }
    for split, data in outputs.items():
        write_json(out / f"{split}.json", data)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
