"""DOTA scenes -> fixed-size patches + COCO JSON, with the DOTA devkit's `ImgSplit` semantics.

Layout read: a split folder (`images/`, `labelTxt/`) or a folder of split folders
(`train/`, `val/`, `test/`, ...). Label files are the DOTA text format::

    imagesource:GoogleEarth
    gsd:0.146343590398
    x1 y1 x2 y2 x3 y3 x4 y4 class difficult

Written, for each split: `OUT/<split>/images/<scene>__<scale>__<left>___<top>.png`,
`OUT/<split>.json` (COCO of the patches) and `OUT/<split>_scenes.json` (COCO of the
whole, unsplit scenes, for evaluating merged patch detections).

Splitting follows the devkit: windows step by `size - gap`; the last window in each
direction is moved back to end at the scene border; a scene smaller than a window gets
one window at 0, and every patch is padded with zeros (black) on the right/bottom to
`size x size`. Scaled copies (scale != 1) are resized first (bilinear) and the polygons
scaled with them. Every patch is kept, empty ones included (as the devkit does).

Objects: the polygon is clipped to the window (the window itself clipped to the scene);
iof = clipped area / polygon area. Objects wholly inside are kept; partly inside ones
with iof >= `iof_thr` are kept with the clipped polygon's extent as box; smaller pieces
are dropped (`partial="drop"`) or kept with `iscrowd: 1` (`partial="crowd"`, the
devkit's "difficult 2" pieces). Pieces of no size are dropped and counted.

Bad input (see `ds2d2_cli.data.validate`): a label line that does not parse, an unknown
class, an image without a label file (when `labelTxt/` exists) or a label file without
an image, an empty label file, an image that cannot be read or is of another format, and
an object lying wholly outside its image stop the run with one line naming the file (and
line), or are skipped and reported with `skip_bad`. Zero-area objects are always dropped
and reported; self-intersecting quadrilaterals become their convex hull and objects
reaching past the image border are clipped to it, both counted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ds2d2_cli.classes import canonical_name, get_class_set
from ds2d2_cli.data.coco_writer import CocoWriter, PrepareSummary, relpath
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.polygons import clip_polygon, dedupe_vertices, fix_bowtie, polygon_area
from ds2d2_cli.data.tiling import check_window, window_origins, window_starts  # noqa: F401 - window_starts: API
from ds2d2_cli.data.validate import (
    IMAGE_EXTS,
    BadItem,
    Problems,
    held_progress,
    one_line,
    open_rgb,
    unsupported_extension,
    writable_folder,
)
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import staging
from ds2d2_cli.progress import NullReporter, Reporter

SCENES_SUFFIX = "_scenes"  # OUT/<split>_scenes.json: the whole scenes behind the patch split <split>

PARTIAL_MODES = ("drop", "crowd")
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
    repaired: list[int] = field(default_factory=list)  # lines of self-intersecting polygons made convex


def parse_dota_labels(path: str | Path, classes: Sequence[str], class_set: str = "",
                      on_bad: Callable[[BadItem], None] | None = None) -> DotaLabels:
    """Parse one DOTA `labelTxt` file; class names are normalised to `classes`' spelling.

    Object lines hold 8 coordinates, a class name and optionally the difficult flag
    (missing means 0; any non-zero value means difficult). A bad line (wrong number of
    fields, coordinates that are not finite numbers, an unknown class name, a bad
    difficult flag) raises a BadItem (an InputError naming file:line), or is handed to
    `on_bad` and left out when one is given (--skip-bad). A file that cannot be read, or
    holds nothing at all, is a BadItem for the whole file: a scene without objects is a
    file with only the `imagesource:` / `gsd:` header lines. Self-intersecting
    quadrilaterals (corners clicked out of order) become their convex hull; their line
    numbers are in `repaired`. Zero-area polygons are returned as they are (callers
    decide; `prepare_dota` reports and drops them).
    """
    path = Path(path)

    def bad(message: str, lineno: int, reason: str) -> None:
        exc = BadItem(message, path, lineno, reason=reason)
        if on_bad is None:
            raise exc
        on_bad(exc)

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BadItem("label file not found", path, reason="image without label file") from None
    except UnicodeDecodeError as exc:
        raise BadItem(f"cannot read label file: not UTF-8 text (bad byte at offset {exc.start})", path,
                      reason="unreadable label file") from None
    except OSError as exc:
        raise BadItem(f"cannot read label file: {one_line(exc.strerror or exc)}", path,
                      reason="unreadable label file") from None
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
        difficult = 0
        if len(tokens) == 10:
            try:
                flag = float(tokens[9])
            except ValueError:
                flag = float("nan")
            if not np.isfinite(flag):
                bad(f"difficult flag must be 0 or 1, got {tokens[9]!r}", lineno, "malformed line")
                continue
            difficult = 1 if int(flag) != 0 else 0
        quad = coords.reshape(4, 2)
        poly = fix_bowtie(quad)
        if poly.shape != quad.shape or not np.array_equal(poly, quad):
            labels.repaired.append(lineno)
        labels.objects.append(DotaObject(poly, name, difficult, lineno))
    return labels


# --------------------------------------------------------------------------- objects in windows


@dataclass
class SplitStats:
    patches: int = 0
    annotations: int = 0  # patch annotations kept, crowd included
    crowd: int = 0  # partial pieces kept with iscrowd 1
    dropped_iof: int = 0  # partial pieces dropped: iof < iof_thr
    degenerate: int = 0  # zero-area objects (once per scene) and zero-size pieces
    annotations_per_class: dict[str, int] = field(default_factory=dict)

    def add(self, other: "SplitStats") -> None:
        for name in ("patches", "annotations", "crowd", "dropped_iof", "degenerate"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.annotations_per_class.items():
            self.annotations_per_class[key] = self.annotations_per_class.get(key, 0) + value


def window_annotations(polys: Sequence[np.ndarray], category_ids: Sequence[int], difficult: Sequence[int],
                       window: tuple[float, float, float, float], iof_thr: float, partial: str,
                       stats: SplitStats | None = None, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """COCO annotations (no ids, no image_id) of the objects in one window, in patch pixels.

    `window` is (x0, y0, x1, y1) in (scaled) scene pixels, already clipped to the scene.
    Objects that do not overlap the window with positive area are simply not there;
    pieces with 0 < iof < iof_thr are dropped or kept as crowd (see module docstring).
    """
    stats = stats if stats is not None else SplitStats()
    x0, y0, x1, y1 = window
    out: list[dict[str, Any]] = []
    if not polys:
        return out
    ext = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polys])
    candidates = np.nonzero((ext[:, 0] < x1) & (ext[:, 2] > x0) & (ext[:, 1] < y1) & (ext[:, 3] > y0))[0]
    for i in candidates:
        poly = polys[i]
        area_full = polygon_area(poly)
        if area_full <= 0:
            continue  # counted once per scene by the caller
        inside = ext[i, 0] >= x0 and ext[i, 2] <= x1 and ext[i, 1] >= y0 and ext[i, 3] <= y1
        iscrowd = 0
        if inside:
            piece, area = poly, area_full
        else:
            piece = dedupe_vertices(clip_polygon(poly, window))
            area = polygon_area(piece)
            if area <= 0:
                continue  # only touches the window
            if min(area / area_full, 1.0) < iof_thr:
                if partial == "drop":
                    stats.dropped_iof += 1
                    continue
                iscrowd = 1
        local = piece - np.array([x0, y0])
        bx0, by0 = _r(local[:, 0].min()), _r(local[:, 1].min())
        bx1, by1 = _r(local[:, 0].max()), _r(local[:, 1].max())
        w, h = _r(bx1 - bx0), _r(by1 - by0)
        if w <= 0 or h <= 0 or _r(area) <= 0:
            stats.degenerate += 1
            continue
        out.append({
            "category_id": int(category_ids[i]),
            "bbox": [bx0, by0, w, h],
            "area": _r(area),
            "iscrowd": iscrowd,
            "segmentation": [[_r(v) for v in local.reshape(-1)]],
            "difficult": int(difficult[i]),
        })
        stats.annotations += 1
        stats.crowd += iscrowd
        if class_names is not None:
            name = class_names[int(category_ids[i]) - 1]
            stats.annotations_per_class[name] = stats.annotations_per_class.get(name, 0) + 1
    return out


# --------------------------------------------------------------------------- one scene (worker)


@dataclass(frozen=True)
class SceneJob:
    image_path: Path
    stem: str
    polys: tuple[np.ndarray, ...]
    category_ids: tuple[int, ...]
    difficult: tuple[int, ...]
    out_dir: Path  # the split's staging folder: patches go to out_dir/images/
    split: str
    size: int
    gap: int
    scales: tuple[float, ...]
    iof_thr: float
    partial: str
    class_names: tuple[str, ...]
    label_path: Path | None = None
    lines: tuple[int, ...] = ()  # label-file line of each polygon


def scene_objects(polys: Sequence[np.ndarray], width: int, height: int) -> dict[str, Any]:
    """Which objects lie in the `width x height` scene: their boxes there, and which stick out.

    "kept": indices with area inside the scene; "boxes": their [x, y, w, h] clipped to
    it; "clipped": kept indices reaching past the border; "outside": indices with no
    area inside (bad items: a label that does not belong to this image).
    """
    scene = (0.0, 0.0, float(width), float(height))
    kept: list[int] = []
    boxes: list[list[float]] = []
    clipped: list[int] = []
    outside: list[int] = []
    for i, poly in enumerate(polys):
        inside = (poly[:, 0].min() >= 0 and poly[:, 1].min() >= 0
                  and poly[:, 0].max() <= width and poly[:, 1].max() <= height)
        piece = poly if inside else dedupe_vertices(clip_polygon(poly, scene))
        if len(piece) == 0:
            outside.append(i)
            continue
        x0, y0 = _r(piece[:, 0].min()), _r(piece[:, 1].min())
        w, h = _r(piece[:, 0].max() - x0), _r(piece[:, 1].max() - y0)
        if w <= 0 or h <= 0 or polygon_area(piece) <= 0:
            outside.append(i)
            continue
        kept.append(i)
        boxes.append([x0, y0, w, h])
        if not inside:
            clipped.append(i)
    return {"kept": kept, "boxes": boxes, "clipped": clipped, "outside": outside}


def split_scene(job: SceneJob) -> dict[str, Any]:
    """Cut one scene into patches (written as PNG) and return their records and counts.

    Raises BadItem (before writing anything) when the image cannot be read. Objects with
    no area inside the image are left out of the patches and returned under "outside";
    the caller decides whether that stops the run.
    """
    from PIL import Image

    image = open_rgb(job.image_path)
    width, height = image.size
    placed = scene_objects(job.polys, width, height)
    kept = placed["kept"]
    stats = SplitStats()
    patches: list[dict[str, Any]] = []
    images_dir = job.out_dir / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Ds2d2Error(f"cannot write patches: {one_line(exc.strerror or exc)}", job.out_dir.parent) from None
    category_ids = [job.category_ids[i] for i in kept]
    difficult = [job.difficult[i] for i in kept]
    for scale in job.scales:
        if scale == 1:
            scaled, polys = image, [job.polys[i] for i in kept]
        else:
            new_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
            scaled = image.resize(new_size, Image.BILINEAR)
            polys = [job.polys[i] * scale for i in kept]
        sw, sh = scaled.size
        for left, top in window_origins(sw, sh, job.size, job.gap):
            window = (left, top, min(left + job.size, sw), min(top + job.size, sh))
            anns = window_annotations(polys, category_ids, difficult, window, job.iof_thr, job.partial,
                                      stats, job.class_names)
            name = f"{job.stem}__{scale:g}__{left}___{top}.png"
            # crop() beyond the scene border fills with zeros: the devkit's padding.
            patch = scaled.crop((left, top, left + job.size, top + job.size))
            try:
                patch.save(images_dir / name, format="PNG", compress_level=1)
            except OSError as exc:
                raise Ds2d2Error(f"cannot write patch {name}: {one_line(exc.strerror or exc)}",
                                 job.out_dir.parent) from None
            patches.append({
                "file_name": f"{job.split}/images/{name}",
                "width": job.size,
                "height": job.size,
                "window": [left, top],
                "scale": scale,
                "annotations": anns,
            })
            stats.patches += 1
    return {"stem": job.stem, "width": width, "height": height, "patches": patches, "stats": stats, **placed}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _split_scene_safe(job: SceneJob) -> tuple[str, Any]:
    """Worker entry: library errors come back as plain tuples (they pickle reliably)."""
    try:
        return "ok", split_scene(job)
    except BadItem as exc:
        return "bad", (exc.message, str(exc.path) if exc.path else None, exc.line, exc.reason)
    except Ds2d2Error as exc:
        return "error", (isinstance(exc, InputError), exc.message, str(exc.path) if exc.path else None, exc.line)


def _unwrap(outcome: tuple[str, Any]) -> dict[str, Any] | BadItem:
    kind, payload = outcome
    if kind == "ok":
        return payload
    if kind == "bad":
        message, path, line, reason = payload
        return BadItem(message, path, line, reason=reason)
    is_input, message, path, line = payload
    raise (InputError if is_input else Ds2d2Error)(message, path, line)


def _split_serial(job: SceneJob) -> dict[str, Any] | BadItem:
    try:
        return split_scene(job)
    except BadItem as exc:
        return exc


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
    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    unique: list[Path] = []
    for stem, group in by_stem.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        names = ", ".join(p.name for p in group)
        for p in group:
            problems.bad(BadItem(f"two images share the name {stem!r} ({names}): which label file is whose is "
                                 "ambiguous", p, reason="duplicate image name"), "image", split=split, image=stem)
    return sorted(unique)


# --------------------------------------------------------------------------- the whole job


def _check_options(size: int, gap: int, scales: Sequence[float], iof_thr: float, partial: str) -> None:
    check_window(size, gap)
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise InputError(f"--scales must be positive numbers (got {', '.join(f'{s:g}' for s in scales) or 'none'})")
    if len(set(scales)) != len(scales):
        raise InputError("--scales lists a scale twice")
    if not 0 < iof_thr <= 1:
        raise InputError(f"--iof-thr must be in (0, 1] (got {iof_thr:g})")
    if partial not in PARTIAL_MODES:
        raise InputError(f"--partial must be one of {', '.join(PARTIAL_MODES)} (got {partial!r})")


@dataclass
class _Scene:
    image: Path
    labels: DotaLabels | None
    objects: list[DotaObject]  # non-degenerate


@dataclass
class _Plan:
    split: str
    folder: Path
    labelled: bool
    scenes: list[_Scene]
    degenerate: int = 0


def _plan_split(split: str, folder: Path, class_names: Sequence[str], classes: str,
                problems: Problems) -> _Plan:
    """Read and check one split's images and labels; nothing is written."""
    images_dir = folder / "images"
    images = list_images(images_dir, problems, split)
    label_dir = folder / "labelTxt"
    labelled = label_dir.is_dir()
    plan = _Plan(split, folder, labelled, [])
    for image in images:
        if not labelled:
            plan.scenes.append(_Scene(image, None, []))
            continue
        where = {"split": split, "image": image.stem}
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
        objects: list[DotaObject] = []
        for obj in labels.objects:
            if polygon_area(obj.poly) <= 0:
                problems.drop(BadItem("zero-area polygon (its corners lie on one line or point)", label_path, obj.line,
                                      reason="zero-area object"), "object", **where)
                plan.degenerate += 1
                continue
            objects.append(obj)
            if obj.line in labels.repaired:
                problems.repair(BadItem("corners out of order (the outline crosses itself): replaced by their "
                                        "convex hull", label_path, obj.line, reason="self-intersecting polygon"),
                                "object", **where)
        plan.scenes.append(_Scene(image, labels, objects))
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


def _run_jobs(jobs: list[SceneJob], workers: int, problems: Problems, task: Any) -> list[dict[str, Any] | BadItem]:
    """Split every scene; a bad image stops the run at once unless --skip-bad."""
    results: list[dict[str, Any] | BadItem | None] = [None] * len(jobs)

    def receive(i: int, outcome: dict[str, Any] | BadItem) -> None:
        if isinstance(outcome, BadItem):
            if not problems.skip_bad:
                raise outcome
        elif outcome["outside"] and not problems.skip_bad:
            raise _outside_error(jobs[i], outcome, outcome["outside"][0])
        results[i] = outcome
        task.update(1, patches=0 if isinstance(outcome, BadItem) else outcome["stats"].patches)

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_ignore_sigint) as pool:
            futures = {pool.submit(_split_scene_safe, job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=0.5)
                    for fut in done:
                        receive(futures[fut], _unwrap(fut.result()))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    else:
        for i, job in enumerate(jobs):
            receive(i, _split_serial(job))
    return results  # type: ignore[return-value]


def _outside_error(job: SceneJob, result: dict[str, Any], index: int) -> BadItem:
    poly = job.polys[index]
    return BadItem(f"object lies outside its {result['width']}x{result['height']} image (x {poly[:, 0].min():g} to "
                   f"{poly[:, 0].max():g}, y {poly[:, 1].min():g} to {poly[:, 1].max():g})",
                   job.label_path, job.lines[index], reason="object outside image")


@dataclass
class DotaSplitSummary:
    """One split of `prepare_dota`: what was read and written."""

    scenes: int
    patches: int
    labelled: bool
    objects: int  # scene objects kept
    annotations: int  # patch annotations, crowd included
    crowd: int
    dropped_iof: int
    degenerate: int
    skipped: int
    repaired: int
    objects_per_class: dict[str, int]
    annotations_per_class: dict[str, int]
    json: str


@dataclass
class DotaSummary(PrepareSummary):
    """What `prepare_dota` did: its settings and, per split, the figures (`to_dict()`: the --json summary)."""

    patch_size: int
    gap: int
    scales: list[float]
    iof_thr: float
    partial: str
    splits: dict[str, DotaSplitSummary]


def prepare_dota(src: str | Path, out: str | Path, *, size: int = 1024, gap: int = 200,
                 scales: Sequence[float] = (1.0,), iof_thr: float = 0.7, workers: int = 1,
                 classes: str = "dota-v1.0", partial: str = "drop", skip_bad: bool = False,
                 reporter: Reporter | None = None) -> DotaSummary:
    """Split every DOTA split under `src` into patches under `out`; returns the summary figures.

    All label files are parsed (and errors raised) before any patch is written. Patches
    are written to a hidden staging folder per split and moved into `out/<split>/images`
    only when every split succeeded; the JSON files are written last and atomically, so a
    failed run leaves no JSON and no partial patches behind. `skip_bad` skips bad images,
    label files and lines instead of stopping (see `ds2d2_cli.data.validate`); the
    summary and each JSON's `info.skipped` list everything left out. `workers` > 1 splits
    scenes in that many processes (0: one per CPU); the output is the same whatever the
    number of workers.
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        return _prepare_dota(Path(src), Path(out), size=size, gap=gap, scales=scales, iof_thr=iof_thr,
                             workers=workers, classes=classes, partial=partial, skip_bad=skip_bad, reporter=held)


def _prepare_dota(src: Path, out: Path, *, size: int, gap: int, scales: Sequence[float], iof_thr: float,
                  workers: int, classes: str, partial: str, skip_bad: bool, reporter: Reporter) -> DotaSummary:
    scales = tuple(float(s) for s in scales)
    _check_options(size, gap, scales, iof_thr, partial)
    class_names = get_class_set(classes)
    splits = find_splits(src)
    for split, folder in splits:
        if out.resolve() in (folder.resolve(), src.resolve()) or (out / split).resolve() == folder.resolve():
            raise InputError("--out must be a folder of its own, not the DOTA source", out)
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise InputError(f"--workers must be 0 (one per CPU) or more (got {workers})")
    started = time.perf_counter()
    problems = Problems(skip_bad, reporter)
    cat_index = {name: i + 1 for i, name in enumerate(class_names)}

    # Parse every split's labels first: bad input fails the run before anything is written.
    plans = [_plan_split(split, folder, class_names, classes, problems) for split, folder in splits]
    for plan in plans:
        if not plan.labelled:
            problems.note(f"{plan.split}: no labelTxt/ folder, writing image-only JSON")
    writable_folder(out)
    # A stale JSON from an earlier run must not describe patches this run rewrites.
    for plan in plans:
        for stale in (out / f"{plan.split}.json", out / f"{plan.split}{SCENES_SUFFIX}.json"):
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                raise Ds2d2Error(f"cannot replace: {one_line(exc.strerror or exc)}", stale) from None

    # Every split succeeded: the JSON files are written under temporary names, the patches
    # moved into place, then the JSON files renamed; a failure on the way leaves neither.
    outputs: list[tuple[Path, dict[str, Any]]] = []
    split_summaries: dict[str, DotaSplitSummary] = {}
    with staging(out) as stage:
        for plan in plans:
            staged = stage.folder(f".{plan.split}.", ".tmp")
            stage.publish_contents(staged / "images", out / plan.split / "images", "patches")
            summary, documents = _split_plan(plan, staged, out, class_names, cat_index, size=size, gap=gap,
                                             scales=scales, iof_thr=iof_thr, partial=partial, workers=workers,
                                             problems=problems, reporter=reporter)
            meta = {"source": "dota", "classes": classes, "split": plan.split, "patch_size": size, "gap": gap,
                    "scales": list(scales), "iof_thr": iof_thr, "partial": partial, "padded": True,
                    "labelled": plan.labelled}
            skipped, repaired = problems.skipped_where(split=plan.split), problems.repaired_where(split=plan.split)
            scenes_writer, patches_writer = documents
            outputs.append((out / f"{plan.split}{SCENES_SUFFIX}.json",
                            scenes_writer.document({**meta, "scenes": True}, skipped, repaired)))
            outputs.append((out / f"{plan.split}.json", patches_writer.document(meta, skipped, repaired)))
            summary.skipped, summary.repaired = len(skipped), len(repaired)
            split_summaries[plan.split] = summary
        for path, document in outputs:
            stage.write_json(path, document)
    problems.flush()
    return DotaSummary(source=str(src), out=str(out), classes=classes, patch_size=size, gap=gap,
                       scales=list(scales), iof_thr=iof_thr, partial=partial, splits=split_summaries,
                       problems=problems.report(), seconds=round(time.perf_counter() - started, 3))


def _split_plan(plan: _Plan, staged: Path, out: Path, class_names: Sequence[str], cat_index: dict[str, int], *,
                size: int, gap: int, scales: tuple[float, ...], iof_thr: float, partial: str, workers: int,
                problems: Problems, reporter: Reporter) -> tuple[DotaSplitSummary, tuple[CocoWriter, CocoWriter]]:
    """Cut one split's scenes into patches in `staged`; its figures and its two COCO files (scenes, patches)."""
    split = plan.split
    split_stats = SplitStats(degenerate=plan.degenerate)
    jobs = [SceneJob(
        image_path=scene.image, stem=scene.image.stem, polys=tuple(o.poly for o in scene.objects),
        category_ids=tuple(cat_index[o.name] for o in scene.objects),
        difficult=tuple(o.difficult for o in scene.objects), out_dir=staged, split=split, size=size,
        gap=gap, scales=scales, iof_thr=iof_thr, partial=partial, class_names=tuple(class_names),
        label_path=scene.labels.path if scene.labels else None, lines=tuple(o.line for o in scene.objects),
    ) for scene in plan.scenes]
    task = reporter.task(f"split {split}", total=len(jobs))
    try:
        results = _run_jobs(jobs, workers, problems, task)
    finally:
        task.close()

    # Assemble in scene-name order: ids and reports do not depend on which worker finished first.
    scenes, patches = CocoWriter(class_names), CocoWriter(class_names)
    for job, scene, result in zip(jobs, plan.scenes, results):
        where = {"split": split, "image": job.stem}
        if isinstance(result, BadItem):
            problems.bad(result, "image", **where)
            continue
        for index in result["outside"]:
            problems.bad(_outside_error(job, result, index), "object", **where)
        for index in result["clipped"]:
            problems.repair(BadItem(f"object extends past its {result['width']}x{result['height']} image: "
                                    "clipped to it", job.label_path, job.lines[index],
                                    reason="object partly outside image"), "object", **where)
        split_stats.add(result["stats"])
        width, height = result["width"], result["height"]
        scene_image: dict[str, Any] = {"file_name": relpath(job.image_path, out), "width": width, "height": height}
        if scene.labels is not None:
            scene_image["imagesource"] = scene.labels.imagesource
            scene_image["gsd"] = scene.labels.gsd
        scene_id = scenes.add_image(scene_image)
        for index, box in zip(result["kept"], result["boxes"]):
            poly = job.polys[index]
            scenes.add_annotation(scene_id, job.category_ids[index], {
                "bbox": box, "area": _r(polygon_area(poly)), "iscrowd": 0,
                "segmentation": [[_r(v) for v in poly.reshape(-1)]], "difficult": job.difficult[index],
            })
        for patch in result["patches"]:
            image_id = patches.add_image({
                "file_name": patch["file_name"], "width": patch["width"], "height": patch["height"],
                "scene": job.stem, "scene_width": width, "scene_height": height, "window": patch["window"],
                "scale": patch["scale"], "scene_id": scene_id,
            })
            for ann in patch["annotations"]:
                patches.add_annotation(image_id, ann["category_id"], ann)
    if not scenes.images:
        raise InputError(f"no usable image left in split {split!r}: every one was skipped as bad",
                         plan.folder / "images")
    problems.note_repairs(f"{split}: ", problems.repaired_where(split=split))
    summary = DotaSplitSummary(
        scenes=len(scenes.images), patches=split_stats.patches, labelled=plan.labelled,
        objects=len(scenes.annotations), annotations=split_stats.annotations, crowd=split_stats.crowd,
        dropped_iof=split_stats.dropped_iof, degenerate=split_stats.degenerate, skipped=0, repaired=0,
        objects_per_class=scenes.per_class,
        annotations_per_class={n: split_stats.annotations_per_class.get(n, 0) for n in class_names},
        json=str(out / f"{split}.json"))
    return summary, (scenes, patches)
