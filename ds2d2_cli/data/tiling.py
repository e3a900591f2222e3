"""Large scenes in fixed-size windows and back: the DOTA devkit's `ImgSplit` grid, the objects
each window holds, and the merge of window detections.

One definition of the window grid for `prepare-data --split` (patches, every format) and
`predict --slice` (tiles): windows step by `size - gap`; the last window in each direction
is moved back to end at the scene border; a side no longer than a window gets the single
origin 0 (the window is padded with zeros past the border). Scaled copies (scale != 1) are
resized first (bilinear) and the objects scaled with them. Every patch is kept, empty ones
included (as the devkit does).

Objects in a window: the polygon is clipped to the window (the window itself clipped to the
scene); iof = clipped area / object area. Objects wholly inside are kept; partly inside ones
with iof >= `iof_thr` are kept with the clipped polygon's extent as box; smaller pieces are
dropped (`partial="drop"`) or kept with `iscrowd: 1` (`partial="crowd"`, the devkit's
"difficult 2" pieces). Pieces of no size are dropped and counted.

Oriented boxes (`boxes="obb"`): which objects a window holds, and which are crowd, is decided
as above; the outline written for a cut object is then the one the devkit's `ImgSplit`
(`splitbase.savepatches`, the same in `ImgSplit_multi_process.py`) writes, and its `rbox` is
that outline's minimum-area rectangle (`coco_writer.rbox_field`). For an object cut by the
window (`devkit_outline`):

* the clipped polygon is put in positive (shoelace) order, as shapely's `orient(sign=1)`;
* fewer than 4 corners (a corner cut off as a triangle): the devkit writes nothing, nor here;
* 5 corners: the shortest edge (the first of equal ones, edge i joining corners i and i+1,
  the last one closing the ring) is replaced by its midpoint, leaving 4 (`GetPoly4FromPoly5`);
* more than 5 corners (an object cut across a window corner, say): the devkit leaves the
  piece out ("not handled currently"), and so does obb mode, odd as it is: counted in
  `dropped_shape`;
* the 4 corners start where they best match the object's own 4 corners (the cyclic
  rotation with the least summed squared distance, the first of equal ones:
  `choose_best_pointorder_fit_another`, the devkit's default `choosebestpoint=True`);
* in patch pixels, every coordinate is clamped to [1, window size] (the devkit's "<= 1 -> 1,
  >= subsize -> subsize"), so a side on the window's left or top edge moves in to 1.

Objects wholly inside keep their own corners, unclamped, as the devkit writes them. Two
differences, both in every mode: the devkit truncates every written coordinate to a whole
pixel (its label files are integers), here they keep 2 decimals like every coordinate of the
JSON; and its last window in each direction ends one pixel short of the scene border
(`min(left + subsize, width - 1)`), here at the border. Ties between equally short edges
follow this module's corner order (Sutherland-Hodgman from the object's first corner);
shapely's start corner is its own.

Detections made window by window are merged back into scene detections with class-wise
NMS (`merge_order`), so an object seen by two overlapping windows is reported once.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ds2d2_cli.data.coco_writer import check_boxes, rbox_field
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.polygons import clip_polygon, dedupe_vertices, polygon_area
from ds2d2_cli.errors import Ds2d2Error, InputError, one_line
from ds2d2_cli.sample import RGB

PARTIAL_MODES = ("drop", "crowd")


@dataclass(frozen=True)
class Tiling:
    """How `prepare-data --split` cuts scenes: window size and overlap, scales, the cut-object rule."""

    size: int = 1024
    gap: int = 200
    scales: tuple[float, ...] = (1.0,)
    iof_thr: float = 0.7
    partial: str = "drop"

    def check(self) -> "Tiling":
        """The options as given, or an InputError naming the option."""
        check_window(self.size, self.gap)
        scales = self.scales
        if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
            raise InputError(f"--scales must be positive numbers (got {', '.join(f'{s:g}' for s in scales) or 'none'})")
        if len(set(scales)) != len(scales):
            raise InputError("--scales lists a scale twice")
        if not 0 < self.iof_thr <= 1:
            raise InputError(f"--iof-thr must be in (0, 1] (got {self.iof_thr:g})")
        if self.partial not in PARTIAL_MODES:
            raise InputError(f"--partial must be one of {', '.join(PARTIAL_MODES)} (got {self.partial!r})")
        return self

    def meta(self) -> dict[str, Any]:
        """The settings every tiled JSON records in `info.ds2d2`."""
        return {"patch_size": self.size, "gap": self.gap, "scales": list(self.scales), "iof_thr": self.iof_thr,
                "partial": self.partial, "padded": True}


def check_window(size: int, gap: int, size_option: str = "--split", gap_option: str = "--gap") -> None:
    """A positive window size and 0 <= gap < size, or an InputError naming the options as the command spells them."""
    if size <= 0:
        raise InputError(f"{size_option} must be a positive number of pixels (got {size})")
    if gap < 0 or gap >= size:
        raise InputError(f"{gap_option} must be at least 0 and smaller than {size_option} "
                         f"(got {_pair(gap_option, gap, size_option, size)})")


def _pair(gap_option: str, gap: int, size_option: str, size: int) -> str:
    # the two commands have always worded this differently: "got 32, split 32" / "got overlap 128, slice 128"
    if gap_option == "--gap":
        return f"{gap}, split {size}"
    return f"{gap_option.lstrip('-')} {gap}, {size_option.lstrip('-')} {size}"


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
    """(left, top) of every window of a `width x height` scene, left-major like the devkit (prepare-data)."""
    tops = window_starts(height, size, gap)
    return [(left, top) for left in window_starts(width, size, gap) for top in tops]


def slice_windows(width: int, height: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(x0, y0) of every `size` x `size` window of a `width` x `height` scene, row by row (predict).

    Windows step by `size - overlap`; the last one in each direction is moved back to end at
    the border (x0 = width - size); a side no longer than `size` gets the single origin 0.
    """
    check_window(size, overlap, "--slice", "--overlap")
    xs = window_starts(width, size, overlap)
    return [(x0, y0) for y0 in window_starts(height, size, overlap) for x0 in xs]


def merge_order(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float,
                scenes: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the window detections kept in their scene, best score first: class-wise NMS.

    `boxes` are x1, y1, x2, y2 in scene pixels; detections of different classes (and, with
    `scenes`, of different scenes) never suppress each other.
    """
    from torchvision.ops import batched_nms

    groups = labels.to(torch.int64) if scenes is None else scenes.to(torch.int64) * 10_000 + labels.to(torch.int64)
    return batched_nms(boxes.float(), scores.float(), groups, iou)


def rotated_merge_order(rboxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float,
                        scenes: torch.Tensor | None = None) -> torch.Tensor:
    """`merge_order` for oriented detections (`rboxes` le90 in scene pixels): class-wise rotated NMS
    (`rotated.batched_rotated_nms`, which drops IoU > `iou`). With `iou` =
    `dota_task1.MERGE_IOU_THRESHOLD` (0.3) it is the devkit's ResultMerge, as `eval --merge-patches`
    and `predict --slice` use it for oriented models."""
    from ds2d2_cli.rotated import batched_rotated_nms

    labels = labels.to(torch.int64)
    if scenes is None:
        groups = labels
    else:  # one group per (scene, class)
        groups = scenes.to(torch.int64) * (int(labels.max()) + 1 if len(labels) else 1) + labels
    return batched_rotated_nms(rboxes, scores, groups, iou)


# --------------------------------------------------------------------------- objects in windows


@dataclass
class SplitStats:
    patches: int = 0
    annotations: int = 0  # patch annotations kept, crowd included
    crowd: int = 0  # partial pieces kept with iscrowd 1
    dropped_iof: int = 0  # partial pieces dropped: iof < iof_thr
    degenerate: int = 0  # zero-area objects (once per scene) and zero-size pieces
    dropped_shape: int = 0  # obb: cut pieces the devkit writes no outline for (< 4 or > 5 corners)
    annotations_per_class: dict[str, int] = field(default_factory=dict)

    def add(self, other: "SplitStats") -> None:
        for name in ("patches", "annotations", "crowd", "dropped_iof", "degenerate", "dropped_shape"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.annotations_per_class.items():
            self.annotations_per_class[key] = self.annotations_per_class.get(key, 0) + value


def window_annotations(polys: Sequence[np.ndarray], category_ids: Sequence[int], difficult: Sequence[int],
                       window: tuple[float, float, float, float], iof_thr: float, partial: str,
                       stats: SplitStats | None = None, class_names: Sequence[str] | None = None,
                       outlines: Sequence[bool] | None = None,
                       crowd: Sequence[int] | None = None, boxes: str = "hbb",
                       patch_size: int | None = None) -> list[dict[str, Any]]:
    """COCO annotations (no ids, no image_id) of the objects in one window, in patch pixels.

    `window` is (x0, y0, x1, y1) in (scaled) scene pixels, already clipped to the scene.
    Objects that do not overlap the window with positive area are simply not there;
    pieces with 0 < iof < iof_thr are dropped or kept as crowd (see module docstring).
    `outlines[i]` False: object i is a horizontal box, written without `segmentation`;
    `crowd[i]` 1: the source marked it crowd, and so is every piece of it.
    `boxes="obb"`: cut objects get the devkit's outline (`devkit_outline`, clamped to
    [1, `patch_size`]), every annotation its `rbox`; `bbox` and `area` are the written outline's.
    """
    stats = stats if stats is not None else SplitStats()
    oriented = check_boxes(boxes) == "obb"
    if oriented and patch_size is None:
        raise ValueError("oriented boxes need the patch size (the devkit clamps cut outlines to it)")
    x0, y0, x1, y1 = window
    origin = np.array([x0, y0])
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
        iscrowd = int(crowd[i]) if crowd is not None else 0
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
        local = piece - origin
        if oriented and not inside:
            outline = devkit_outline(piece, poly, origin, patch_size)  # type: ignore[arg-type]
            if outline is None:
                stats.dropped_shape += 1
                continue
            local, area = outline, polygon_area(outline)
        bx0, by0 = _r(local[:, 0].min()), _r(local[:, 1].min())
        bx1, by1 = _r(local[:, 0].max()), _r(local[:, 1].max())
        w, h = _r(bx1 - bx0), _r(by1 - by0)
        if w <= 0 or h <= 0 or _r(area) <= 0:
            stats.degenerate += 1
            continue
        ann: dict[str, Any] = {"category_id": int(category_ids[i]), "bbox": [bx0, by0, w, h], "area": _r(area),
                               "iscrowd": iscrowd}
        if oriented or outlines is None or outlines[i]:
            ann["segmentation"] = [[_r(v) for v in local.reshape(-1)]]
        if oriented:
            ann["rbox"] = rbox_field(ann["segmentation"][0])
            if ann["rbox"][2] <= 0 or ann["rbox"][3] <= 0:
                stats.degenerate += 1
                continue
        ann["difficult"] = int(difficult[i])
        out.append(ann)
        stats.annotations += 1
        stats.crowd += iscrowd
        if class_names is not None:
            name = class_names[int(category_ids[i]) - 1]
            stats.annotations_per_class[name] = stats.annotations_per_class.get(name, 0) + 1
    return out


def devkit_outline(piece: np.ndarray, original: np.ndarray, origin: np.ndarray, patch_size: int
                   ) -> np.ndarray | None:
    """The 4-corner outline ImgSplit writes for an object cut by a window, in patch pixels; None: it writes none.

    `piece` is the object clipped to the window (scene pixels), `original` the object's own
    corners, `origin` the window's top-left corner. The rules are the module docstring's.
    """
    piece = np.asarray(piece, dtype=np.float64)
    if _signed_area(piece) < 0:
        piece = np.roll(piece[::-1], 1, axis=0)  # reversed, same first corner (shapely's orient)
    if len(piece) < 4 or len(piece) > 5:
        return None
    if len(piece) == 5:
        piece = four_from_five(piece)
    if len(original) == 4:
        piece = best_start(piece, np.asarray(original, dtype=np.float64))
    return np.clip(piece - origin, 1, patch_size)


def four_from_five(poly: np.ndarray) -> np.ndarray:
    """A 5-corner polygon as 4: its shortest edge (the first of equal ones) becomes its midpoint (GetPoly4FromPoly5)."""
    nxt = np.roll(poly, -1, axis=0)
    lengths = np.sqrt((poly[:, 0] - nxt[:, 0]) ** 2 + (poly[:, 1] - nxt[:, 1]) ** 2)  # edge i: corner i -> i + 1
    i = int(np.argmin(lengths))
    out = [(poly[i] + poly[(i + 1) % 5]) / 2 if j == i else poly[j] for j in range(5) if j != (i + 1) % 5]
    return np.array(out)


def best_start(poly: np.ndarray, original: np.ndarray) -> np.ndarray:
    """`poly` (4 corners) turned cyclically to start where it best fits `original`.

    The least summed squared distance, the first of equal ones (choose_best_pointorder_fit_another).
    """
    turns = [np.roll(poly, -k, axis=0) for k in range(4)]
    distances = [float(np.sum((t - original) ** 2)) for t in turns]
    return turns[int(np.argmin(distances))]


def _signed_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


# --------------------------------------------------------------------------- one scene (worker)


@dataclass(frozen=True)
class SceneJob:
    """One scene to cut, as plain picklable data (worker processes receive it)."""

    image_path: Path
    stem: str
    polys: tuple[np.ndarray, ...]
    category_ids: tuple[int, ...]
    difficult: tuple[int, ...]
    out_dir: Path  # the split's staging folder: patches go to out_dir/images/
    split: str
    tiling: Tiling
    class_names: tuple[str, ...]
    outlines: tuple[bool, ...] = ()
    crowd: tuple[int, ...] = ()
    declared_size: tuple[int, int] | None = None
    label_path: Path | None = None
    band_names: tuple[str, ...] = ()  # written as GeoTIFF band descriptions; () the file's own
    boxes: str = "hbb"  # obb: devkit outlines for cut objects and an rbox for every annotation


def cut_scene(job: SceneJob) -> dict[str, Any]:
    """Cut one scene into patches and return their records and counts.

    8-bit RGB scenes give PNG patches, decoded and resized by PIL exactly as before bands
    existed; any other scene gives lossless GeoTIFF patches of its own bands and type,
    with each window's georeferencing when the scene has it (`_cut_bands`). Raises BadItem
    (leaving no patch of this scene behind) when the image cannot be read or is not the
    size its labels declare. Objects are placed in the image first
    (`scenes.place_in_image`): those with no area inside are returned under "outside"
    and left out of the patches; the caller decides whether that stops the run.
    """
    from ds2d2_cli.data.raster import probe
    from ds2d2_cli.data.scenes import place_in_image
    from ds2d2_cli.data.validate import BadItem

    info = probe(job.image_path)
    rgb8 = info.bands == RGB and info.dtype == "uint8"
    image = _rgb_image(job.image_path) if rgb8 else None  # decoded first, as before: unreadable before mismatched
    width, height = info.width, info.height
    if job.declared_size is not None and tuple(job.declared_size) != (width, height):
        raise BadItem(f"the labels say {job.declared_size[0]}x{job.declared_size[1]} but {job.image_path.name} is "
                      f"{width}x{height}", job.label_path or job.image_path, reason="size mismatch")
    placed = place_in_image(list(job.polys), width, height)
    kept = placed.kept
    stats = SplitStats()
    patches: list[dict[str, Any]] = []
    images_dir = job.out_dir / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Ds2d2Error(f"cannot write patches: {one_line(exc.strerror or exc)}", job.out_dir.parent) from None
    category_ids = [job.category_ids[i] for i in kept]
    difficult = [job.difficult[i] for i in kept]
    outlines = [job.outlines[i] for i in kept] if job.outlines else None
    crowd = [job.crowd[i] for i in kept] if job.crowd else None
    tiling = job.tiling
    written: list[Path] = []
    try:
        for scale in tiling.scales:
            if scale == 1:
                sw, sh, polys = width, height, [job.polys[i] for i in kept]
            else:
                sw, sh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
                polys = [job.polys[i] * scale for i in kept]
            cut = _cut_rgb(image, sw, sh) if image is not None else _cut_bands(job, info, scale, sw, sh)
            for left, top in window_origins(sw, sh, tiling.size, tiling.gap):
                window = (left, top, min(left + tiling.size, sw), min(top + tiling.size, sh))
                anns = window_annotations(polys, category_ids, difficult, window, tiling.iof_thr, tiling.partial,
                                          stats, job.class_names, outlines, crowd, job.boxes, tiling.size)
                name = f"{job.stem}__{scale:g}__{left}___{top}{'.png' if rgb8 else '.tif'}"
                written.append(images_dir / name)
                try:
                    cut(left, top, tiling.size, images_dir / name)
                except BadItem:
                    raise
                except Exception as exc:  # noqa: BLE001 - PIL raises OSError, GDAL its own errors
                    raise Ds2d2Error(f"cannot write patch {name}: {one_line(getattr(exc, 'strerror', None) or exc)}",
                                     job.out_dir.parent) from None
                patches.append({"file_name": f"{job.split}/images/{name}", "width": tiling.size,
                                "height": tiling.size, "window": [left, top], "scale": scale, "annotations": anns})
                stats.patches += 1
    except BadItem:
        for path in written:  # a scene read window by window can fail half-way: none of it stays
            path.unlink(missing_ok=True)
        raise
    return {"stem": job.stem, "width": width, "height": height, "patches": patches, "stats": stats,
            "placed": placed}


def _rgb_image(path: Path) -> Any:
    """An 8-bit RGB scene as the PIL image the PNG patches are cut from."""
    from PIL import Image

    from ds2d2_cli.data.raster import read_raster

    return Image.fromarray(np.ascontiguousarray(read_raster(path).transpose(1, 2, 0)), mode="RGB")


def _cut_rgb(image: Any, width: int, height: int) -> Callable[[int, int, int, Path], None]:
    """PNG patches of an 8-bit RGB scene resized (PIL bilinear) to width x height: the bytes of old."""
    from PIL import Image

    scaled = image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)

    def cut(left: int, top: int, size: int, path: Path) -> None:
        # crop() beyond the scene border fills with zeros: the devkit's padding.
        scaled.crop((left, top, left + size, top + size)).save(path, format="PNG", compress_level=1)

    return cut


def _cut_bands(job: SceneJob, info: Any, scale: float, width: int, height: int
               ) -> Callable[[int, int, int, Path], None]:
    """GeoTIFF patches of any scene: all its bands in its type, zero-padded past the border.

    At scale 1 a TIFF scene is read window by window from the file (scenes larger than
    memory); other scenes and scales are read once, resized bilinearly (GDAL's decimated
    read for TIFF). Each patch carries its window's transform and the scene's CRS.
    """
    from ds2d2_cli.data.raster import is_tiff, read_raster, window_transform, write_geotiff

    scene = None
    if scale != 1 or not is_tiff(job.image_path):
        scene = read_raster(job.image_path, out_shape=None if scale == 1 else (height, width))
    names = job.band_names or info.bands

    def cut(left: int, top: int, size: int, path: Path) -> None:
        if scene is None:
            pixels = read_raster(job.image_path, window=(left, top, size, size))
        else:
            pixels = scene[:, top:top + size, left:left + size]
        patch = np.zeros((pixels.shape[0], size, size), pixels.dtype)
        patch[:, :pixels.shape[1], :pixels.shape[2]] = pixels
        transform = window_transform(info.transform, left, top, scale) if info.georeferenced else None
        write_geotiff(path, patch, crs=info.crs, transform=transform, band_names=names)

    return cut


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cut_scene_safe(job: SceneJob) -> tuple[str, Any]:
    """Worker entry: library errors come back as plain tuples (they pickle reliably)."""
    from ds2d2_cli.data.validate import BadItem

    try:
        return "ok", cut_scene(job)
    except BadItem as exc:
        return "bad", (exc.message, str(exc.path) if exc.path else None, exc.line, exc.reason)
    except Ds2d2Error as exc:
        return "error", (isinstance(exc, InputError), exc.message, str(exc.path) if exc.path else None, exc.line)


def _unwrap(outcome: tuple[str, Any]) -> Any:
    from ds2d2_cli.data.validate import BadItem

    kind, payload = outcome
    if kind == "ok":
        return payload
    if kind == "bad":
        message, path, line, reason = payload
        return BadItem(message, path, line, reason=reason)
    is_input, message, path, line = payload
    raise (InputError if is_input else Ds2d2Error)(message, path, line)


def cut_scenes(jobs: list[SceneJob], workers: int, receive: Any) -> None:
    """Cut every scene, in `workers` processes when > 1; `receive(i, result or BadItem)` as each finishes.

    `receive` may raise (a bad image without --skip-bad): the remaining work is cancelled.
    """
    if workers > 1 and len(jobs) > 1:
        # forkserver, not fork: a process forked while torch, GDAL or onnxruntime threads hold a lock
        # inherits the lock held forever (a worker hung that way in a test run).
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_ignore_sigint,
                                 mp_context=context) as pool:
            futures = {pool.submit(_cut_scene_safe, job): i for i, job in enumerate(jobs)}
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
            receive(i, _unwrap(_cut_scene_safe(job)))
