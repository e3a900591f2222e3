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
devkit's "difficult 2" pieces). Zero-area objects and pieces are dropped.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.classes import canonical_name, get_class_set
from ds2d2_cli.data.polygons import clip_polygon, dedupe_vertices, fix_bowtie, polygon_area
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import atomic_path, write_json
from ds2d2_cli.progress import NullReporter, Reporter

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PARTIAL_MODES = ("drop", "crowd")
_SPLIT_ORDER = {"train": 0, "val": 1, "trainval": 2, "test": 3}
_HEADER = re.compile(r"^\s*(imagesource|gsd)\s*:(.*)$", re.IGNORECASE)


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


def parse_dota_labels(path: str | Path, classes: Sequence[str], class_set: str = "") -> DotaLabels:
    """Parse one DOTA `labelTxt` file; class names are normalised to `classes`' spelling.

    Raises InputError (file:line) for malformed lines and unknown class names.
    Object lines hold 8 coordinates, a class name and optionally the difficult flag
    (missing means 0; any non-zero value means difficult).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("label file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read label file: {exc}", path) from None
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
            raise InputError(
                f"expected 8 coordinates, a class name and a difficult flag, got {len(tokens)} fields", path, lineno
            )
        try:
            coords = np.array([float(t) for t in tokens[:8]], dtype=np.float64)
        except ValueError:
            raise InputError("the first 8 fields must be numbers (x1 y1 ... x4 y4)", path, lineno) from None
        if not np.all(np.isfinite(coords)):
            raise InputError("coordinates must be finite numbers", path, lineno)
        name = canonical_name(tokens[8], classes)
        if name is None:
            where = f" of class set {class_set}" if class_set else ""
            raise InputError(
                f"unknown class {tokens[8]!r} (not one of the {len(classes)} classes{where}; "
                "pick another with --classes)", path, lineno,
            )
        difficult = 0
        if len(tokens) == 10:
            try:
                difficult = 1 if int(float(tokens[9])) != 0 else 0
            except ValueError:
                raise InputError(f"difficult flag must be 0 or 1, got {tokens[9]!r}", path, lineno) from None
        labels.objects.append(DotaObject(fix_bowtie(coords.reshape(4, 2)), name, difficult, lineno))
    return labels


# --------------------------------------------------------------------------- windows


def window_starts(length: int, size: int, gap: int) -> list[int]:
    """Window origins along one axis, exactly as the DOTA devkit's ImgSplit loop.

    Step `size - gap`; the window that would reach the border is moved back to end at
    it (`length - size`); a length <= size gives the single origin 0.
    """
    if size <= 0 or gap < 0 or gap >= size:
        raise InputError(f"need 0 <= gap < split size (got split {size}, gap {gap})")
    step = size - gap
    starts: list[int] = []
    pos = 0
    while pos < length:
        if pos + size >= length:
            pos = max(length - size, 0)
        starts.append(pos)
        if pos + size >= length:
            break
        pos += step
    return starts or [0]


def window_origins(width: int, height: int, size: int, gap: int) -> list[tuple[int, int]]:
    """(left, top) of every window of a `width x height` scene, left-major like the devkit."""
    tops = window_starts(height, size, gap)
    return [(left, top) for left in window_starts(width, size, gap) for top in tops]


# --------------------------------------------------------------------------- objects in windows


@dataclass
class SplitStats:
    patches: int = 0
    annotations: int = 0  # patch annotations kept, crowd included
    crowd: int = 0  # partial pieces kept with iscrowd 1
    dropped_iof: int = 0  # partial pieces dropped: iof < iof_thr
    degenerate: int = 0  # zero-area objects (once per scene) and zero-size pieces
    objects: int = 0  # scene objects (non-degenerate)
    objects_per_class: dict[str, int] = field(default_factory=dict)
    annotations_per_class: dict[str, int] = field(default_factory=dict)

    def add(self, other: "SplitStats") -> None:
        for name in ("patches", "annotations", "crowd", "dropped_iof", "degenerate", "objects"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.objects_per_class, other.objects_per_class),
                             (self.annotations_per_class, other.annotations_per_class)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value


def _r(value: float) -> float:
    return round(float(value), 2)


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
    out_dir: Path  # OUT
    split: str
    size: int
    gap: int
    scales: tuple[float, ...]
    iof_thr: float
    partial: str
    class_names: tuple[str, ...]


def open_rgb(path: Path):
    """Decode an image as RGB (no decompression-bomb limit: DOTA scenes reach 20000 px)."""
    from PIL import Image, UnidentifiedImageError

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except FileNotFoundError:
        raise InputError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image: {exc}", path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def split_scene(job: SceneJob) -> dict[str, Any]:
    """Cut one scene into patches (written as PNG) and return their records and counts."""
    from PIL import Image

    image = open_rgb(job.image_path)
    width, height = image.size
    stats = SplitStats()
    patches: list[dict[str, Any]] = []
    images_dir = job.out_dir / job.split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for scale in job.scales:
        if scale == 1:
            scaled, polys = image, list(job.polys)
        else:
            new_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
            scaled = image.resize(new_size, Image.BILINEAR)
            polys = [p * scale for p in job.polys]
        sw, sh = scaled.size
        for left, top in window_origins(sw, sh, job.size, job.gap):
            window = (left, top, min(left + job.size, sw), min(top + job.size, sh))
            anns = window_annotations(polys, job.category_ids, job.difficult, window, job.iof_thr, job.partial,
                                      stats, job.class_names)
            name = f"{job.stem}__{scale:g}__{left}___{top}.png"
            # crop() beyond the scene border fills with zeros: the devkit's padding.
            patch = scaled.crop((left, top, left + job.size, top + job.size))
            with atomic_path(images_dir / name) as tmp:
                patch.save(tmp, format="PNG", compress_level=1)
            patches.append({
                "file_name": f"{job.split}/images/{name}",
                "width": job.size,
                "height": job.size,
                "window": [left, top],
                "scale": scale,
                "annotations": anns,
            })
            stats.patches += 1
    return {"stem": job.stem, "width": width, "height": height, "patches": patches, "stats": stats}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _split_scene_safe(job: SceneJob) -> tuple[str, Any]:
    """Worker entry: library errors come back as plain tuples (they pickle reliably)."""
    try:
        return "ok", split_scene(job)
    except Ds2d2Error as exc:
        return "error", (isinstance(exc, InputError), exc.message, str(exc.path) if exc.path else None, exc.line)


def _unwrap(outcome: tuple[str, Any]) -> dict[str, Any]:
    kind, payload = outcome
    if kind == "ok":
        return payload
    is_input, message, path, line = payload
    raise (InputError if is_input else Ds2d2Error)(message, path, line)


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


def list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise InputError(f"two images share the name {p.stem!r} ({stems[p.stem].name}, {p.name})", folder)
        stems[p.stem] = p
    return images


def _relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


# --------------------------------------------------------------------------- the whole job


def _check_options(size: int, gap: int, scales: Sequence[float], iof_thr: float, partial: str) -> None:
    if size <= 0:
        raise InputError(f"--split must be a positive number of pixels (got {size})")
    if gap < 0 or gap >= size:
        raise InputError(f"--gap must be at least 0 and smaller than --split (got {gap}, split {size})")
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise InputError(f"--scales must be positive numbers (got {', '.join(f'{s:g}' for s in scales) or 'none'})")
    if len(set(scales)) != len(scales):
        raise InputError("--scales lists a scale twice")
    if not 0 < iof_thr <= 1:
        raise InputError(f"--iof-thr must be in (0, 1] (got {iof_thr:g})")
    if partial not in PARTIAL_MODES:
        raise InputError(f"--partial must be one of {', '.join(PARTIAL_MODES)} (got {partial!r})")


def prepare_dota(src: str | Path, out: str | Path, *, size: int = 1024, gap: int = 200,
                 scales: Sequence[float] = (1.0,), iof_thr: float = 0.7, workers: int = 1,
                 classes: str = "dota-v1.0", partial: str = "drop",
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """Split every DOTA split under `src` into patches under `out`; returns summary figures.

    All label files are parsed (and errors raised) before any patch is written; the
    JSON files are written last and atomically, so a failed run leaves none behind.
    `workers` > 1 splits scenes in that many processes (0: one per CPU); the output is
    the same whatever the number of workers.
    """
    reporter = reporter or NullReporter()
    src, out = Path(src), Path(out)
    scales = tuple(float(s) for s in scales)
    _check_options(size, gap, scales, iof_thr, partial)
    class_names = get_class_set(classes)
    splits = find_splits(src)
    for _, folder in splits:
        if out.resolve() in (folder.resolve(), src.resolve()):
            raise InputError("--out must be a folder of its own, not the DOTA source", out)
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise InputError(f"--workers must be 0 (one per CPU) or more (got {workers})")
    started = time.perf_counter()
    cat_index = {name: i + 1 for i, name in enumerate(class_names)}
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    summary: dict[str, Any] = {"source": str(src), "out": str(out), "classes": classes, "patch_size": size,
                               "gap": gap, "scales": list(scales), "iof_thr": iof_thr, "partial": partial,
                               "splits": {}}

    # Parse every split's labels first: bad input fails the run before anything is written.
    plans: list[tuple[str, list[Path], list[DotaLabels | None], bool]] = []
    for split, folder in splits:
        images = list_images(folder / "images")
        if not images:
            raise InputError("no images here", folder / "images")
        label_dir = folder / "labelTxt"
        labelled = label_dir.is_dir()
        scene_labels: list[DotaLabels | None] = []
        for image in images:
            if labelled:
                label_path = label_dir / f"{image.stem}.txt"
                if not label_path.is_file():
                    raise InputError(f"no label file for image {image.name}", label_path)
                scene_labels.append(parse_dota_labels(label_path, class_names, classes))
            else:
                scene_labels.append(None)
        if labelled:
            stems = {p.stem for p in images}
            orphans = sorted(p.name for p in label_dir.glob("*.txt") if p.stem not in stems)
            if orphans:
                reporter.note(f"{split}: {len(orphans)} label file(s) without an image ignored (e.g. {orphans[0]})")
        else:
            reporter.note(f"{split}: no labelTxt/ folder, writing image-only JSON")
        plans.append((split, images, scene_labels, labelled))
    # A stale JSON from an earlier run must not describe patches this run rewrites.
    for split, *_ in plans:
        for stale in (out / f"{split}.json", out / f"{split}_scenes.json"):
            stale.unlink(missing_ok=True)

    outputs: list[tuple[Path, dict[str, Any]]] = []
    for split, images, scene_labels, labelled in plans:
        split_stats = SplitStats()
        jobs: list[SceneJob] = []
        scene_annotations: list[list[dict[str, Any]]] = []
        for image, labels in zip(images, scene_labels):
            objects = labels.objects if labels else []
            kept = [o for o in objects if polygon_area(o.poly) > 0]
            split_stats.degenerate += len(objects) - len(kept)
            jobs.append(SceneJob(
                image_path=image, stem=image.stem, polys=tuple(o.poly for o in kept),
                category_ids=tuple(cat_index[o.name] for o in kept), difficult=tuple(o.difficult for o in kept),
                out_dir=out, split=split, size=size, gap=gap, scales=scales, iof_thr=iof_thr, partial=partial,
                class_names=tuple(class_names),
            ))
            scene_annotations.append([])  # filled once the scene size is known

        results: list[dict[str, Any] | None] = [None] * len(jobs)
        task = reporter.task(f"split {split}", total=len(jobs))
        try:
            if workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_ignore_sigint) as pool:
                    futures = {pool.submit(_split_scene_safe, job): i for i, job in enumerate(jobs)}
                    pending = set(futures)
                    try:
                        while pending:
                            done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=0.5)
                            for fut in done:
                                result = _unwrap(fut.result())
                                results[futures[fut]] = result
                                task.update(1, patches=result["stats"].patches)
                    except BaseException:
                        for fut in pending:
                            fut.cancel()
                        raise
            else:
                for i, job in enumerate(jobs):
                    results[i] = split_scene(job)
                    task.update(1, patches=results[i]["stats"].patches)
        finally:
            task.close()

        # Assemble in scene-name order: ids do not depend on which worker finished first.
        patch_images, patch_anns, scene_images, scene_anns = [], [], [], []
        for scene_id, (job, labels, result) in enumerate(zip(jobs, scene_labels, results), start=1):
            assert result is not None
            split_stats.add(result["stats"])
            width, height = result["width"], result["height"]
            scene_image: dict[str, Any] = {"id": scene_id, "file_name": _relpath(job.image_path, out),
                                           "width": width, "height": height}
            if labels is not None:
                scene_image["imagesource"] = labels.imagesource
                scene_image["gsd"] = labels.gsd
            scene_images.append(scene_image)
            for poly, cat, diff in zip(job.polys, job.category_ids, job.difficult):
                x0, y0 = max(0.0, poly[:, 0].min()), max(0.0, poly[:, 1].min())
                x1, y1 = min(float(width), poly[:, 0].max()), min(float(height), poly[:, 1].max())
                w, h = _r(x1 - x0), _r(y1 - y0)
                if w <= 0 or h <= 0:
                    split_stats.degenerate += 1  # wholly outside the scene
                    continue
                scene_anns.append({
                    "id": len(scene_anns) + 1, "image_id": scene_id, "category_id": cat,
                    "bbox": [_r(x0), _r(y0), w, h], "area": _r(polygon_area(poly)), "iscrowd": 0,
                    "segmentation": [[_r(v) for v in poly.reshape(-1)]], "difficult": diff,
                })
                name = class_names[cat - 1]
                split_stats.objects += 1
                split_stats.objects_per_class[name] = split_stats.objects_per_class.get(name, 0) + 1
            for patch in result["patches"]:
                image_id = len(patch_images) + 1
                patch_images.append({
                    "id": image_id, "file_name": patch["file_name"], "width": patch["width"],
                    "height": patch["height"], "scene": job.stem, "scene_width": width, "scene_height": height,
                    "window": patch["window"], "scale": patch["scale"], "scene_id": scene_id,
                })
                for ann in patch["annotations"]:
                    patch_anns.append({"id": len(patch_anns) + 1, "image_id": image_id, **ann})

        meta = {"source": "dota", "classes": classes, "split": split, "patch_size": size, "gap": gap,
                "scales": list(scales), "iof_thr": iof_thr, "partial": partial, "padded": True,
                "labelled": labelled}
        outputs.append((out / f"{split}_scenes.json", {
            "info": {"ds2d2": {**meta, "scenes": True}}, "images": scene_images,
            "annotations": scene_anns, "categories": categories,
        }))
        outputs.append((out / f"{split}.json", {
            "info": {"ds2d2": meta}, "images": patch_images, "annotations": patch_anns, "categories": categories,
        }))
        summary["splits"][split] = {
            "scenes": len(jobs), "patches": split_stats.patches, "labelled": labelled,
            "objects": split_stats.objects, "annotations": split_stats.annotations, "crowd": split_stats.crowd,
            "dropped_iof": split_stats.dropped_iof, "degenerate": split_stats.degenerate,
            "objects_per_class": {n: split_stats.objects_per_class.get(n, 0) for n in class_names},
            "annotations_per_class": {n: split_stats.annotations_per_class.get(n, 0) for n in class_names},
            "json": str(out / f"{split}.json"),
        }
    # JSON last, once every split succeeded: a failed run leaves no JSON at all.
    for path, data in outputs:
        write_json(path, data)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
