"""DOTA scenes -> fixed-size patches + COCO JSON, with the DOTA devkit's `ImgSplit` semantics.

Layout read: a split folder (`images/`, `labelTxt/`) or a folder of split folders
(`train/`, `val/`, `test/`, ...). Label files are the DOTA text format::

    imagesource:GoogleEarth
    gsd:0.146343590398
    x1 y1 x2 y2 x3 y3 x4 y4 class difficult

This module only reads the format; the tiling (`ds2d2_cli.data.tiling`), the object policy
(`ds2d2_cli.data.scenes`) and the writer (`ds2d2_cli.data.prepared`) are the ones every
converter shares. Written, for each split: `OUT/<split>/images/<scene>__<scale>__<left>___<top>.png`
(`.tif`, every band kept, for scenes other than 8-bit RGB), `OUT/<split>.json` (COCO of the
patches) and `OUT/<split>_scenes.json` (COCO of the whole, unsplit scenes, for evaluating
merged patch detections).

Bad input (see `ds2d2_cli.data.validate`): a label line that does not parse, an unknown
class, an image without a label file (when `labelTxt/` exists) or a label file without
an image, an empty label file, an image that cannot be read or is of another format, and
an object lying wholly outside its image stop the run with one line naming the file (and
line), or are skipped and reported with `skip_bad`. Zero-area objects are always dropped
and reported; self-intersecting quadrilaterals become their convex hull and objects
reaching past the image border are clipped to it, both counted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ds2d2_cli.classes import canonical_name, get_class_set
from ds2d2_cli.data.coco_writer import check_boxes
from ds2d2_cli.data.prepared import SCENES_SUFFIX, PreparedSummary, write_prepared  # noqa: F401 - SCENES_SUFFIX: API
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan
from ds2d2_cli.data.tiling import (  # noqa: F401 - the grid and window rule: API here too
    PARTIAL_MODES, SplitStats, Tiling, window_annotations, window_origins, window_starts,
)
from ds2d2_cli.data.validate import (
    difficult_flag,
    one_image_per_stem,
    read_label_text,
    IMAGE_EXTS,
    BadItem,
    Problems,
    held_progress,
    one_line,
    unsupported_extension,
)
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

_SPLIT_ORDER = {"train": 0, "val": 1, "trainval": 2, "test": 3}
_HEADER = re.compile(r"^\s*(imagesource|gsd)\s*:(.*)$", re.IGNORECASE)
MAX_COORDINATE = 1e7  # px; DOTA scenes reach 20000 px, anything this far out is a broken line


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class DotaObject:
    poly: np.ndarray  # (N, 2) float64, scene pixels
    name: str  # canonical class name
    difficult: int  # 0 / 1
    line: int  # 1-based line in the label file


@dataclass
class DotaLabels:
    path: Path
    imagesource: str | None = None
    gsd: float | None = None
    objects: list[DotaObject] = field(default_factory=list)


def parse_dota_labels(path: str | Path, classes: Sequence[str], class_set: str = "",
                      on_bad: Callable[[BadItem], None] | None = None) -> DotaLabels:
    """Parse one DOTA `labelTxt` file; class names are normalised to `classes`' spelling.

    Object lines hold 8 coordinates, a class name and optionally the difficult flag
    (missing means 0; any non-zero value means difficult). A bad line (wrong number of
    fields, coordinates that are not finite numbers, an unknown class name, a bad
    difficult flag) raises a BadItem (an InputError naming file:line), or is handed to
    `on_bad` and left out when one is given (--skip-bad). A file that cannot be read, or
    holds nothing at all, is a BadItem for the whole file: a scene without objects is a
    file with only the `imagesource:` / `gsd:` header lines. Polygons are returned as
    written: the shared object policy (`ds2d2_cli.data.scenes`) repairs bow-ties and drops
    zero-area ones.
    """
    path = Path(path)

    def bad(message: str, lineno: int, reason: str) -> None:
        exc = BadItem(message, path, lineno, reason=reason)
        if on_bad is None:
            raise exc
        on_bad(exc)

    text = read_label_text(path)
    if not text.strip():
        raise BadItem("empty label file (a scene without objects keeps the imagesource:/gsd: header lines)", path,
                      reason="empty label file")
    labels = DotaLabels(path)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        header = _HEADER.match(line)
        if header:
            key, value = header.group(1).lower(), header.group(2).strip()
            if key == "imagesource":
                labels.imagesource = value or None
            else:
                try:
                    labels.gsd = float(value)
                except ValueError:
                    labels.gsd = None  # DOTA writes `gsd:null` / `gsd:None` when unknown
                if labels.gsd is not None and not np.isfinite(labels.gsd):
                    labels.gsd = None
            continue
        tokens = line.split()
        if len(tokens) not in (9, 10):
            bad(f"expected 8 coordinates, a class name and a difficult flag, got {len(tokens)} fields", lineno,
                "malformed line")
            continue
        try:
            coords = np.array([float(t) for t in tokens[:8]], dtype=np.float64)
        except ValueError:
            bad("the first 8 fields must be numbers (x1 y1 ... x4 y4)", lineno, "malformed line")
            continue
        if not np.all(np.isfinite(coords)):
            bad("coordinates must be finite numbers", lineno, "malformed line")
            continue
        if np.abs(coords).max() > MAX_COORDINATE:
            bad(f"coordinate {coords[np.abs(coords).argmax()]:g} is far outside any image "
                f"(more than {MAX_COORDINATE:g} px)", lineno, "object outside image")
            continue
        name = canonical_name(tokens[8], classes)
        if name is None:
            where = f" of class set {class_set}" if class_set else ""
            bad(f"unknown class {tokens[8]!r} (not one of the {len(classes)} classes{where}; "
                "pick another with --classes)", lineno, "unknown class")
            continue
        difficult = difficult_flag(tokens[9]) if len(tokens) == 10 else 0
        if difficult is None:
            bad(f"difficult flag must be 0 or 1, got {tokens[9]!r}", lineno, "malformed line")
            continue
        labels.objects.append(DotaObject(coords.reshape(4, 2), name, difficult, lineno))
    return labels


# --------------------------------------------------------------------------- folders


def find_splits(src: str | Path) -> list[tuple[str, Path]]:
    """[(split name, folder)] for a split folder or a folder of split folders."""
    src = Path(src)
    if not src.is_dir():
        raise InputError("DOTA source folder not found", src)
    if (src / "images").is_dir():
        return [(src.resolve().name, src)]
    found = [(d.name, d) for d in src.iterdir() if d.is_dir() and (d / "images").is_dir()]
    if not found:
        raise InputError(
            "no DOTA split here: expected images/ and labelTxt/, or split folders (train/, val/, test/) holding them",
            src,
        )
    return sorted(found, key=lambda item: (_SPLIT_ORDER.get(item[0], 99), item[0]))


def list_images(folder: Path, problems: Problems | None = None, split: str = "") -> list[Path]:
    """The scene images in `folder`, by name; hidden files (.DS_Store ...) and sub-folders are ignored.

    A file of another format, or two images with the same stem (which label file is
    whose?), is a bad item: raised, or with `problems` under --skip-bad skipped and reported.
    """
    problems = problems if problems is not None else Problems()
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list images: {one_line(exc.strerror or exc)}", folder) from None
    images: list[Path] = []
    for p in entries:
        if p.suffix.lower() in IMAGE_EXTS:
            images.append(p)
        else:
            problems.bad(unsupported_extension(p), "image", split=split, image=p.stem)
    return one_image_per_stem(images, problems, lambda stem: {"split": split, "image": stem})


# --------------------------------------------------------------------------- the whole job


def plan_dota_split(split: str, folder: Path, class_names: Sequence[str], classes: str,
                    problems: Problems) -> SplitPlan:
    """Read and check one split's images and labels into scenes; nothing is written."""
    images_dir = folder / "images"
    images = list_images(images_dir, problems, split)
    label_dir = folder / "labelTxt"
    labelled = label_dir.is_dir()
    plan = SplitPlan(split, images_dir, [], labelled)
    for image in images:
        where = {"split": split, "image": image.stem}
        if not labelled:
            plan.scenes.append(Scene(image, image.stem, [], where=where))
            continue
        label_path = label_dir / f"{image.stem}.txt"
        if not label_path.is_file():
            problems.bad(BadItem(f"no label file for image {image.name} (a scene without objects needs one with "
                                 "just the imagesource:/gsd: header lines)", label_path,
                                 reason="image without label file"), "image", **where)
            continue
        try:
            labels = parse_dota_labels(label_path, class_names, classes,
                                       on_bad=lambda exc: problems.bad(exc, "line", **where))
        except BadItem as exc:  # the whole file (unreadable or empty), or a bad line without --skip-bad
            problems.bad(exc, "image", **where)
            continue
        objects = [SceneObject(o.poly, o.name, o.difficult, line=o.line) for o in labels.objects]
        plan.scenes.append(Scene(image, image.stem, objects, label_path=label_path,
                                 fields={"imagesource": labels.imagesource, "gsd": labels.gsd}, where=where))
    if labelled:
        try:
            stems = {p.stem for p in images_dir.iterdir() if p.is_file()}
            label_files = sorted(p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        except OSError as exc:
            raise InputError(f"cannot list files: {one_line(exc.strerror or exc)}", folder) from None
        for orphan in label_files:
            if orphan.stem not in stems:
                problems.bad(BadItem(f"label file without an image (no {orphan.stem}.png, .jpg ... in "
                                     f"{images_dir})", orphan, reason="label file without image"),
                             "label file", split=split, image=orphan.stem)
    if not plan.scenes:
        if not images and not problems.skipped_where(split=split):
            raise InputError("no images here", images_dir)
        raise InputError(f"no usable image left in split {split!r}: every one was skipped as bad", images_dir)
    return plan


def prepare_dota(src: str | Path, out: str | Path, *, size: int = 1024, gap: int = 200,
                 scales: Sequence[float] = (1.0,), iof_thr: float = 0.7, workers: int = 1,
                 classes: str = "dota-v1.0", partial: str = "drop", skip_bad: bool = False,
                 reporter: Reporter | None = None, scaling: str = "auto",
                 band_names: Sequence[str] | None = None, boxes: str = "hbb") -> PreparedSummary:
    """Split every DOTA split under `src` into patches under `out`; returns the summary figures.

    All label files are parsed (and errors raised) before any patch is written; a failed
    run leaves no JSON and no partial patches behind (`ds2d2_cli.data.prepared`).
    `skip_bad` skips bad images, label files and lines instead of stopping; the summary
    and each JSON's `info.skipped` list everything left out. `workers` > 1 splits scenes
    in that many processes (0: one per CPU); the output is the same whatever the number.
    `boxes` "obb" adds each object's rotated box (`rbox`, le90; cut objects as the devkit
    writes them: `ds2d2_cli.data.tiling`).
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        src, out = Path(src), Path(out)
        tiling = Tiling(size, gap, tuple(float(s) for s in scales), iof_thr, partial).check()
        check_boxes(boxes)
        class_names = get_class_set(classes)
        splits = find_splits(src)
        for split, folder in splits:
            if out.resolve() in (folder.resolve(), src.resolve()) or (out / split).resolve() == folder.resolve():
                raise InputError("--out must be a folder of its own, not the DOTA source", out)
        started = time.perf_counter()
        problems = Problems(skip_bad, held)
        plans = [plan_dota_split(split, folder, class_names, classes, problems) for split, folder in splits]
        for plan in plans:
            if not plan.labelled:
                problems.note(f"{plan.name}: no labelTxt/ folder, "
                              "writing image-only JSON")
        figures = write_prepared(plans, out, source="dota", class_names=class_names, classes_label=classes,
                                 tiling=tiling, problems=problems, reporter=held, workers=workers,
                                 scaling=scaling, band_names=band_names, boxes=boxes)
        problems.flush()
        return PreparedSummary(source=str(src), out=str(out), classes=classes, problems=problems.report(),
                               seconds=round(time.perf_counter() - started, 3), format="dota",
                               tiling=tiling.meta(), splits=figures, boxes=boxes)
