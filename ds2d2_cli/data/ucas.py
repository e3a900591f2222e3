"""UCAS-AOD (cars and airplanes, rotated boxes in text files) -> a prepared data folder, through the shared writer.

Read from the public loaders and notes on the released archive: ming71/UCAS-AOD-benchmark
(`README.md`: the folders `CAR/`, `PLANE/`, `Neg/`, the label columns and two sample lines;
`data_prepare.py`: `CAR/P*.png` with `CAR/P*.txt` beside each, the same for `PLANE/`, the
class names `car` and `airplane`, and numbering that restarts in each folder), a UCAS-AOD
`UcasDataset` loader found by the code search (510 car, 1000 plane and the negative images;
`CAR/P????.png` with the same-stem `.txt`; the first 8 numbers of a line are the polygon),
and the dataset description the page search found (coloradmin.cn/o/1407717.html: CAR, PLANE
and NEG folders, positives named P + number and negatives N + number, all PNG; columns
`x1,y1,x2,y2,x3,y3,x4,y4,theta,x,y,width,height`).

Layout::

    ROOT/CAR/P0001.png  ROOT/CAR/P0001.txt  ...     class car
    ROOT/PLANE/P0001.png  ROOT/PLANE/P0001.txt ...  class airplane
    ROOT/Neg/N0001.png ...                           negative images: no objects

(folder names matched case-insensitively: `Neg` or `NEG`). A label line holds 13 numbers,
tab-separated in the release: the four corners `x1 y1 ... x4 y4`, the angle `theta`
(degrees), then the horizontal box `x y width height`, where (x, y) is its top-left corner:
in the README's sample line x = 278.8 lies at the polygon's left edge (276.4), not its
centre (303.6), though the README calls the four `cx cy w h`. The polygon is the label
(`segmentation`; its envelope, clipped to the image, is `bbox`); theta and the horizontal
box must parse but are not used. An empty label file means no objects.

Numbering restarts in each folder (CAR/P0001.png and PLANE/P0001.png are different images),
so scenes are named `<folder>_<stem>`: `CAR_P0001`, `PLANE_P0001`, `Neg_N0001`.

There is no official split: `val_fraction` of each folder's images (stratified by folder,
so by class) go to `val`, the rest to `train`. Which ones is fixed by `seed` alone: each
folder's images are ordered by SHA-256 of `<seed>:<scene name>` and the first
round(fraction x count) are val; the same seed gives the same split on any machine and
Python, and a label file skipped as bad (--skip-bad) does not move the other images.

Bad input (one line naming the file and line; `skip_bad` skips and reports): a line without
13 numbers, a number that does not parse or is not finite, an image without its label file
or a label file without its image, a label file that cannot be read, a file of another
format, a negative image whose label file lists objects; and, through the shared writer, a
truncated or unreadable image and an object wholly outside its image (clipped when partly
outside).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ds2d2_cli.classes import ClassChoice
from ds2d2_cli.data.coco_writer import check_boxes
from ds2d2_cli.data.dota import MAX_COORDINATE
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan, resolve_classes
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import (
    IMAGE_EXTS, BadItem, Problems, finite, held_progress, one_image_per_stem, one_line, read_label_text,
    unsupported_extension,
)
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

UCAS_CLASSES = ("car", "airplane")
FOLDERS = (("CAR", "car"), ("PLANE", "airplane"), ("Neg", None))  # folder, class of its objects (None: negatives)
FIELDS = 13
COLUMNS = "x1 y1 x2 y2 x3 y3 x4 y4 theta x y width height"
NO_SPLIT = "-"  # where files that belong to no image (orphan label files) are reported: every JSON lists them


# --------------------------------------------------------------------------- one label file


def parse_ucas_labels(path: str | Path, class_name: str,
                      on_bad: Callable[[BadItem], None] | None = None) -> list[SceneObject]:
    """The objects of one UCAS-AOD label file, each named `class_name` (its folder's class).

    A line that does not hold 13 finite numbers raises a BadItem naming file:line, or is
    handed to `on_bad` and left out when one is given (--skip-bad). An unreadable file
    raises a BadItem for the whole file.
    """
    path = Path(path)
    objects: list[SceneObject] = []
    for lineno, tokens in _lines(path):
        problem = _line_problem(tokens)
        if problem is not None:
            exc = BadItem(problem[0], path, lineno, reason=problem[1])
            if on_bad is None:
                raise exc
            on_bad(exc)
            continue
        coords = np.array([float(t) for t in tokens[:8]], dtype=np.float64)
        objects.append(SceneObject(coords.reshape(4, 2), class_name, line=lineno))
    return objects


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line."""
    text = read_label_text(path)
    return [(n, raw.split()) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]


def _line_problem(tokens: list[str]) -> tuple[str, str] | None:
    if len(tokens) != FIELDS:
        return f"expected {FIELDS} numbers ({COLUMNS}), got {len(tokens)} fields", "malformed line"
    for i, token in enumerate(tokens, start=1):
        value = finite(token)
        if value is None:
            return f"field {i} ({COLUMNS.split()[i - 1]}) must be a finite number, got {token[:40]!r}", \
                "malformed line"
        if i <= 8 and abs(value) > MAX_COORDINATE:
            return (f"coordinate {value:g} is far outside any image (more than {MAX_COORDINATE:g} px)",
                    "object outside image")
    return None


# --------------------------------------------------------------------------- folders and the split


def find_folders(root: Path) -> list[tuple[Path, str | None]]:
    """[(folder, class or None)] for the CAR/, PLANE/ and Neg/ folders present (names matched case-insensitively)."""
    if not root.is_dir():
        raise InputError("UCAS-AOD folder not found", root)
    try:
        children = sorted(d for d in root.iterdir() if d.is_dir())
    except OSError as exc:
        raise InputError(f"cannot list folders: {one_line(exc.strerror or exc)}", root) from None
    found: list[tuple[Path, str | None]] = []
    for name, class_name in FOLDERS:
        matches = [d for d in children if d.name.lower() == name.lower()]
        if len(matches) > 1:
            raise InputError(f"two folders for {name}/ ({', '.join(d.name for d in matches)}): which is meant is "
                             "ambiguous", root)
        if matches:
            found.append((matches[0], class_name))
    if not any(class_name for _, class_name in found):
        raise InputError("no CAR/ or PLANE/ folder here: expected the UCAS-AOD layout (CAR/, PLANE/ and Neg/, "
                         "each image beside its .txt label file)", root)
    return found


def _folder_files(folder: Path, problems: Problems) -> tuple[list[Path], dict[str, Path], set[str]]:
    """(images by name, {stem: label file}, every image stem); hidden files and sub-folders are ignored, other
    files are bad items, and so are two images of one stem."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list files: {one_line(exc.strerror or exc)}", folder) from None
    images: dict[str, list[Path]] = {}
    labels: dict[str, Path] = {}
    for p in entries:
        where = {"split": NO_SPLIT, "image": f"{folder.name}_{p.stem}"}
        if p.suffix.lower() == ".txt":
            labels[p.stem] = p
        elif p.suffix.lower() in IMAGE_EXTS:
            images.setdefault(p.stem, []).append(p)
        else:
            problems.bad(unsupported_extension(p), "image", **where)
    unique = one_image_per_stem([p for group in images.values() for p in group], problems,
                                lambda stem: {"split": NO_SPLIT, "image": f"{folder.name}_{stem}"})
    return unique, labels, set(images)


def split_of(names: list[str], val_fraction: float, seed: int) -> set[str]:
    """The names (one folder's scenes) that go to val: the first round(fraction x n) by SHA-256 of `seed:name`."""
    count = int(len(names) * val_fraction + 0.5)
    count = min(count, max(len(names) - 1, 0))  # a folder never goes wholly to val
    ranked = sorted(names, key=lambda n: (hashlib.sha256(f"{seed}:{n}".encode()).hexdigest(), n))
    return set(ranked[:count])


def plan_ucas(root: Path, val_fraction: float, seed: int, problems: Problems) -> list[SplitPlan]:
    """The train and val scenes of a UCAS-AOD folder; nothing is written."""
    train, val = SplitPlan("train", root, []), SplitPlan("val", root, [])
    found = 0
    for folder, class_name in find_folders(root):
        images, labels, stems = _folder_files(folder, problems)
        found += len(stems)
        names = {image.stem: f"{folder.name}_{image.stem}" for image in images}
        to_val = split_of(list(names.values()), val_fraction, seed)
        for image in images:
            name = names[image.stem]
            plan = val if name in to_val else train
            where = {"split": plan.name, "image": name}
            label = labels.get(image.stem)
            scene = _read_scene(folder, image, label, class_name, name, problems, where)
            if scene is not None:
                plan.scenes.append(scene)
        for stem, label in sorted(labels.items()):
            if stem not in stems:
                problems.bad(BadItem(f"label file without an image (no {stem}.png in {folder.name}/)", label,
                                     reason="label file without image"), "label file",
                             split=NO_SPLIT, image=f"{folder.name}_{stem}")
    if not found:
        raise InputError("no images in the CAR/, PLANE/ and Neg/ folders", root)
    for plan in (train, val):
        if not plan.scenes:
            if not problems.skipped_where(split=plan.name):
                raise InputError(f"no image goes to {plan.name}: --val-fraction {val_fraction:g} of each folder's "
                                 "images rounds to none (raise it, or add images)", root)
            raise InputError(f"no usable image left in split {plan.name!r}: every one was skipped as bad", root)
    return [train, val]


def _read_scene(folder: Path, image: Path, label: Path | None, class_name: str | None, name: str,
                problems: Problems, where: dict[str, str]) -> Scene | None:
    if class_name is None:  # a negative image: no objects; a label file beside it must hold none
        if label is not None:
            try:
                lines = _lines(label)
            except BadItem as exc:
                problems.bad(exc, "image", **where)
                return None
            if lines:
                problems.bad(BadItem(f"{folder.name}/ holds negative images (no objects), but this label file lists "
                                     f"{len(lines)} line(s)", label, lines[0][0], reason="objects in a negative image"),
                             "image", **where)
                return None
        return Scene(image, name, [], label_path=label, where=where)
    if label is None:
        problems.bad(BadItem(f"no label file for image {image.name} (each {folder.name}/ image has a .txt beside it; "
                             "an empty one means no objects)", image.with_suffix(".txt"),
                             reason="image without label file"), "image", **where)
        return None
    try:
        objects = parse_ucas_labels(label, class_name, on_bad=lambda exc: problems.bad(exc, "line", **where))
    except BadItem as exc:  # the whole file, or a bad line without --skip-bad
        problems.bad(exc, "image", **where)
        return None
    return Scene(image, name, objects, label_path=label, where=where)


def prepare_ucas_aod(root: str | Path, out: str | Path, *, val_fraction: float = 0.2, seed: int = 0,
                     classes: ClassChoice | None = None, tiling: Tiling | None = None, workers: int = 1,
                     skip_bad: bool = False, reporter: Reporter | None = None, scaling: str = "auto",
                     band_names: Sequence[str] | None = None, boxes: str = "hbb") -> PreparedSummary:
    """Convert a UCAS-AOD folder into `out` with a seeded train/val split; the summary figures.

    Every label file is parsed (and errors raised) before anything is written; a failed run
    leaves no JSON and no patches (`ds2d2_cli.data.prepared`). The classes are `car` and
    `airplane` unless `classes` filters and orders them (a list) or checks them against a
    shipped set. `boxes` "obb" adds each object's rotated box (`rbox`, le90: the minimum-area
    rectangle of its polygon; the label's theta column is not used).
    """
    check_boxes(boxes)
    if not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction must be between 0 and 1, both excluded (got {val_fraction:g})")
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        root, out = Path(root), Path(out)
        inside = (out.resolve(), *out.resolve().parents)
        if out.resolve() == root.resolve() or any(d.resolve() in inside for d, _ in find_folders(root)):
            raise InputError("--out must be a folder of its own, not the UCAS-AOD folder or one of its data folders",
                             out)
        started = time.perf_counter()
        problems = Problems(skip_bad, held)
        plans = plan_ucas(root, val_fraction, seed, problems)
        class_names, filtered = resolve_classes(plans, classes, UCAS_CLASSES, problems)
        label = classes.label if classes is not None else None
        figures = write_prepared(plans, out, source="ucas-aod", class_names=class_names, classes_label=label,
                                 tiling=tiling, problems=problems, reporter=held, workers=workers,
                                 meta={"val_fraction": val_fraction, "seed": seed, "stratified_by": "folder"},
                                 report_splits={"train": [NO_SPLIT], "val": [NO_SPLIT]}, scaling=scaling,
                                 band_names=band_names, boxes=boxes)
        problems.flush()
        return PreparedSummary(source=str(root), out=str(out), classes=label, problems=problems.report(),
                               seconds=round(time.perf_counter() - started, 3), format="ucas-aod",
                               tiling=tiling.meta() if tiling is not None else None, splits=figures,
                               filtered=filtered, boxes=boxes)
