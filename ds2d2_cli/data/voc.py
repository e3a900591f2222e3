"""Pascal VOC XML -> a prepared data folder (`prepare-data voc ROOT`); the VOC XML parser DIOR reads through.

Two layouts are read (ROOT may be either):

* **LabelImg**: one folder per split (`train/`, `val/`, ...: any sub-folder holding XML
  files), or ROOT itself as the one split, with each `NAME.xml` beside its image
  `NAME.png` / `NAME.jpg` ... LabelImg saves no XML for an image nobody labelled (it
  saves on "next image" only when something changed), so an image without its XML is
  an image without objects (counted in a note); an XML without its image is bad input.
* **VOC devkit**: `ROOT/Annotations/ID.xml`, `ROOT/JPEGImages/ID.jpg` (or another image
  format) and `ROOT/ImageSets/Main/<split>.txt`, one image id per line; ROOT may also be
  `VOCdevkit/` holding one `VOC2007/`-style folder. Each plain list is a split; the
  devkit's per-class lists (`<class>_<split>.txt`, next to `<split>.txt`) are not read.
  A split none of whose images has an XML (VOC2012 test) is written image-only.

One XML per image, the format LabelImg, CVAT and Label Studio export::

    <annotation>
      <size><width>335</width><height>500</height><depth>3</depth></size>
      <object><name>train</name><pose>Unspecified</pose><truncated>0</truncated>
        <difficult>0</difficult><bndbox><xmin>139</xmin><ymin>200</ymin><xmax>207</xmax>
        <ymax>301</ymax></bndbox></object>
    </annotation>

* Class names are taken as written; `--classes` (`scenes.resolve_classes`) maps them: a
  set is strict, a list filters and orders; without it the classes are every name found.
* `<size>` is checked against the image; when it is missing or 0 (exporters without the
  image at hand: Datumaro leaves it out, CVAT writes 0) the size comes from the image.
* `<difficult>` is kept (0 or 1, as in DOTA); `<truncated>`, `<pose>`, `<occluded>` are not read.
* Boxes: `xmin, ymin, xmax, ymax` are taken as given, as pixel-edge coordinates: the box
  spans x from xmin to xmax. The VOC devkit counts pixels from 1 and includes the last
  one (py-faster-rcnn subtracts 1 "to make pixel indexes 0-based"), so its boxes land at
  most 1 px right of and below the object; LabelImg, the tool most own data comes from,
  writes its canvas coordinates (only raising a 0 to 1), which are edge coordinates
  already. One convention for every VOC file, DIOR's included: no shift.
* Boxes reaching past the image are clipped (repaired and counted), boxes wholly outside
  are bad items, zero-area boxes are dropped (`ds2d2_cli.data.scenes`: one policy).

Bad input (a missing image or XML, malformed XML, a missing or non-numeric field, an
inside-out box, an unknown class under a class set, an unreadable image ...) stops the
run with one line naming the file (and the object, as `object 2 (car)`), or with
`skip_bad` is skipped and reported. Everything is checked before anything is written.

Read, not copied: the VOC devkit layout and a VOC2007 annotation as MMDetection's test data
holds it (open-mmlab/mmdetection tests/data/VOCdevkit/VOC2012/Annotations/000001.xml,
mmdet/datasets/xml_style.py: `Annotations/`, `JPEGImages/`, the id lists, `<size>` or the
image's own size, a missing `<difficult>` is 0); rbgirshick/py-faster-rcnn
lib/datasets/pascal_voc.py (1-based devkit coordinates); LabelImg (HumanSignal/labelImg
libs/pascal_voc_io.py: the XML it writes; libs/labelFile.py convert_points_to_bnd_box:
its coordinates; labelImg.py: saves only changed images); Datumaro's VOC writer leaving
`<size>` out and `<depth>` empty (open-edge-platform/datumaro issue 236).
"""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Sequence

from ds2d2_cli.classes import ClassChoice, canonical_name
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan, box_corners, resolve_classes
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import (
    difficult_flag,
    IMAGE_EXTS,
    BadItem,
    Problems,
    held_progress,
    one_line,
    unsupported_extension,
)
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

MAX_SIDE = 1_000_000  # px: a <size> beyond this is a broken file, not an image
_SPLIT_ORDER = {"train": 0, "val": 1, "trainval": 2, "test": 3}


# --------------------------------------------------------------------------- one XML


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


def _object(obj: ET.Element, i: int, path: Path, classes: Sequence[str] | None, class_set: str) -> dict[str, Any]:
    raw = _text(obj, "name", path, f"object {i}")
    name = raw
    if classes is not None:
        found = canonical_name(raw, tuple(classes))
        if found is None:
            where = f" of class set {class_set}" if class_set else ""
            raise BadItem(f"object {i}: unknown class {raw[:60]!r} (not one of the {len(classes)} classes{where})",
                          path, reason="unknown class")
        name = found
    box_node = obj.find("bndbox")
    if box_node is None:
        raise BadItem(f"object {i} ({name[:60]}) has no <bndbox>", path, reason="missing field")
    what = f"object {i} ({name[:60]})"
    box = tuple(_number(box_node, tag, path, what) for tag in ("xmin", "ymin", "xmax", "ymax"))
    if box[2] < box[0] or box[3] < box[1]:
        raise BadItem(f"{what}: box is inside out (xmin {box[0]:g}, xmax {box[2]:g}, ymin {box[1]:g}, "
                      f"ymax {box[3]:g})", path, reason="bad box")
    difficult_node = obj.find("difficult")
    text = difficult_node.text.strip() if difficult_node is not None and difficult_node.text else ""
    difficult = difficult_flag(text)
    if difficult is None:
        raise BadItem(f"{what}: <difficult> must be 0 or 1, got {text[:20]!r}", path, reason="malformed field")
    return {"name": name, "box": box, "difficult": difficult, "index": i}


def _size(root: ET.Element, path: Path, require: bool) -> tuple[int | None, int | None]:
    """(width, height) from <size>; (None, None) when unknown (missing, empty or 0) and not `require`d."""
    size = root.find("size")
    if size is None:
        if require:
            raise BadItem("no <size> element", path, reason="missing field")
        return None, None
    values: list[float] = []
    for tag in ("width", "height"):
        child = size.find(tag)
        if not require and (child is None or child.text is None or not child.text.strip()):
            return None, None
        values.append(_number(size, tag, path, "<size>"))
    width, height = values
    if not require and 0 in (width, height) and min(width, height) >= 0:
        return None, None  # CVAT writes 0 when it did not have the image
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width != int(width) or height != int(height):
        unknown = "" if require else " (0 when unknown)"
        raise BadItem(f"<size> must be whole positive pixel counts{unknown}, got {width:g}x{height:g}", path,
                      reason="malformed field")
    return int(width), int(height)


def parse_voc_xml(path: str | Path, classes: Sequence[str] | None = None,
                  on_bad: Callable[[BadItem], None] | None = None, *, require_size: bool = False,
                  class_set: str = "") -> dict[str, Any]:
    """{width, height, objects: [{name, box (xmin, ymin, xmax, ymax), difficult, index}]} of one VOC XML.

    Names are as written, or with `classes` matched to their spelling (spelling-
    insensitively: `golf-field` is `golffield`) and any other name is bad. width and
    height are None when `<size>` is missing, empty or 0 (unless `require_size`: DIOR
    always declares it). Problems raise a BadItem (an InputError naming the file, and the
    object by its 1-based index): the whole file when it is not a VOC XML or its
    `<size>` is broken; one object when its name is missing or unknown, or its box is
    missing, not numeric or inside out, which `on_bad` receives instead (--skip-bad).
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
    if root.tag != "annotation":
        raise BadItem(f"not a Pascal VOC annotation: the root element is <{str(root.tag)[:40]}>, not <annotation>",
                      path, reason="malformed XML")
    width, height = _size(root, path, require_size)
    objects = []
    for i, obj in enumerate(root.iter("object"), start=1):
        try:
            objects.append(_object(obj, i, path, classes, class_set))
        except BadItem as exc:
            if on_bad is None:
                raise
            on_bad(exc)
    return {"width": width, "height": height, "objects": objects}


def read_voc_scene(xml_path: Path, image: Path, name: str, where: dict[str, Any], problems: Problems, *,
                   classes: Sequence[str] | None = None, class_set: str = "", require_size: bool = False,
                   image_id: int | None = None) -> Scene | None:
    """One image and its XML as a Scene (objects as horizontal boxes); None when skipped as bad.

    The image file is checked later, once, by the shared writer (`write_prepared`).
    """
    if image.suffix.lower() not in IMAGE_EXTS:
        problems.bad(unsupported_extension(image), "image", **where)
        return None
    try:
        info = parse_voc_xml(xml_path, classes, lambda exc: problems.bad(exc, "object", **where),
                             require_size=require_size, class_set=class_set)
    except BadItem as exc:  # the whole file, or a bad object without --skip-bad
        problems.bad(exc, "image", **where)
        return None
    objects = [SceneObject(box_corners(*o["box"]), o["name"], o["difficult"], item=f"object {o['index']} "
                           f"({o['name'][:60]})", polygon=False) for o in info["objects"]]
    size = (info["width"], info["height"]) if info["width"] is not None else None
    return Scene(image, name, objects, label_path=xml_path, size=size, where=where, image_id=image_id)


# --------------------------------------------------------------------------- layouts


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list files: {one_line(exc.strerror or exc)}", folder) from None


def _holds_xml(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() == ".xml" and not p.name.startswith(".") and p.is_file()
                   for p in folder.iterdir())
    except OSError:
        return False


def _split_key(name: str) -> tuple[int, str]:
    return _SPLIT_ORDER.get(name, 99), name


def find_voc_layout(root: str | Path) -> tuple[Path | None, list[tuple[str, Path]]]:
    """(VOC devkit folder, []) for the devkit layout, or (None, [(split, folder)]) for LabelImg folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("VOC folder not found", root)
    if (root / "Annotations").is_dir():
        return root, []
    try:
        subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list folders: {one_line(exc.strerror or exc)}", root) from None
    devkits = [d for d in subs if (d / "Annotations").is_dir()]
    if len(devkits) > 1:
        raise InputError(f"several VOC datasets here ({', '.join(d.name for d in devkits)}): give one of them", root)
    if devkits:
        return devkits[0], []
    if _holds_xml(root):
        return None, [(root.resolve().name, root)]
    splits = [(d.name, d) for d in subs if _holds_xml(d)]
    if not splits:
        raise InputError("no VOC data here: expected split folders (train/, val/ ...) holding NAME.xml beside "
                         "NAME.jpg, or Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt", root)
    return None, sorted(splits, key=lambda item: _split_key(item[0]))


def plan_labelimg_split(split: str, folder: Path, problems: Problems, reporter: Reporter | None = None) -> SplitPlan:
    """One LabelImg folder: each XML with the image of its name; lone images have no objects."""
    xmls: dict[str, Path] = {}
    images: dict[str, list[Path]] = {}
    others: dict[str, list[Path]] = {}
    for path in _files(folder):
        suffix = path.suffix.lower()
        if suffix == ".xml":
            if path.stem in xmls:
                problems.bad(BadItem(f"two annotation files share the name {path.stem!r} ({xmls[path.stem].name}, "
                                     f"{path.name})", path, reason="duplicate image name"), "image",
                             split=split, image=path.stem)
                continue
            xmls[path.stem] = path
        else:
            (images if suffix in IMAGE_EXTS else others).setdefault(path.stem, []).append(path)
    plan = SplitPlan(split, folder, [])
    lone: list[Path] = []
    ignored = [p for stem, group in others.items() if stem not in xmls for p in group]
    stems = sorted(set(xmls) | set(images))
    task = (reporter or NullReporter()).task(f"read {split}", total=len(stems))
    for stem in stems:
        task.update(1)
        where = {"split": split, "image": stem}
        xml, found = xmls.get(stem), images.get(stem, [])
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.bad(BadItem(f"two images share the name {stem!r} ({names}): which one {stem}.xml labels is "
                                 "ambiguous", xml or found[0], reason="duplicate image name"), "image", **where)
            continue
        if xml is None:
            lone.append(found[0])
            plan.scenes.append(Scene(found[0], stem, [], where=where))
            continue
        if not found:
            other = others.get(stem)
            exc = unsupported_extension(other[0]) if other else BadItem(
                f"no image for {xml.name} (expected {stem}.png, {stem}.jpg ... beside it)", xml,
                reason="annotation without image")
            problems.bad(exc, "image", **where)
            continue
        scene = read_voc_scene(xml, found[0], stem, where, problems)
        if scene is not None:
            plan.scenes.append(scene)
    if lone:
        problems.note(f"{split}: {len(lone)} image(s) without an XML taken as images without objects (LabelImg "
                      f"saves none for an image left unlabelled), e.g. {lone[0].name}")
    if ignored:
        problems.note(f"{split}: {len(ignored)} file(s) neither an image nor an XML left out, e.g. {ignored[0].name}")
    return plan


def read_split_list(path: Path) -> list[str]:
    """The image ids of an `ImageSets/Main/<split>.txt`, one per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read split list: {one_line(getattr(exc, 'strerror', None) or exc)}", path) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_lists(lists_dir: Path) -> dict[str, Path]:
    """{split: list file} in `lists_dir`, without the devkit's per-class lists (`<class>_<split>.txt`)."""
    if not lists_dir.is_dir():
        return {}
    found = {p.stem: p for p in _files(lists_dir) if p.suffix.lower() == ".txt"}
    plain = {stem: p for stem, p in found.items()
             if not any(stem.endswith(f"_{other}") for other in found if other != stem and "_" not in other)}
    return dict(sorted(plain.items(), key=lambda item: _split_key(item[0])))


def _image_index(folder: Path) -> dict[str, list[Path]]:
    """Image id (path under `folder`, no extension) -> files; supported formats first."""
    index: dict[str, list[Path]] = {}
    try:
        for path in sorted(folder.rglob("*")):
            if path.name.startswith(".") or not path.is_file():
                continue
            index.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    except OSError as exc:
        raise InputError(f"cannot list images: {one_line(exc.strerror or exc)}", folder) from None
    for files in index.values():
        files.sort(key=lambda p: p.suffix.lower() not in IMAGE_EXTS)
    return index


def plan_voc_devkit(root: Path, problems: Problems, reporter: Reporter | None = None
                    ) -> tuple[list[SplitPlan], dict[str, list[str]]]:
    """Every split list of a devkit folder as a plan (an image in several lists is read once).

    Returns the plans and, per split, the other splits sharing images with it: their
    reports are listed in its JSON too (trainval lists train's and val's).
    """
    ann_dir, image_dir, lists_dir = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    if not image_dir.is_dir():
        raise InputError("no JPEGImages/ folder beside Annotations/", root)
    lists = split_lists(lists_dir)
    if not lists:
        raise InputError("no split lists: expected ImageSets/Main/<split>.txt (one image id per line), "
                         "e.g. train.txt, val.txt", root)
    images = _image_index(image_dir)
    ids = {split: read_split_list(path) for split, path in lists.items()}
    scenes: dict[tuple[str, bool], Scene | None] = {}  # read once per image (and labelled or not)
    plans: list[SplitPlan] = []
    task = (reporter or NullReporter()).task("read VOC", total=len({i for group in ids.values() for i in group}))
    for split, path in lists.items():
        labelled = any((ann_dir / f"{i}.xml").is_file() for i in ids[split])
        plan = SplitPlan(split, path, [], labelled)
        seen: set[str] = set()
        for image_id in ids[split]:
            where = {"split": split, "image": image_id}
            if image_id in seen:
                problems.bad(BadItem(f"image {image_id} is listed twice (the second is left out)", path,
                                     reason="duplicate id"), "list entry", **where)
                continue
            seen.add(image_id)
            if (image_id, labelled) not in scenes:
                task.update(1)
                scenes[image_id, labelled] = _devkit_scene(image_id, ann_dir, images, path, labelled, problems,
                                                           where)
            scene = scenes[image_id, labelled]
            if scene is not None:
                plan.scenes.append(scene)
        if not labelled:
            problems.note(f"{split}: no annotation for any image of {path.name}, writing image-only JSON")
        plans.append(plan)
    listed = {i for group in ids.values() for i in group}
    unlisted = sorted(p.stem for p in ann_dir.glob("*.xml") if p.stem not in listed)
    if unlisted:
        problems.note(f"{len(unlisted)} annotation file(s) are in no split list and not converted "
                      f"(e.g. {unlisted[0]}.xml)")
    members = {split: set(group) for split, group in ids.items()}
    shared = {split: [other for other in ids if other != split and members[split] & members[other]] for split in ids}
    return plans, {split: others for split, others in shared.items() if others}


def _devkit_scene(image_id: str, ann_dir: Path, images: dict[str, list[Path]], list_path: Path, labelled: bool,
                  problems: Problems, where: dict[str, Any]) -> Scene | None:
    xml = ann_dir / f"{image_id}.xml"
    name = image_id.replace("/", "_")
    found = images.get(image_id, [])
    supported = [p for p in found if p.suffix.lower() in IMAGE_EXTS]
    if labelled and not xml.is_file():
        problems.bad(BadItem(f"no annotation for image {image_id} (listed in {list_path.name})", xml,
                             reason="image without annotation"), "image", **where)
        return None
    if len(supported) > 1:
        names = ", ".join(p.name for p in supported)
        problems.bad(BadItem(f"two images share the id {image_id!r} ({names}): which one is meant is ambiguous",
                             supported[0], reason="duplicate image name"), "image", **where)
        return None
    if not found:
        problems.bad(BadItem(f"image {image_id} (listed in {list_path.name}) not found in JPEGImages/",
                             xml if labelled else list_path, reason="annotation without image" if labelled
                             else "missing image"), "image", **where)
        return None
    if not labelled:
        if not supported:
            problems.bad(unsupported_extension(found[0]), "image", **where)
            return None
        return Scene(found[0], name, [], where=where)
    return read_voc_scene(xml, found[0], name, where, problems)


# --------------------------------------------------------------------------- the whole job


def check_out(out: Path, sources: Sequence[Path]) -> None:
    """--out must be a folder of its own: not the source, nor one of its split folders."""
    target = out.resolve()
    if any(target == folder.resolve() for folder in sources):
        raise InputError("--out must be a folder of its own, not the source data's", out)


def prepare_voc(root: str | Path, out: str | Path, *, classes: ClassChoice | None = None,
                tiling: Tiling | None = None, workers: int = 1, skip_bad: bool = False,
                reporter: Reporter | None = None, scaling: str = "auto",
                band_names: Sequence[str] | None = None) -> PreparedSummary:
    """Write every split of a VOC dataset (either layout, see the module docstring); the summary figures.

    Images stay whole (JSON pointing at them) unless `tiling` cuts them into patches.
    Every XML is parsed and checked before anything is written; a failed run writes
    nothing. `skip_bad` skips bad images, XMLs and objects instead of stopping.
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        root, out = Path(root), Path(out)
        if tiling is not None:
            tiling.check()
        started = time.perf_counter()
        problems = Problems(skip_bad, held)
        devkit, folders = find_voc_layout(root)
        report: dict[str, list[str]] = {}
        if devkit is not None:
            check_out(out, [root, devkit])
            plans, report = plan_voc_devkit(devkit, problems, held)
        else:
            check_out(out, [root, *(folder for _, folder in folders)])
            plans = [plan_labelimg_split(split, folder, problems, held) for split, folder in folders]
        for plan in plans:
            if not plan.scenes:
                raise InputError(f"no usable image left in split {plan.name!r}: every one was skipped as bad",
                                 plan.folder)
        class_names, filtered = resolve_classes(plans, classes, None, problems)
        label = classes.label if classes is not None else None
        figures = write_prepared(plans, out, source="voc", class_names=class_names, classes_label=label,
                                 tiling=tiling, problems=problems, reporter=held, workers=workers,
                                 report_splits=report, scaling=scaling, band_names=band_names)
        problems.flush()
        return PreparedSummary(source=str(root), out=str(out), classes=label, problems=problems.report(),
                               seconds=round(time.perf_counter() - started, 3), format="voc",
                               tiling=tiling.meta() if tiling is not None else None, splits=figures,
                               filtered=filtered)
