"""DOTA Task 1 (oriented boxes): the devkit's submission files and the score it gives them.

The DOTA evaluation server and the devkit (CAPTAIN-WHU/DOTA_devkit) read one text file per
class, `Task1_<class>.txt`, a detection per line::

    <image name> <confidence> x1 y1 x2 y2 x3 y3 x4 y4

`score_task1` is the devkit's `dota_evaluation_task1.py` (its `voc_eval` and `voc_ap`, run
over the classes as its `main` does): per class, detections sorted by confidence, each one
matched to the ground-truth polygon it overlaps most (the devkit's `polyiou`, here
`ds2d2_cli.rotated.polygon_iou_pairs`, tried only where the envelopes, widened by the devkit's
+1 pixel, overlap); a match above the IoU threshold to an unmatched object is a true
positive, to a matched one a false positive, to a difficult one neither; AP by the VOC07
11-point rule (the devkit's default) or the area under the precision envelope; mAP the plain
mean over every class scored. `merge_scene_detections` is the devkit's `ResultMerge`: patch
detections (`<scene>__<scale>__<left>___<top>`) moved back into their scenes and thinned,
class by class and scene by scene, by greedy polygon NMS.

Where the devkit has no answer (it crashes, divides by zero or misreads a line) we give one, and
in two places we read more than it does; each is a named choice:

- equal confidences keep their order in the file (the devkit leaves it to numpy's unstable
  sort, which depends on numpy's version and the CPU); NMS alike keeps the earlier line first;
- a class without (non-difficult) ground truth scores AP 0 and still counts in the mean (the
  devkit's VOC07 AP is 0 there; its area AP is NaN when that class has detections);
- an empty `Task1_<class>.txt` is a class without detections (the devkit cannot index it);
- blank lines are skipped and fields may be separated by any white space (the devkit splits
  on single spaces); lines it would misread (too few or too many fields in a detection file,
  a ground-truth line other than the `imagesource:`/`gsd:` header with fewer than 9 fields,
  a bad difficult flag) are refused with the file and line;
- ground-truth objects of classes outside the scored list are left out (the devkit too) and
  counted; class names match spelling-insensitively (`ds2d2_cli.classes.canonical_name`:
  `Small_Vehicle` is small-vehicle here, another class to the devkit);
- a detection on an image without a label file is refused (the devkit stops with a KeyError);
- an empty label file is an image without objects (ImgSplit writes those for empty patches);
- a polygon pair whose union is not positive (two zero-area polygons) has IoU 0, where the
  devkit divides by zero;
- a patch name is read from its end, so scene names may hold `__`.

Floating point: the polygon IoU is computed in another order than the devkit's C++, so an
IoU within about 1e-15 of the threshold, or two objects overlapping a detection equally to
that precision, can fall the other way; everything else is the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ds2d2_cli.errors import InputError
from ds2d2_cli.rotated import polygon_iou_pairs

FILE_PREFIX = "Task1_"
IOU_THRESHOLD = 0.5  # dota_evaluation_task1.py main(): ovthresh
USE_07_METRIC = True  # dota_evaluation_task1.py main(): use_07_metric
MERGE_IOU_THRESHOLD = 0.3  # ResultMerge.py nms_thresh (ResultMerge_multi_process.py uses 0.1)
PAIR_BLOCK = 1 << 22  # candidate pairs per vectorised pass (bounds memory)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Task1Detections:
    """One class's detections in file order: image names, confidences `(N,)`, polygons `(N, 8)`.

    `source` and `lines` (1-based) say where each row was read, so later errors name them.
    """

    images: tuple[str, ...]
    scores: np.ndarray
    polys: np.ndarray
    source: Path | None = None
    lines: np.ndarray | None = None

    @classmethod
    def empty(cls, source: Path | None = None) -> "Task1Detections":
        return cls((), np.zeros(0), np.zeros((0, 8)), source, np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def where(self, row: int) -> tuple[Path | None, int | None]:
        """(file, line) of a row, as far as known: for error messages."""
        return self.source, (int(self.lines[row]) if self.lines is not None and len(self.lines) else None)


@dataclass(frozen=True)
class Task1Truth:
    """One image's ground truth, in label-file order: polygons `(M, 8)`, class names, difficult flags."""

    polys: np.ndarray
    names: tuple[str, ...]
    difficult: np.ndarray


@dataclass(frozen=True)
class Task1GroundTruth:
    """A labelTxt folder read for scoring: image name -> its objects.

    `ignored_objects` counts objects of classes outside the scored list (left out, as the
    devkit leaves them out); `ignored_example` names the first one (file:line).
    """

    images: dict[str, Task1Truth]
    ignored_objects: int = 0
    ignored_example: str | None = None


@dataclass(frozen=True)
class ClassScore:
    """One class's result: AP and the counts behind it; recall and precision per sorted detection."""

    ap: float
    ground_truth: int  # non-difficult objects (the devkit's npos)
    difficult: int
    detections: int
    true_positives: int
    false_positives: int
    recall: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Task1Score:
    per_class: dict[str, ClassScore]
    mAP: float
    iou_threshold: float
    use_07_metric: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (fractions 0..1, as the devkit's `ap`)."""
        return {
            "metric": "DOTA Task 1 (dota_evaluation_task1.py)",
            "ap": "VOC07 11-point" if self.use_07_metric else "area under the precision envelope",
            "iou_threshold": self.iou_threshold,
            "mAP": self.mAP,
            "per_class": {
                name: {"AP": s.ap, "ground_truth": s.ground_truth, "difficult": s.difficult,
                       "detections": s.detections, "true_positives": s.true_positives,
                       "false_positives": s.false_positives}
                for name, s in self.per_class.items()
            },
        }


# --------------------------------------------------------------------------- files


def task1_path(folder: str | Path, class_name: str) -> Path:
    return Path(folder) / f"{FILE_PREFIX}{class_name}.txt"


def detections_by_class(per_image: Mapping[str, Mapping[str, Any]],
                        class_names: Sequence[str]) -> dict[str, Task1Detections]:
    """Per-image detections -> one `Task1Detections` per class (images in mapping order).

    Each image's value holds `polys` (`[N, 4, 2]` or `[N, 8]`), `scores` `[N]` and `labels`
    `[N]`, indices into `class_names`; numpy arrays or tensors.
    """
    rows: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = {k: [] for k in range(len(class_names))}
    for image, dets in per_image.items():
        _check_image_name(image)
        polys = _numpy(dets["polys"]).reshape(-1, 8)
        scores = _numpy(dets["scores"]).reshape(-1)
        labels = _numpy(dets["labels"]).reshape(-1).astype(np.int64)
        if not len(polys) == len(scores) == len(labels):
            raise InputError(f"image {image}: {len(polys)} polygons, {len(scores)} scores and {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise InputError(f"image {image}: label {int(labels.max())} is not an index into the "
                             f"{len(class_names)} classes")
        for k in np.unique(labels):
            mask = labels == k
            rows[int(k)].append((image, scores[mask], polys[mask]))
    out = {}
    for k, name in enumerate(class_names):
        parts = rows[k]
        if not parts:
            out[name] = Task1Detections.empty()
            continue
        images = tuple(image for image, scores, _ in parts for _copy in range(len(scores)))
        out[name] = Task1Detections(images, np.concatenate([s for _, s, _ in parts]),
                                    np.concatenate([p for _, _, p in parts]))
    return out


def write_task1_files(folder: str | Path, by_class: Mapping[str, Task1Detections]) -> list[Path]:
    """Write one `Task1_<class>.txt` per class, empty ones too (the server expects every class).

    Numbers are written at full precision (Python's shortest round-trip form), so reading the
    files back gives the same values and the same ties.
    """
    from ds2d2_cli.fileio import atomic_path

    written = []
    for name, dets in by_class.items():
        lines = [f"{image} {float(score)!r} {' '.join(repr(float(v)) for v in poly)}\n"
                 for image, score, poly in zip(dets.images, dets.scores, dets.polys)]
        path = task1_path(folder, name)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
        written.append(path)
    return written


def write_task1_submission(folder: str | Path, per_image: Mapping[str, Mapping[str, Any]],
                           class_names: Sequence[str]) -> list[Path]:
    """The devkit's submission files for per-image detections (see `detections_by_class`)."""
    return write_task1_files(folder, detections_by_class(per_image, class_names))


def read_task1_file(path: str | Path) -> Task1Detections:
    """One `Task1_<class>.txt`; a line that is not `image confidence x1 y1 ... x4 y4` is an InputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("detection file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read detection file: {exc}", path) from None
    images: list[str] = []
    values: list[list[float]] = []
    lines: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        if len(tokens) != 10:
            raise InputError(f"expected an image name, a confidence and 8 coordinates, got {len(tokens)} fields",
                             path, lineno)
        try:
            numbers = [float(t) for t in tokens[1:]]
        except ValueError:
            raise InputError("the confidence and the 8 coordinates must be numbers", path, lineno) from None
        if not np.all(np.isfinite(numbers)):
            raise InputError("the confidence and the 8 coordinates must be finite numbers", path, lineno)
        images.append(tokens[0])
        values.append(numbers)
        lines.append(lineno)
    if not images:
        return Task1Detections.empty(path)
    table = np.array(values, dtype=np.float64)
    return Task1Detections(tuple(images), table[:, 0].copy(), table[:, 1:].copy(), path,
                           np.array(lines, dtype=np.int64))


def read_task1_submission(folder: str | Path, class_names: Sequence[str]) -> dict[str, Task1Detections]:
    """Every class's `Task1_<class>.txt` in `folder` (each must be there, as the devkit needs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("results folder not found", folder)
    out = {}
    for name in class_names:
        path = task1_path(folder, name)
        if not path.is_file():
            present = sorted(p.name for p in folder.glob(f"{FILE_PREFIX}*.txt"))
            found = f"found {', '.join(present[:5])}{' ...' if len(present) > 5 else ''}" if present else "found none"
            raise InputError(f"no {path.name} for class {name} (one file per class, empty when it has no "
                             f"detections; {found})", folder)
        out[name] = read_task1_file(path)
    return out


def read_task1_ground_truth(label_dir: str | Path, class_names: Sequence[str]) -> Task1GroundTruth:
    """A DOTA `labelTxt` folder: one `<image>.txt` per image, read by the project's DOTA parser."""
    from ds2d2_cli.data.dota import parse_dota_labels
    from ds2d2_cli.data.validate import BadItem

    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise InputError("label folder not found", label_dir)
    files = sorted(p for p in label_dir.iterdir()
                   if p.is_file() and p.suffix.lower() == ".txt" and not p.name.startswith("."))
    if not files:
        raise InputError("no label files (<image>.txt) here", label_dir)
    ignored: list[str] = []

    def other_class(exc: BadItem) -> None:
        if exc.reason != "unknown class":
            raise exc
        ignored.append(f"{exc.path}:{exc.line}")

    images = {}
    for path in files:
        try:
            objects = parse_dota_labels(path, tuple(class_names), on_bad=other_class).objects
        except BadItem as exc:
            if exc.reason != "empty label file":
                raise
            objects = []
        images[path.stem] = Task1Truth(
            np.array([o.poly.reshape(8) for o in objects], dtype=np.float64).reshape(-1, 8),
            tuple(o.name for o in objects),
            np.array([bool(o.difficult) for o in objects], dtype=bool),
        )
    return Task1GroundTruth(images, len(ignored), ignored[0] if ignored else None)


# --------------------------------------------------------------------------- the score


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = USE_07_METRIC) -> float:
    """The devkit's `voc_ap` of a recall/precision curve (recall non-decreasing).

    VOC07: the mean over the 11 recall levels numpy's `arange(0, 1.1, 0.1)` gives (0.3 is
    0.30000000000000004 there, so a recall of exactly 0.3 does not reach it) of the best
    precision at that recall or more, added up one level after another. Otherwise the area
    under the precision envelope, at the points where recall changes.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        levels = np.arange(0.0, 1.1, 0.1)
        best = np.zeros(len(levels))
        if len(recall):
            best_from = np.maximum.accumulate(precision[::-1])[::-1]  # best precision from each detection on
            first = np.searchsorted(recall, levels, side="left")  # first detection with recall >= level
            reached = first < len(recall)
            best[reached] = best_from[first[reached]]
        return float(np.cumsum(best / 11.0)[-1])
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def score_task1(detections: Mapping[str, Task1Detections], truth: Mapping[str, Task1Truth],
                class_names: Sequence[str], iou_threshold: float = IOU_THRESHOLD,
                use_07_metric: bool = USE_07_METRIC) -> Task1Score:
    """Per-class AP and mAP of `detections` (class -> detections) against `truth` (image -> objects).

    Every image of `truth` is one of the scored images; a detection on another image is an
    InputError (the devkit stops there too). A class missing from `detections` has none.
    """
    image_index = {name: k for k, name in enumerate(truth)}
    per_class = {}
    for name in class_names:
        per_class[name] = _score_class(detections.get(name, Task1Detections.empty()), truth, image_index, name,
                                       iou_threshold, use_07_metric)
    total = 0.0
    for score in per_class.values():
        total = total + score.ap  # one class after another, as the devkit adds them
    mean = total / len(per_class) if per_class else 0.0
    return Task1Score(per_class, float(mean), float(iou_threshold), bool(use_07_metric))


def _score_class(dets: Task1Detections, truth: Mapping[str, Task1Truth], image_index: dict[str, int],
                 name: str, iou_threshold: float, use_07_metric: bool) -> ClassScore:
    det_image = np.array([image_index.get(image, -1) for image in dets.images], dtype=np.int64)
    if len(det_image) and det_image.min() < 0:
        row = int(np.flatnonzero(det_image < 0)[0])
        path, line = dets.where(row)
        raise InputError(f"detection of {name} on image {dets.images[row]!r}, which has no label file", path, line)
    gt_polys, gt_image, gt_difficult = [], [], []
    for image, objects in truth.items():
        mask = np.array([n == name for n in objects.names], dtype=bool)
        if mask.any():
            gt_polys.append(objects.polys[mask])
            gt_image.append(np.full(int(mask.sum()), image_index[image], dtype=np.int64))
            gt_difficult.append(objects.difficult[mask])
    gpolys = np.concatenate(gt_polys) if gt_polys else np.zeros((0, 8))
    gimage = np.concatenate(gt_image) if gt_image else np.zeros(0, dtype=np.int64)
    gdifficult = np.concatenate(gt_difficult) if gt_difficult else np.zeros(0, dtype=bool)
    npos = int((~gdifficult).sum())

    order = np.argsort(-dets.scores, kind="stable")  # equal confidences keep their file order
    dpolys, dimage = dets.polys[order], det_image[order]
    nd = len(order)
    best_iou = np.full(nd, -np.inf)
    best_gt = np.full(nd, -1, dtype=np.int64)
    for d, g in _same_group_pairs(dimage, gimage):
        keep = _devkit_envelopes_meet(dpolys[d], gpolys[g])
        d, g = d[keep], g[keep]
        if not len(d):
            continue
        iou = _polygon_iou(gpolys[g], dpolys[d])  # (object, detection), the devkit's order
        first = np.lexsort((g, -iou, d))  # per detection: highest IoU, then the earliest object
        d_sorted = d[first]
        head = first[np.r_[True, d_sorted[1:] != d_sorted[:-1]]]
        best_iou[d[head]] = iou[head]
        best_gt[d[head]] = g[head]

    above = best_iou > iou_threshold
    on_difficult = above & gdifficult[np.maximum(best_gt, 0)] if len(gdifficult) else np.zeros(nd, dtype=bool)
    candidate = np.flatnonzero(above & ~on_difficult)
    tp = np.zeros(nd)
    _, first_claim = np.unique(best_gt[candidate], return_index=True)  # an object is matched once: the best first
    tp[candidate[first_claim]] = 1.0
    fp = np.where(above, 0.0, 1.0)
    fp[candidate] = 1.0 - tp[candidate]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    if npos > 0:
        recall = tp_cum / float(npos)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        ap = voc_ap(recall, precision, use_07_metric)
    else:  # the devkit divides by zero here: VOC07 gives 0, the area rule NaN
        recall = np.zeros(nd)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        ap = 0.0
    return ClassScore(float(ap), npos, int(gdifficult.sum()), nd, int(tp.sum()), int(fp.sum()), recall, precision)


# --------------------------------------------------------------------------- geometry helpers


def _ranges(first: np.ndarray, counts: np.ndarray, block: int = PAIR_BLOCK
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row, position) for every row r and position first[r] + i, i < counts[r], in blocks of about
    `block` (all of one row's in the same block), rows ascending, positions ascending within a row."""
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + block, side="right")))
        c = counts[start:stop]
        total = int(c.sum())
        if total:
            rows = np.repeat(np.arange(start, stop), c)
            within = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
            yield rows, np.repeat(first[start:stop], c) + within
        start = stop


def _same_group_pairs(group_a: np.ndarray, group_b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (a, b) index pair with `group_a[a] == group_b[b]`, in blocks; by a, then b ascending."""
    if not len(group_a) or not len(group_b):
        return
    order_b = np.argsort(group_b, kind="stable")
    sorted_b = group_b[order_b]
    lo = np.searchsorted(sorted_b, group_a, side="left")
    counts = np.searchsorted(sorted_b, group_a, side="right") - lo
    for a, position in _ranges(lo, counts):
        yield a, order_b[position]


def _x_overlap_pairs(members: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs of `members` whose x extents overlap (sweep over x0), each once, in blocks."""
    swept = members[np.argsort(x0[members], kind="stable")]
    starts = x0[swept]
    k = np.arange(len(swept))
    ends = np.searchsorted(starts, x1[swept], side="left")  # the first one starting at or past k's end
    for row, position in _ranges(k + 1, np.maximum(ends - k - 1, 0)):
        yield swept[row], swept[position]


def _envelope(polys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xs, ys = polys[:, 0::2], polys[:, 1::2]
    return xs.min(1), ys.min(1), xs.max(1), ys.max(1)


def _devkit_envelopes_meet(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The devkit's prefilter: the +1-pixel IoU of the two envelopes is positive."""
    ax0, ay0, ax1, ay1 = _envelope(a)
    bx0, by0, bx1, by1 = _envelope(b)
    iw = np.maximum(np.minimum(ax1, bx1) - np.maximum(ax0, bx0) + 1.0, 0.0)
    ih = np.maximum(np.minimum(ay1, by1) - np.maximum(ay0, by0) + 1.0, 0.0)
    inters = iw * ih
    union = (ax1 - ax0 + 1.0) * (ay1 - ay0 + 1.0) + (bx1 - bx0 + 1.0) * (by1 - by0 + 1.0) - inters
    return inters / union > 0


def _polygon_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The devkit's `iou_poly` of aligned rows of `(P, 8)` polygons."""
    return polygon_iou_pairs(torch.from_numpy(np.ascontiguousarray(a).reshape(-1, 4, 2)),
                             torch.from_numpy(np.ascontiguousarray(b).reshape(-1, 4, 2))).numpy()


def polygon_nms(polys: np.ndarray, scores: np.ndarray, iou_threshold: float,
                groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS of quadrilaterals `(N, 8)` or `(N, 4, 2)`: indices kept, best score first.

    The devkit's `py_cpu_nms_poly`: a polygon is dropped when a kept one of higher score
    (earlier in the input among equal scores) has polygon IoU > `iou_threshold` with it.
    With `groups`, only polygons of the same group meet. Only pairs whose envelopes overlap
    (found by a sweep along x) are intersected; the greedy answer is then the fixed point of
    "kept = not suppressed by a kept, better polygon", reached in as many vectorised passes as
    the longest suppression chain.
    """
    polys = np.asarray(polys, dtype=np.float64).reshape(-1, 8)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(polys)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    better_parts, worse_parts = [], []
    x0, y0, x1, y1 = _envelope(polys)
    by_group = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(groups[by_group][1:] != groups[by_group][:-1]) + 1
    for members in np.split(by_group, cuts) if n else []:
        for a, b in _x_overlap_pairs(members, x0, x1):
            keep = ((np.minimum(x1[a], x1[b]) > np.maximum(x0[a], x0[b]))
                    & (np.minimum(y1[a], y1[b]) > np.maximum(y0[a], y0[b])))
            a, b = a[keep], b[keep]
            if len(a):
                first = rank[a] < rank[b]
                a, b = np.where(first, a, b), np.where(first, b, a)  # the better one first, as the devkit asks
                hit = _polygon_iou(polys[a], polys[b]) > iou_threshold
                better_parts.append(rank[a[hit]])
                worse_parts.append(rank[b[hit]])
    better = np.concatenate(better_parts) if better_parts else np.zeros(0, dtype=np.int64)
    worse = np.concatenate(worse_parts) if worse_parts else np.zeros(0, dtype=np.int64)
    kept = np.ones(n, dtype=bool)  # by rank
    while True:
        suppressed = np.zeros(n, dtype=bool)
        suppressed[worse[kept[better]]] = True
        if np.array_equal(~suppressed, kept):
            break
        kept = ~suppressed
    return order[kept]


# --------------------------------------------------------------------------- merging patches


def parse_patch_name(name: str) -> tuple[str, float, int, int] | None:
    """(scene, scale, left, top) of a patch name `<scene>__<scale>__<left>___<top>`, or None."""
    head, sep, top = name.rpartition("___")
    if not sep or not top.isdigit():
        return None
    rest, sep, left = head.rpartition("__")
    if not sep or not left.isdigit():
        return None
    scene, sep, scale = rest.rpartition("__")
    if not sep or not scene:
        return None
    try:
        value = float(scale)
    except ValueError:
        return None
    if not scale or not set(scale) <= set("0123456789.") or not value > 0:
        return None
    return scene, value, int(left), int(top)


def merge_scene_detections(by_class: Mapping[str, Task1Detections],
                           iou_threshold: float = MERGE_IOU_THRESHOLD) -> dict[str, Task1Detections]:
    """The devkit's `ResultMerge`: patch detections back in scene pixels, thinned by polygon NMS.

    A patch `<scene>__<scale>__<left>___<top>` holds scene pixels `(patch + (left, top)) / scale`.
    Per class and scene, greedy polygon NMS at `iou_threshold` (ResultMerge.py's 0.3 by
    default; ResultMerge_multi_process.py merges at 0.1). The output lists scenes in order of
    first appearance, each one's detections best first, as the devkit writes them.
    """
    merged = {}
    for name, dets in by_class.items():
        if not len(dets):
            merged[name] = Task1Detections.empty()
            continue
        scene_of: dict[str, int] = {}
        scene_ids = np.empty(len(dets), dtype=np.int64)
        shift = np.empty((len(dets), 2))
        scale = np.empty(len(dets))
        for row, image in enumerate(dets.images):
            parsed = parse_patch_name(image)
            if parsed is None:
                path, line = dets.where(row)
                raise InputError(f"{image!r} is not a patch name <scene>__<scale>__<left>___<top> "
                                 "(merging needs patch detections)", path, line)
            scene_ids[row] = scene_of.setdefault(parsed[0], len(scene_of))
            scale[row] = parsed[1]
            shift[row] = parsed[2:]
        polys = (dets.polys + np.tile(shift, 4)) / scale[:, None]
        kept = polygon_nms(polys, dets.scores, iou_threshold, groups=scene_ids)
        kept = kept[np.argsort(scene_ids[kept], kind="stable")]  # scene by scene, best first within
        scenes = list(scene_of)
        merged[name] = Task1Detections(tuple(scenes[s] for s in scene_ids[kept]), dets.scores[kept], polys[kept],
                                       dets.source, dets.lines[kept] if dets.lines is not None else None)
    return merged


# --------------------------------------------------------------------------- helpers


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _check_image_name(image: str) -> None:
    if not image or any(c.isspace() for c in image):
        raise InputError(f"image name {image!r} cannot go in a Task1 file (empty, or holds white space)")
