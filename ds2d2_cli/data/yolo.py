"""YOLO txt datasets (the Ultralytics layout) -> a prepared folder: whole images, or patches as DOTA's are cut.

Read from Ultralytics' own loader and docs (ultralytics/ultralytics): `ultralytics/data/utils.py`
(`check_det_dataset`, `img2label_paths`, `verify_image_label`, `IMG_FORMATS`),
`ultralytics/data/base.py` (`BaseDataset.get_img_files`), `ultralytics/nn/autobackend.py`
(`check_class_names`), `ultralytics/cfg/datasets/{coco8,coco,dota8}.yaml` and the docs
`docs/en/datasets/{detect,obb,segment}/index.md`. What is read, as Ultralytics reads it:

* `DATA.yaml`: `train` (required), `val` (`validation` is taken for it) and `test`, each
  a folder of images (searched recursively), a `.txt` list of image paths, or a list of
  those (Ultralytics also requires `val` to train; preparing data, a missing one is noted);
  `names` as a list or an `{id: name}` map with ids 0..K-1 (`nc` alone gives `class_0` ...;
  `nc` and `names` must agree).
* `path`, the dataset root the split entries are relative to: the YAML's own folder when
  it is missing or empty; an absolute path as it is; a relative one from the current
  folder, as Ultralytics reads it, else (where Ultralytics would try its `datasets_dir`
  setting) from the YAML's folder. A split entry starting `../` that is not found is
  tried without it (Roboflow's exports). In a `.txt` list, `./x` is relative to the list's
  folder and any other relative path to the current folder.
* Labels: the image path with its last `/images/` replaced by `/labels/` and its suffix
  by `.txt` (beside the image when the path has no `images` folder). An image without a
  label file has no objects (counted and noted), as has one with an empty file; a split
  without any label file is written image-only (DOTA's test split). Files Ultralytics does not
  take for images (`*.txt`, `*.cache` ...) are ignored.
* Lines: `class x_center y_center width height`, normalised to 0..1. A file with any line
  of more than 6 fields is a file of polygons, `class x1 y1 x2 y2 ... xn yn` (YOLO-OBB: 4
  corners; segmentation: 3 or more points), as `verify_image_label` decides it: the
  polygon is kept (`segmentation`) and its envelope is the box. A 5-field line in such a
  file is refused: Ultralytics would read it as a 2-point polygon. Duplicate lines (same
  class and numbers) are left out and reported, as Ultralytics leaves them out.

Bad input, each a one-line error naming the file (and line), or skipped and reported with
`skip_bad`: a wrong YAML (not YAML, no `train`, no `names`, `names` neither list nor
map, gaps in its ids), a split path that does not exist (an error, whatever the options),
a line with the wrong number of fields, a field that is not a number, a class id outside
`names`, a coordinate outside Ultralytics' tolerance (-0.01 to 1.01: a box or corner
beyond that is not normalised, or not in the image), a negative width or height, an
unreadable or truncated image, a JPEG that EXIF rotates (its labels are relative to the
image as shown, ds2d2 reads the stored pixels), two images of one name in a split.
Objects reaching past the image (within the tolerance) are clipped to it and counted, by
the policy every converter shares (`ds2d2_cli.data.scenes`); zero-area ones are dropped.
"""

from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.classes import ClassChoice, check_class_list, class_choice
from ds2d2_cli.data.coco_writer import check_boxes
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan, box_corners, resolve_classes
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import (
    read_label_text,
    IMAGE_EXTS, BadItem, Problems, held_progress, image_size, one_line, unsupported_extension,
)
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

# What Ultralytics takes for an image in a split folder or list (`IMG_FORMATS`); ds2d2 reads IMAGE_EXTS of them.
ULTRALYTICS_IMAGE_SUFFIXES = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm",
                                        "heic"})
TOLERANCE = 0.01  # Ultralytics accepts normalised values from -0.01 to 1.01 (`verify_image_label`)
SPLIT_KEYS = ("train", "val", "test")
_EXIF_ORIENTATION = 274


# --------------------------------------------------------------------------- data.yaml


@dataclass
class YoloData:
    """A data.yaml as read: the dataset root, the class names (id order) and each split's sources."""

    yaml_path: Path
    root: Path
    names: tuple[str, ...]
    splits: list[tuple[str, list[Path]]]  # (split, folders and .txt lists), train first


def _key_lines(text: str) -> dict[str, int]:
    """{top-level key: 1-based line} so messages can point at `train:` or `names:`."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def _load_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    import yaml

    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise InputError(f"expected the dataset's YAML file (path, train, val, names), got a folder{hint}", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("dataset YAML not found", path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (bad byte at offset {exc.start})", path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {one_line(exc.strerror or exc)}", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InputError(f"not valid YAML: {one_line(problem)}", path,
                         mark.line + 1 if mark is not None else None) from None
    if not isinstance(data, dict):
        raise InputError("not a dataset YAML: expected keys such as path, train, val and names, got "
                         f"{type(data).__name__ if data is not None else 'an empty file'}", path)
    return data, _key_lines(text)


def _names(data: dict[str, Any], path: Path, lines: dict[str, int]) -> tuple[str, ...]:
    """`names` (a list, or a map of ids 0..K-1) checked as Ultralytics' check_class_names does; or nc's class_i."""
    nc = data.get("nc")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc <= 0):
        raise InputError(f"nc must be a positive whole number (got {nc!r})", path, lines.get("nc"))
    raw = data.get("names")
    where = lines.get("names")
    if raw is None:
        if nc is None:
            raise InputError("no 'names:' (the class names, a list or a map 0: name ...) and no 'nc:'", path,
                             where)
        return tuple(f"class_{i}" for i in range(nc))
    if isinstance(raw, list):
        values = list(raw)
    elif isinstance(raw, dict):
        ids: dict[int, Any] = {}
        for key, value in raw.items():
            try:
                ids[int(key)] = value
            except (TypeError, ValueError):
                raise InputError(f"names: class ids must be whole numbers (got {key!r})", path, where) from None
        if sorted(ids) != list(range(len(raw))):
            raise InputError(f"names: class ids must be 0 to {len(raw) - 1}, each once "
                             f"(got {', '.join(str(k) for k in raw)})", path, where)
        values = [ids[i] for i in range(len(ids))]
    else:
        raise InputError(f"names must be a list of class names or a map of id: name (got {type(raw).__name__})",
                         path, where)
    if not values:
        raise InputError("names is empty: no class", path, where)
    if nc is not None and nc != len(values):
        raise InputError(f"names lists {len(values)} classes but nc is {nc}", path, lines.get("nc", where))
    texts = ["" if v is None else str(v) for v in values]
    try:
        return check_class_list(texts, "the names list")
    except InputError as exc:
        raise InputError(exc.message, path, where) from None


def _root(data: dict[str, Any], path: Path, lines: dict[str, int]) -> Path:
    raw = data.get("path")
    if raw is None or raw == "":
        return path.parent.resolve()
    if not isinstance(raw, str):
        raise InputError(f"path must be a folder name (got {raw!r})", path, lines.get("path"))
    given = Path(raw)
    for candidate in ([given] if given.is_absolute() else [given, path.parent / given]):
        if candidate.is_dir():
            return candidate.resolve()
    looked = str(given) if given.is_absolute() else f"{given.resolve()} or {(path.parent / given).resolve()}"
    raise InputError(f"path: dataset folder {raw!r} not found (looked for {looked})", path, lines.get("path"))


def _sources(key: str, value: Any, root: Path, path: Path, line: int | None) -> list[Path]:
    """A split's folders and lists, resolved as check_det_dataset resolves them; each must exist."""
    if isinstance(value, str) and value.strip():
        entries, single = [value.strip()], True
    elif isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        entries, single = [v.strip() for v in value], False
    else:
        raise InputError(f"{key}: must be a folder of images, a .txt list of images, or a list of those "
                         f"(got {one_line(repr(value))[:60]})", path, line)
    found: list[Path] = []
    for entry in entries:
        resolved = (root / entry).resolve()
        if single and not resolved.exists() and entry.startswith("../"):
            resolved = (root / entry[3:]).resolve()
        if not resolved.exists():
            raise InputError(f"{key}: {entry!r} not found ({resolved})", path, line)
        if resolved.is_file() and resolved.suffix[1:].lower() in ULTRALYTICS_IMAGE_SUFFIXES:
            raise InputError(f"{key}: {entry!r} is an image; give its folder or a .txt list of images", path, line)
        found.append(resolved)
    return found


def read_data_yaml(data_yaml: str | Path) -> YoloData:
    """Read and check a dataset YAML (see the module docstring); InputError naming the file and line."""
    path = Path(data_yaml)
    data, lines = _load_yaml(path)
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
        if "validation" in lines:
            lines["val"] = lines["validation"]
    if "train" not in data:
        raise InputError("no 'train:' (the training images: a folder, a .txt list or a list of those)", path)
    names = _names(data, path, lines)
    root = _root(data, path, lines)
    splits = [(key, _sources(key, data[key], root, path, lines.get(key)))
              for key in SPLIT_KEYS if key == "train" or data.get(key)]
    return YoloData(path, root, names, splits)


# --------------------------------------------------------------------------- images


def label_path_for(image: str) -> str:
    """Ultralytics' img2label_paths: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = image.rpartition(images)
    swapped = f"{head}{labels}{tail}" if sep else image
    return swapped.rsplit(".", 1)[0] + ".txt"


def _takes_for_image(name: str) -> bool:
    return name.rpartition(".")[-1].lower() in ULTRALYTICS_IMAGE_SUFFIXES


@dataclass(frozen=True)
class _Listed:
    text: str  # the path as Ultralytics holds it: its label path is derived from this string

    @property
    def path(self) -> Path:
        return Path(self.text)


def _listed_images(split: str, sources: Sequence[Path], problems: Problems) -> list[_Listed]:
    """Every image of a split, by path (Ultralytics' order); bad entries raised or, with skip_bad, reported."""
    listed: list[_Listed] = []
    for source in sources:
        if source.is_dir():
            pattern = os.path.join(glob.escape(str(source)), "**", "*.*")
            listed += [_Listed(p) for p in glob.glob(pattern, recursive=True)
                       if _takes_for_image(p) and os.path.isfile(p)]
            continue
        try:
            text = source.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InputError(f"{split}: image list is not UTF-8 text (bad byte at offset {exc.start})",
                             source) from None
        except OSError as exc:
            raise InputError(f"{split}: cannot read image list: {one_line(exc.strerror or exc)}", source) from None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            entry = raw.strip()
            if not entry or not _takes_for_image(entry):
                continue
            if entry.startswith("./"):
                entry = str(source.parent) + os.sep + entry[2:]
            if not os.path.isfile(entry):
                problems.bad(BadItem(f"image not found: {entry}", source, lineno, reason="missing image"), "image",
                             split=split, image=Path(entry).stem)
                continue
            listed.append(_Listed(entry))
    listed.sort(key=lambda item: item.text)
    readable: list[_Listed] = []
    for item in listed:
        if item.path.suffix.lower() in IMAGE_EXTS:
            readable.append(item)
        else:
            problems.bad(unsupported_extension(item.path), "image", split=split, image=item.path.stem)
    by_stem: dict[str, list[_Listed]] = {}
    for item in readable:
        by_stem.setdefault(item.path.stem, []).append(item)
    unique: list[_Listed] = []
    for stem, group in by_stem.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        names = [g.path.name for g in group]
        shown = ", ".join(g.text if len(set(names)) < len(names) else g.path.name for g in group)
        for item in group:
            problems.bad(BadItem(f"two images of split {split!r} share the name {stem!r} ({shown}): patch and "
                                 "scene names come from it", item.path, reason="duplicate image name"),
                         "image", split=split, image=stem)
    return sorted(unique, key=lambda item: item.text)


def _image_header(path: Path) -> tuple[int, int]:
    """(width, height) from the header; BadItem for an unreadable file or a JPEG that EXIF rotates."""
    size = image_size(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        from PIL import Image

        try:
            with Image.open(path) as img:
                orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels are what they are
            orientation = None
        if orientation not in (None, 1):
            raise BadItem(f"EXIF orientation {orientation}: Ultralytics reads this JPEG turned as shown and its "
                          "labels are relative to that, ds2d2 reads the stored pixels; save it upright first "
                          "(e.g. PIL ImageOps.exif_transpose)", path, reason="EXIF-rotated image")
    return size


# --------------------------------------------------------------------------- labels


def _line_object(tokens: list[str], polygons: bool, names: Sequence[str], width: int, height: int, path: Path,
                 lineno: int, yaml_name: str) -> tuple[SceneObject, tuple[float, ...]]:
    """One label line -> its object in scene pixels, and its numbers (to find duplicates); BadItem otherwise."""
    def bad(message: str, reason: str = "malformed line") -> BadItem:
        return BadItem(message, path, lineno, reason=reason)

    count = len(tokens)
    if polygons and count == 5:
        raise bad("a box line (5 fields) in a file of polygon lines: Ultralytics reads every line of such a file "
                  "as a polygon, this one as 2 points; write the box as its 4 corners")
    if polygons and ((count - 1) % 2 or count < 7):
        raise bad(f"a polygon line is a class and x y pairs of at least 3 points, got {count} fields")
    if not polygons and count != 5:
        raise bad(f"expected 5 fields (class x_center y_center width height) or a polygon (class x1 y1 x2 y2 x3 "
                  f"y3 ...), got {count}")
    try:
        class_value = float(tokens[0])
    except ValueError:
        raise bad(f"class id must be a whole number, got {tokens[0][:30]!r}") from None
    if not math.isfinite(class_value) or class_value != int(class_value):
        raise bad(f"class id must be a whole number, got {tokens[0][:30]!r}")
    class_id = int(class_value)
    if not 0 <= class_id < len(names):
        raise bad(f"unknown class id {class_id} ({yaml_name} names {len(names)} classes, ids 0 to {len(names) - 1})",
                  "unknown class")
    values: list[float] = []
    for token in tokens[1:]:
        try:
            values.append(float(token))
        except ValueError:
            raise bad(f"coordinates must be numbers, got {token[:30]!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise bad("coordinates must be finite numbers")
    beyond = [v for v in values if not -TOLERANCE <= v <= 1 + TOLERANCE]
    if beyond:
        raise bad(f"coordinate {beyond[0]:g} is outside 0..1: YOLO coordinates are fractions of the image width "
                  f"and height (Ultralytics accepts {-TOLERANCE:g} to {1 + TOLERANCE:g}), so this object is not "
                  f"in its {width}x{height} image or its label is not normalised", "coordinate out of range")
    if polygons:
        poly = np.asarray(values, dtype=np.float64).reshape(-1, 2) * np.array([width, height], dtype=np.float64)
    else:
        cx, cy, w, h = values[0] * width, values[1] * height, values[2] * width, values[3] * height
        if w < 0 or h < 0:
            raise bad(f"width and height must not be negative (got {values[2]:g}, {values[3]:g})")
        poly = box_corners(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    obj = SceneObject(poly, names[class_id], line=lineno, polygon=polygons)
    return obj, (float(class_id), *values)


def parse_yolo_labels(path: str | Path, names: Sequence[str], width: int, height: int, problems: Problems,
                      yaml_name: str = "data.yaml", **where: Any) -> list[SceneObject]:
    """The objects of one label file, in pixels of its `width` x `height` image (see the module docstring).

    A bad line is raised as a BadItem naming file:line, or with skip_bad reported and left
    out; a file that cannot be read is a BadItem for the whole file (the caller's image).
    """
    path = Path(path)
    text = read_label_text(path)
    rows = [(lineno, raw.split()) for lineno, raw in enumerate(text.splitlines(), start=1) if raw.split()]
    polygons = any(len(tokens) > 6 for _, tokens in rows)  # verify_image_label: the whole file is segments
    objects: list[SceneObject] = []
    seen: dict[tuple[float, ...], int] = {}
    for lineno, tokens in rows:
        try:
            obj, key = _line_object(tokens, polygons, names, width, height, path, lineno, yaml_name)
        except BadItem as exc:
            problems.bad(exc, "line", **where)
            continue
        if key in seen:
            problems.drop(BadItem(f"the same class and coordinates as line {seen[key]}: a duplicate, left out "
                                  "(Ultralytics removes duplicate labels too)", path, lineno,
                                  reason="duplicate object"), "object", **where)
            continue
        seen[key] = lineno
        objects.append(obj)
    return objects


# --------------------------------------------------------------------------- splits


@dataclass
class _SplitRead:
    plan: SplitPlan
    without_labels: list[Path]  # label files looked for and not found (images without objects)


def plan_yolo_split(split: str, sources: Sequence[Path], names: Sequence[str], problems: Problems,
                    reporter: Reporter, yaml_name: str = "data.yaml") -> _SplitRead:
    """Read and check one split's images and labels into scenes; nothing is written."""
    listed = _listed_images(split, sources, problems)
    folder = sources[0] if len(sources) == 1 else sources[0].parent
    plan = SplitPlan(split, folder, [])
    without: list[Path] = []
    task = reporter.task(f"read {split}", total=len(listed))
    for item in listed:
        image = item.path
        where = {"split": split, "image": image.stem}
        task.update(1)
        try:
            width, height = _image_header(image)
        except BadItem as exc:
            problems.bad(exc, "image", **where)
            continue
        label = Path(label_path_for(item.text))
        if not label.is_file():
            without.append(label)
            plan.scenes.append(Scene(image, image.stem, [], where=where))
            continue
        try:
            objects = parse_yolo_labels(label, names, width, height, problems, yaml_name, **where)
        except BadItem as exc:  # the whole file, or a bad line without --skip-bad
            problems.bad(exc, "image", **where)
            continue
        plan.scenes.append(Scene(image, image.stem, objects, label_path=label, where=where))
    if not plan.scenes:
        shown = ", ".join(str(s) for s in sources)
        if not listed and not problems.skipped_where(split=split):
            raise InputError(f"no images for split {split!r} (ds2d2 reads {', '.join(IMAGE_EXTS)})", shown)
        raise InputError(f"no usable image left in split {split!r}: every one was skipped as bad", shown)
    plan.labelled = len(without) < len(plan.scenes)
    return _SplitRead(plan, without)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_out(out: Path, data: YoloData, plans: Sequence[SplitPlan]) -> None:
    """--out must not be the dataset, nor put patches where images are (Ultralytics searches folders recursively)."""
    target = out.resolve()
    if target == data.root:
        raise InputError("--out must be a folder of its own, not the YOLO dataset's", out)
    for plan in plans:
        for folder in {scene.image.resolve().parent for scene in plan.scenes}:
            if folder == target or folder in target.parents or _overlaps(target / plan.name, folder):
                raise InputError(f"--out must be a folder of its own: it would write into or over the images of "
                                 f"split {plan.name!r} ({folder})", out)


# --------------------------------------------------------------------------- the whole job


def _images(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")


@dataclass
class YoloSummary(PreparedSummary):
    """A prepared YOLO dataset: the shared figures, and the images each split had no label file for."""

    images_without_labels: dict[str, int] = field(default_factory=dict)


def prepare_yolo(data_yaml: str | Path, out: str | Path, *, classes: ClassChoice | str | None = None,
                 tiling: Tiling | None = None, workers: int = 1, skip_bad: bool = False,
                 reporter: Reporter | None = None, scaling: str = "auto",
                 band_names: Sequence[str] | None = None, boxes: str = "hbb") -> YoloSummary:
    """Convert the YOLO dataset `data_yaml` describes into a prepared folder `out`; its summary.

    Every split (train, val, test when given) is read and checked before anything is
    written; a failed run leaves no JSON and no patch behind (`ds2d2_cli.data.prepared`).
    Classes are `names` in id order; `classes` (a set name or a `ClassChoice`) checks them
    against a ds2d2 set or keeps and orders a list of them. Without `tiling` images stay
    whole (`OUT/<split>.json` points at them); with it they are cut as `prepare-data dota`
    cuts scenes. `skip_bad` skips bad images and lines instead of stopping, and lists them.
    `boxes` "obb" reads YOLO-OBB labels (4 corners a line) and adds each object's rotated box
    (`rbox`, le90); a box line or a polygon of another number of corners is then an
    InputError naming the file and line.
    """
    check_boxes(boxes)
    choice = class_choice(classes) if isinstance(classes, str) else classes
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        out = Path(out)
        if tiling is not None:
            tiling.check()
        started = time.perf_counter()
        data = read_data_yaml(data_yaml)
        problems = Problems(skip_bad, held)
        reads = [plan_yolo_split(split, sources, data.names, problems, held, data.yaml_path.name)
                 for split, sources in data.splits]
        plans = [r.plan for r in reads]
        _check_out(out, data, plans)
        class_names, filtered = resolve_classes(plans, choice, data.names, problems)
        if all(split != "val" for split, _ in data.splits):
            problems.note(f"{data.yaml_path.name} names no val: images (Ultralytics needs them to train): "
                          "no val split written")
        for read in reads:
            plan, without = read.plan, read.without_labels
            if not plan.labelled:
                problems.note(f"{plan.name}: no label file for any of its {_images(len(plan.scenes))} (looked "
                              f"for {without[0]} ...): writing image-only JSON")
            elif without:
                problems.note(f"{plan.name}: {len(without)} of {_images(len(plan.scenes))} without a label file, so "
                              f"without objects (as Ultralytics reads them), e.g. {without[0]}")
        figures = write_prepared(plans, out, source="yolo", class_names=class_names,
                                 classes_label=choice.label if choice is not None else None, tiling=tiling,
                                 problems=problems, reporter=held, workers=workers,
                                 meta={"data_yaml": str(data.yaml_path.resolve()), "names": list(data.names)},
                                 scaling=scaling, band_names=band_names, boxes=boxes)
        problems.flush()
        return YoloSummary(source=str(data.yaml_path), out=str(out),
                           classes=choice.label if choice is not None else None, problems=problems.report(),
                           seconds=round(time.perf_counter() - started, 3), format="yolo",
                           tiling=tiling.meta() if tiling is not None else None, splits=figures, filtered=filtered,
                           boxes=boxes,
                           images_without_labels={r.plan.name: len(r.without_labels) for r in reads
                                                  if r.plan.labelled})
