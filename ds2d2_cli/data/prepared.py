"""Scenes -> a prepared data folder: the one writer behind every `prepare-data` converter.

A converter reads its format into `SplitPlan`s of `Scene`s (`ds2d2_cli.data.scenes`) and
calls `write_prepared`, which applies the shared object policy, then either

* keeps images whole (no tiling): `OUT/<split>.json` whose `file_name`s point at the
  original images, relative to OUT; or
* cuts them with `Tiling` (the DOTA devkit's ImgSplit, `ds2d2_cli.data.tiling`):
  `OUT/<split>/images/<scene>__<scale>__<left>___<top>.png`, `OUT/<split>.json` (the
  patches, each with its scene and window) and `OUT/<split>_scenes.json` (the whole
  scenes, for scoring merged patch detections: `eval --merge-patches`). Patches of 8-bit
  RGB scenes are PNG; any other scene's patches are GeoTIFF (`.tif`) holding all its bands
  in its storage type, with each window's georeferencing.

With `boxes="obb"` every annotation also gets its `rbox` (le90, `coco_writer`), whole images
and patches alike, and `info.ds2d2` records `boxes` and `angle_convention`; the objects must
be oriented boxes (4-corner polygons). Cut objects follow the devkit's outline rules
(`ds2d2_cli.data.tiling`); an object clipped by the border of a whole image keeps its clipped
outline, whose minimum-area rectangle is its rbox.

Every image of a run must hold the same bands in the same type as the first one (a
mismatch is a bad item). The training split (`train`, else the first split written) is
measured (`measure_sample`) and its `SampleSpec` recorded in ``info["sample"]`` of every
JSON of the run, so all splits are read the same way (`ds2d2_cli.sample`).

Everything is checked before anything is written; patches go to hidden staging folders and
the JSON files are renamed into place last, so a failed run leaves no JSON and no partial
patches. Bad input stops the run with one line naming the file, or with `skip_bad` is
skipped, reported and listed in each JSON's `info.skipped` (see `ds2d2_cli.data.validate`).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ds2d2_cli.data.coco_writer import CocoWriter, PrepareSummary, check_boxes, obb_meta, rbox_field, relpath
from ds2d2_cli.data.coco_writer import round2 as _r
from ds2d2_cli.data.raster import RasterInfo, probe, read_raster
from ds2d2_cli.data.scenes import (
    Placed, Scene, SceneObject, SplitPlan, clipped_message, outside_message, place_in_image, usable_objects,
)
from ds2d2_cli.data.tiling import SceneJob, SplitStats, Tiling, cut_scenes
from ds2d2_cli.data.validate import BadItem, Problems, check_image, one_line, writable_folder
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import staging
from ds2d2_cli.progress import Reporter
from ds2d2_cli.sample import SCALINGS, BandStatistics, SampleSpec, bands_text, default_scaling

SCENES_SUFFIX = "_scenes"  # OUT/<split>_scenes.json: the whole scenes behind the patch split <split>
WIDE_FACTOR = 2.0  # whole images whose median side is more than this many input sizes get a warning
MEASURED_IMAGES = 256  # training images (evenly spaced) the sample statistics are measured on
MEASURE_SIDE = 2048  # px; longer whole images are measured on a bilinear reduction (memory), as the model sees less


@dataclass
class SplitSummary:
    """One split as written. Patch figures (`patches` ...) are None when images stay whole."""

    images: int
    objects: int  # objects kept in the whole images
    clipped: int  # ... of which reached past their image
    degenerate: int  # zero-area objects dropped, and (tiled) pieces of no size
    skipped: int
    repaired: int
    labelled: bool
    objects_per_class: dict[str, int]
    json: str
    median_side: float = 0.0  # the median of the images' longer sides, px
    patches: int | None = None
    annotations: int | None = None  # patch annotations, crowd included
    crowd: int | None = None
    dropped_iof: int | None = None
    annotations_per_class: dict[str, int] | None = None
    dropped_shape: int | None = None  # obb patches: cut pieces the devkit writes no outline for

    @property
    def scenes(self) -> int:
        return self.images


@dataclass
class PreparedSummary(PrepareSummary):
    """What a converter wrote: its format, the tiling (None: whole images) and each split's figures."""

    format: str
    tiling: dict[str, Any] | None
    splits: dict[str, SplitSummary]
    filtered: dict[str, int] = field(default_factory=dict)  # objects of classes outside a --classes list
    boxes: str = "hbb"  # obb: every annotation has its rotated box (`rbox`, le90)

    def to_dict(self) -> dict[str, Any]:
        figures = super().to_dict()
        for name, split in self.splits.items():
            figures["splits"][name]["scenes"] = split.images
        return figures


@dataclass
class _Checked:
    """One scene after the object policy (and, for whole images, its image check and placement)."""

    scene: Scene
    objects: list[SceneObject]
    category_ids: list[int]
    size: tuple[int, int] | None = None
    placed: Placed | None = None
    reported: bool = False  # its border problems were reported (a scene may belong to two splits)
    other_bands: bool = False  # its bands differ from the first image's: left out (--skip-bad)


@dataclass(frozen=True)
class Bands:
    """What every image of a run holds: the first image's bands (renamed by --band-names) and type."""

    first: RasterInfo
    names: tuple[str, ...]
    scaling: str  # a concrete one of SCALINGS

    @property
    def dtype(self) -> str:
        return self.first.dtype


def sample_choice(scaling: str = "auto", band_names: Sequence[str] | None = None
                  ) -> tuple[str, tuple[str, ...] | None]:
    """`--scaling` and `--band-names` checked before any work: the scaling, and the names (stripped, unique)."""
    if scaling != "auto" and scaling not in SCALINGS:
        raise InputError(f"--scaling must be one of auto, {', '.join(SCALINGS)} (got {scaling!r})")
    if band_names is None:
        return scaling, None
    names = tuple(str(n).strip() for n in band_names)
    if not names or not all(names):
        raise InputError(f"--band-names takes one name per band, such as red,green,blue,nir "
                         f"(got {','.join(band_names)!r})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--band-names names {', '.join(twice)} twice")
    return scaling, names


def measure_sample(paths: Sequence[Path], bands: Bands) -> SampleSpec:
    """The sample spec of a split measured on its written images: at most MEASURED_IMAGES, evenly spaced."""
    paths = list(paths)
    if len(paths) > MEASURED_IMAGES:
        paths = [paths[i * len(paths) // MEASURED_IMAGES] for i in range(MEASURED_IMAGES)]
    stats = BandStatistics(len(bands.names), bands.scaling)
    for path in paths:
        info = probe(path)
        side = max(info.width, info.height)
        shape = None if side <= MEASURE_SIDE else (max(1, round(info.height * MEASURE_SIDE / side)),
                                                   max(1, round(info.width * MEASURE_SIDE / side)))
        stats.add(read_raster(path, out_shape=shape))
    return stats.spec(bands.names, bands.dtype)


def write_prepared(plans: Sequence[SplitPlan], out: Path, *, source: str, class_names: Sequence[str],
                   classes_label: str | None, tiling: Tiling | None, problems: Problems, reporter: Reporter,
                   workers: int = 1, meta: dict[str, Any] | None = None,
                   report_splits: dict[str, Sequence[str]] | None = None, scaling: str = "auto",
                   band_names: Sequence[str] | None = None, boxes: str = "hbb") -> dict[str, SplitSummary]:
    """Write every plan's split into `out` (see the module docstring); the figures of each split.

    `report_splits` says whose reports a split's JSON lists besides its own (DIOR's trainval:
    train and val). `scaling` (auto or one of `sample.SCALINGS`) and `band_names` (None: the
    files' own) go into the recorded sample spec. `boxes` "obb": rotated boxes too (an
    InputError when an object is not a 4-corner polygon).
    """
    scaling, band_names = sample_choice(scaling, band_names)
    check_boxes(boxes)
    if boxes == "obb":
        check_oriented(plans)
    if tiling is not None:
        tiling.check()
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise InputError(f"--workers must be 0 (one per CPU) or more (got {workers})")
    category_id = {name: i + 1 for i, name in enumerate(class_names)}
    checked: dict[int, _Checked] = {}
    for plan in plans:
        for scene in plan.scenes:
            if id(scene) not in checked:
                objects = usable_objects(scene, problems)
                checked[id(scene)] = _Checked(scene, objects, [category_id[o.name] for o in objects])
    bands = _check_bands(checked, problems, scaling, band_names)
    if tiling is None:
        _check_whole_images(checked, problems, reporter)
    writable_folder(out)
    for name in (plan.name for plan in plans):  # a stale JSON must not describe what this run rewrites
        for stale in (out / f"{name}.json", out / f"{name}{SCENES_SUFFIX}.json"):
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                raise Ds2d2Error(f"cannot replace: {one_line(exc.strerror or exc)}", stale) from None

    outputs: list[tuple[Path, dict[str, Any]]] = []
    summaries: dict[str, SplitSummary] = {}
    written: dict[str, list[Path]] = {}  # each split's images as written: the training one is measured
    with staging(out) as stage:
        for plan in plans:
            name = plan.name
            shares = tuple(report_splits.get(plan.name, ())) if report_splits else ()
            own = [plan.name, *shares]
            settings = {"source": source, "classes": classes_label, "split": name,
                        **(tiling.meta() if tiling is not None else {}), "labelled": plan.labelled, **(meta or {}),
                        **obb_meta(boxes)}
            if tiling is None:
                scenes_writer, stats = _whole_split(plan, out, checked, class_names, boxes)
                patches_writer = None
                written[name] = [s.image for s in plan.scenes if checked[id(s)].size is not None]
            else:
                staged = stage.folder(f".{name}.", ".tmp")
                stage.publish_contents(staged / "images", out / name / "images", "patches")
                scenes_writer, patches_writer, stats = _tiled_split(plan, name, staged, out, checked, class_names,
                                                                     tiling, workers, problems, reporter,
                                                                     bands.names if bands else (), boxes)
                written[name] = [staged / "images" / Path(i["file_name"]).name for i in patches_writer.images]
            if not scenes_writer.images:
                raise InputError(f"no usable image left in split {plan.name!r}: every one was skipped as bad",
                                 plan.folder)
            skipped = [e for e in problems.skipped if e.get("split") in own]
            repaired = [e for e in problems.repaired if e.get("split") in own]
            if patches_writer is None:
                outputs.append((out / f"{name}.json", scenes_writer.document(settings, skipped, repaired)))
            else:
                outputs.append((out / f"{name}{SCENES_SUFFIX}.json",
                                scenes_writer.document({**settings, "scenes": True}, skipped, repaired)))
                outputs.append((out / f"{name}.json", patches_writer.document(settings, skipped, repaired)))
            summaries[plan.name] = SplitSummary(
                images=len(scenes_writer.images), objects=len(scenes_writer.annotations),
                clipped=sum(1 for e in repaired if e["reason"] == "object partly outside image"),
                degenerate=stats.degenerate + sum(1 for e in skipped if e["reason"] == "zero-area object"),
                skipped=len(skipped), repaired=len(repaired), labelled=plan.labelled,
                objects_per_class=scenes_writer.per_class, json=str(out / f"{name}.json"),
                median_side=float(statistics.median(max(i["width"], i["height"]) for i in scenes_writer.images)),
                **({} if tiling is None else {
                    "patches": stats.patches, "annotations": stats.annotations, "crowd": stats.crowd,
                    "dropped_iof": stats.dropped_iof,
                    "annotations_per_class": {n: stats.annotations_per_class.get(n, 0) for n in class_names},
                    **({"dropped_shape": stats.dropped_shape} if boxes == "obb" else {})}))
            problems.note_repairs(f"{plan.name}: ", [e for e in repaired if e.get("split") == plan.name])
        assert bands is not None  # an image that passed its check passed the probe first
        train = next((plan.name for plan in plans if plan.name == "train"), plans[0].name)
        spec = measure_sample(written[train], bands)
        if not spec.is_rgb8:
            problems.note(f"sample: {spec.describe()}, measured on {min(len(written[train]), MEASURED_IMAGES)} "
                          f"{train} images")
        for path, document in outputs:
            document["info"]["sample"] = spec.model_dump(mode="json")
            stage.write_json(path, document)
    return summaries


def check_oriented(plans: Sequence[SplitPlan]) -> None:
    """Every object an oriented box (4 corners), or an InputError naming the first that is not."""
    from ds2d2_cli.data.scenes import object_message

    for plan in plans:
        for scene in plan.scenes:
            for obj in scene.objects:
                if obj.polygon and len(obj.poly) == 4:
                    continue
                what = "a horizontal box" if not obj.polygon else f"a polygon of {len(obj.poly)} corners"
                exc = object_message(scene, obj, f"{what}: --boxes obb needs oriented boxes (4 corners each)",
                                     "not an oriented box")
                raise InputError(exc.message, exc.path, exc.line)


def _check_bands(checked: dict[int, _Checked], problems: Problems, scaling: str,
                 band_names: tuple[str, ...] | None) -> Bands | None:
    """The bands of the run, from the first image's header; other images must match it (bad items).

    Images must agree on band count and type, and on band names unless --band-names names
    them all. An image whose header cannot be read is left to the image check, which
    reports it in its own words. None when no header could be read.
    """
    bands: Bands | None = None
    for item in checked.values():
        try:
            info = probe(item.scene.image)
        except BadItem:
            continue
        if bands is None:
            bands = _first_bands(info, scaling, band_names)
            continue
        first = bands.first
        if info.count != first.count or info.dtype != first.dtype or (band_names is None and info.bands != first.bands):
            message = (f"has {bands_text(info.bands, info.dtype)}; the first image ({first.path.name}) has "
                       f"{bands_text(first.bands, first.dtype)}")
            problems.bad(_image_problem(item.scene, BadItem(message, item.scene.image, reason="other bands")), "image",
                         **item.scene.where)
            item.other_bands = True
    return bands


def _first_bands(first: RasterInfo, scaling: str, band_names: tuple[str, ...] | None) -> Bands:
    """The run's bands from its first image: --band-names must name each band, --scaling must fit the type."""
    if band_names is not None and len(band_names) != first.count:
        raise InputError(f"--band-names gives {len(band_names)} name{'s' if len(band_names) != 1 else ''} "
                         f"({', '.join(band_names)}) but the images have {bands_text(first.bands, first.dtype)}",
                         first.path)
    names = band_names or first.bands
    if scaling == "auto":
        scaling = default_scaling(names, first.dtype)
    elif scaling == "range" and np.dtype(first.dtype).kind not in "ui":
        raise InputError(f"--scaling range needs whole-number pixels, but the images are {first.dtype}: "
                         "use percentile, minmax or db", first.path)
    return Bands(first, names, scaling)


# --------------------------------------------------------------------------- whole images


def _check_whole_images(checked: dict[int, _Checked], problems: Problems,
                        reporter: Reporter) -> None:
    """Decode-check every image and place its objects; bad ones are raised or (skip_bad) reported."""
    task = reporter.task("check images", total=len(checked))
    for item in checked.values():
        scene = item.scene
        if item.other_bands:
            task.update(1)
            continue
        try:
            size = check_image(scene.image)
            if scene.size is not None and tuple(scene.size) != size:
                raise BadItem(f"the labels say {scene.size[0]}x{scene.size[1]} but {scene.image.name} is "
                              f"{size[0]}x{size[1]}", scene.label_path or scene.image, reason="size mismatch")
        except BadItem as exc:
            problems.bad(_image_problem(scene, exc), "image", **scene.where)
            task.update(1)
            continue
        item.size = size
        item.placed = place_in_image([o.poly for o in item.objects], *size)
        _report_border(item, problems)
        task.update(1)


def _image_problem(scene: Scene, exc: BadItem) -> BadItem:
    """An unreadable image, named as its format names it (COCO: the annotation file and the image id)."""
    if scene.item is None:
        return exc
    return BadItem(f"{scene.item}: {exc.message}{scene.dropped_with}", scene.label_path, reason=exc.reason)


def _report_border(item: _Checked, problems: Problems) -> None:
    """Objects wholly outside their image are bad; partly outside ones were clipped (reported once)."""
    if item.reported or item.placed is None or item.size is None:
        return
    item.reported = True
    scene, placed = item.scene, item.placed
    for index in placed.outside:
        problems.bad(outside_message(scene, item.objects[index], *item.size), "object", **scene.where)
    for index in placed.clipped:
        problems.repair(clipped_message(scene, item.objects[index], *item.size), "object", **scene.where)


def _scene_annotations(writer: CocoWriter, image_id: int, item: _Checked, boxes: str = "hbb") -> None:
    placed = item.placed
    assert placed is not None
    for index, piece, box, area in zip(placed.kept, placed.pieces, placed.boxes, placed.areas):
        obj = item.objects[index]
        fields: dict[str, Any] = {
            "bbox": box,
            # the source's own area (a mask's) while the object is whole, unless it rounds to nothing
            "area": _r(obj.area) if obj.area is not None and index not in placed.clipped and _r(obj.area) > 0
            else _r(area),
            "iscrowd": obj.iscrowd,
        }
        if obj.polygon:
            fields["segmentation"] = [[_r(v) for v in piece.reshape(-1)]]
            if boxes == "obb":
                fields["rbox"] = rbox_field(fields["segmentation"][0])
        fields.update(obj.keep)
        fields["difficult"] = obj.difficult
        writer.add_annotation(image_id, item.category_ids[index], fields)


def _image_fields(scene: Scene, out: Path, size: tuple[int, int]) -> dict[str, Any]:
    return {"file_name": relpath(scene.image, out), "width": size[0], "height": size[1], **scene.fields}


def _whole_split(plan: SplitPlan, out: Path, checked: dict[int, _Checked], class_names: Sequence[str],
                 boxes: str = "hbb") -> tuple[CocoWriter, SplitStats]:
    writer = CocoWriter(class_names)
    stats = SplitStats()
    for scene in plan.scenes:
        item = checked[id(scene)]
        if item.size is None:
            continue  # skipped as bad
        image_id = writer.add_image(_image_fields(scene, out, item.size), scene.image_id)
        _scene_annotations(writer, image_id, item, boxes)
    return writer, stats


# --------------------------------------------------------------------------- tiled


def _tiled_split(plan: SplitPlan, name: str, staged: Path, out: Path, checked: dict[int, _Checked],
                 class_names: Sequence[str], tiling: Tiling, workers: int, problems: Problems, reporter: Reporter,
                 band_names: tuple[str, ...], boxes: str = "hbb") -> tuple[CocoWriter, CocoWriter, SplitStats]:
    """Cut one split's scenes into patches in `staged`; its two COCO files (scenes, patches) and figures."""
    items = [checked[id(scene)] for scene in plan.scenes if not checked[id(scene)].other_bands]
    jobs = [SceneJob(
        image_path=item.scene.image, stem=item.scene.name, polys=tuple(o.poly for o in item.objects),
        category_ids=tuple(item.category_ids), difficult=tuple(o.difficult for o in item.objects), out_dir=staged,
        split=name, tiling=tiling, class_names=tuple(class_names), outlines=tuple(o.polygon for o in item.objects),
        crowd=tuple(o.iscrowd for o in item.objects), declared_size=item.scene.size,
        label_path=item.scene.label_path, band_names=band_names, boxes=boxes,
    ) for item in items]
    results: list[dict[str, Any] | BadItem | None] = [None] * len(jobs)
    task = reporter.task(f"split {plan.name}", total=len(jobs))

    def receive(i: int, outcome: dict[str, Any] | BadItem) -> None:
        if isinstance(outcome, BadItem):
            outcome = _image_problem(items[i].scene, outcome)
        if not problems.skip_bad:
            if isinstance(outcome, BadItem):
                raise outcome
            if outcome["placed"].outside:
                index = outcome["placed"].outside[0]
                raise outside_message(items[i].scene, items[i].objects[index], outcome["width"], outcome["height"])
        results[i] = outcome
        task.update(1, patches=0 if isinstance(outcome, BadItem) else outcome["stats"].patches)

    cut_scenes(jobs, workers, receive)
    # Assemble in plan order: ids and reports do not depend on which worker finished first.
    scenes, patches = CocoWriter(class_names), CocoWriter(class_names)
    stats = SplitStats()
    for item, result in zip(items, results):
        scene = item.scene
        if isinstance(result, BadItem):
            if not item.reported:
                item.reported = True
                problems.bad(result, "image", **scene.where)
            continue
        assert result is not None
        item.size, item.placed = (result["width"], result["height"]), result["placed"]
        _report_border(item, problems)
        stats.add(result["stats"])
        scene_id = scenes.add_image(_image_fields(scene, out, item.size), scene.image_id)
        _scene_annotations(scenes, scene_id, item, boxes)
        for patch in result["patches"]:
            image_id = patches.add_image({
                "file_name": patch["file_name"], "width": patch["width"], "height": patch["height"],
                "scene": scene.name, "scene_width": item.size[0], "scene_height": item.size[1],
                "window": patch["window"], "scale": patch["scale"], "scene_id": scene_id,
            })
            for ann in patch["annotations"]:
                patches.add_annotation(image_id, ann["category_id"], ann)
    return scenes, patches, stats


def whole_image_warning(summary: PreparedSummary, input_size: int, preset: str) -> str | None:
    """A warning when whole images are far larger than the network input: resizing shrinks small objects."""
    if summary.tiling is not None:
        return None
    sides = {name: s.median_side for name, s in summary.splits.items() if s.median_side > WIDE_FACTOR * input_size}
    if not sides:
        return None
    name, side = max(sides.items(), key=lambda kv: kv[1])
    return (f"the median {name} image is {side:g} px on its longer side, more than {WIDE_FACTOR:g}x the "
            f"{input_size} px input of preset {preset}: resized whole, its objects shrink {side / input_size:.1f}x; "
            f"cut the images with --split {input_size} --gap {input_size // 4}")
