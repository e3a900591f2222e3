"""DIOR (Pascal-VOC style XML) -> a prepared data folder, through the VOC reader and the shared writer.

Layout read (the official download; the alternatives in brackets are accepted too)::

    ROOT/Annotations/Horizontal Bounding Boxes/*.xml   [ROOT/Annotations/*.xml]
    ROOT/ImageSets/Main/{train,val,test}.txt
    ROOT/JPEGImages-trainval/*.jpg, ROOT/JPEGImages-test/*.jpg   [ROOT/JPEGImages/*.jpg]

This module only finds DIOR's files: each XML is read by `ds2d2_cli.data.voc` (its
`<size>` required, its class names one of DIOR's 20, spelling-insensitively) and
everything after that is shared (`ds2d2_cli.data.prepared`): the object policy, the
optional tiling, the JSON. Written: `OUT/{train,val,trainval,test}.json` (those whose
lists exist; trainval is train and val together), images whole with `file_name`
relative to OUT, or cut into patches with a `Tiling`. Image ids are DIOR's numbers.
Box convention (as every VOC file): the XML's `xmin, ymin, xmax, ymax` are taken as
given (no 1-based shift) and written as `[xmin, ymin, xmax - xmin, ymax - ymin]`.
Boxes reaching past the image are clipped to it (counted); zero-area boxes are dropped
and reported; bad input (malformed XML, missing fields, unknown classes, an XML
`<size>` that disagrees with the image, unreadable images, boxes wholly outside their
image) stops the run with one line naming the file, or is skipped and reported with
`skip_bad` (see `ds2d2_cli.data.validate`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ds2d2_cli.classes import DIOR, ClassChoice
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SplitPlan, resolve_classes
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import IMAGE_EXTS, BadItem, Problems, held_progress, one_line
from ds2d2_cli.data.voc import check_out, read_split_list, read_voc_scene
from ds2d2_cli.data.voc import parse_voc_xml as _parse_voc_xml
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter

SPLITS = ("train", "val", "test")
DIOR_SET = ClassChoice(DIOR, "dior")


def parse_voc_xml(path: str | Path, classes: Sequence[str] = DIOR,
                  on_bad: Callable[[BadItem], None] | None = None) -> dict[str, Any]:
    """One DIOR XML (`ds2d2_cli.data.voc.parse_voc_xml` with its `<size>` required, DIOR's class names)."""
    return _parse_voc_xml(path, classes, on_bad, require_size=True,
                          class_set="dior" if tuple(classes) == DIOR else "")


def annotation_dir(root: Path) -> Path:
    for candidate in (root / "Annotations" / "Horizontal Bounding Boxes", root / "Annotations"):
        if candidate.is_dir() and any(candidate.glob("*.xml")):
            return candidate
    raise InputError("no DIOR annotations: expected Annotations/Horizontal Bounding Boxes/*.xml", root)


def index_images(root: Path) -> dict[str, Path]:
    """stem -> image path over JPEGImages-trainval/, JPEGImages-test/ and JPEGImages/ (nesting allowed).

    Files of other formats are indexed too (a supported one wins a shared stem), so that
    a listed image in an unsupported format is reported as such, not as missing.
    """
    index: dict[str, Path] = {}
    try:
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower().startswith("jpegimages")]
        if not folders:
            raise InputError("no image folder: expected JPEGImages-trainval/ and JPEGImages-test/ (or JPEGImages/)",
                             root)
        for folder in folders:
            for path in sorted(folder.rglob("*")):
                if path.name.startswith(".") or not path.is_file():
                    continue
                known = index.get(path.stem)
                if known is None or (known.suffix.lower() not in IMAGE_EXTS and path.suffix.lower() in IMAGE_EXTS):
                    index[path.stem] = path
    except OSError as exc:
        raise InputError(f"cannot list images: {one_line(exc.strerror or exc)}", root) from None
    return index


def prepare_dior(root: str | Path, out: str | Path, reporter: Reporter | None = None, *,
                 classes: ClassChoice | None = None, tiling: Tiling | None = None, workers: int = 1,
                 skip_bad: bool = False, scaling: str = "auto",
                 band_names: Sequence[str] | None = None) -> PreparedSummary:
    """Write every DIOR split list found (plus trainval); returns the summary figures.

    Every listed image must have its XML and a readable image of the XML's <size>.
    `classes` (default: the DIOR set) may be a list of DIOR classes to keep, in that
    order. Problems stop the run with one line naming the file (nothing is written), or
    with `skip_bad` skip the image (or only the object) and are reported; the summary
    and each JSON's `info.skipped` list everything left out.
    """
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        root, out = Path(root), Path(out)
        if tiling is not None:
            tiling.check()
        if not root.is_dir():
            raise InputError("DIOR folder not found", root)
        check_out(out, [root])
        started = time.perf_counter()
        problems = Problems(skip_bad, held)
        plans = _plan_dior(root, problems, held)
        choice = classes if classes is not None else DIOR_SET
        class_names, filtered = resolve_classes(plans, choice, None, problems)
        figures = write_prepared(plans, out, source="dior", class_names=class_names, classes_label=choice.label,
                                 tiling=tiling, problems=problems, reporter=held, workers=workers,
                                 report_splits={"trainval": ("train", "val")}, scaling=scaling,
                                 band_names=band_names)
        problems.flush()
        return PreparedSummary(source=str(root), out=str(out), classes=choice.label, problems=problems.report(),
                               seconds=round(time.perf_counter() - started, 3), format="dior",
                               tiling=tiling.meta() if tiling is not None else None, splits=figures,
                               filtered=filtered)


def _plan_dior(root: Path, problems: Problems, reporter: Reporter) -> list[SplitPlan]:
    """The split lists as plans (trainval: train then val's others); an image listed twice is read once."""
    ann_dir = annotation_dir(root)
    lists_dir = root / "ImageSets" / "Main"
    split_ids = {split: read_split_list(lists_dir / f"{split}.txt") for split in SPLITS
                 if (lists_dir / f"{split}.txt").is_file()}
    if not split_ids:
        raise InputError("no split lists: expected ImageSets/Main/train.txt, val.txt, test.txt", root)
    images = index_images(root)
    all_ids = [i for ids in split_ids.values() for i in ids]
    numeric = all(i.isdigit() and int(i) > 0 for i in all_ids) and len({int(i) for i in all_ids}) == len(set(all_ids))
    scenes: dict[str, Scene | None] = {}
    plans: dict[str, SplitPlan] = {}
    task = reporter.task("read DIOR", total=len(set(all_ids)))
    for split, ids in split_ids.items():
        plan = plans[split] = SplitPlan(split, lists_dir / f"{split}.txt", [])
        seen: set[str] = set()
        for image_id in ids:
            where = {"split": split, "image": image_id}
            if image_id in seen:
                problems.bad(BadItem(f"image {image_id} is listed twice (the second is left out)",
                                     lists_dir / f"{split}.txt", reason="duplicate id"), "list entry", **where)
                continue
            seen.add(image_id)
            if image_id not in scenes:
                order = int(image_id) if numeric else len(scenes) + 1
                scenes[image_id] = _read_image(ann_dir, images, image_id, split, order, problems, where)
                task.update(1)
            scene = scenes[image_id]
            if scene is not None:
                plan.scenes.append(scene)
    listed = set(all_ids)
    unlisted = sorted(p.stem for p in ann_dir.glob("*.xml") if p.stem not in listed)
    if unlisted:
        problems.note(f"{len(unlisted)} annotation file(s) are in no split list and not converted "
                      f"(e.g. {unlisted[0]}.xml)")
    if "train" in plans and "val" in plans:
        train = plans["train"].scenes
        members = {id(s) for s in train}
        trainval = SplitPlan("trainval", lists_dir / "trainval.txt",
                             train + [s for s in plans["val"].scenes if id(s) not in members])
        plans = {"train": plans["train"], "val": plans["val"], "trainval": trainval,
                 **{k: v for k, v in plans.items() if k not in ("train", "val")}}
    for plan in plans.values():
        if not plan.scenes:
            raise InputError(f"no usable image left in split {plan.name!r}: every one was skipped as bad",
                             plan.folder)
    return list(plans.values())


def _read_image(ann_dir: Path, images: dict[str, Path], image_id: str, split: str, order: int,
                problems: Problems, where: dict[str, Any]) -> Scene | None:
    """One listed image and its XML as a Scene; None when skipped as bad."""
    xml_path = ann_dir / f"{image_id}.xml"
    if not xml_path.is_file():
        problems.bad(BadItem(f"no annotation for image {image_id} (listed in {split}.txt)", xml_path,
                             reason="image without annotation"), "image", **where)
        return None
    image_path = images.get(image_id)
    if image_path is None:
        problems.bad(BadItem(f"image {image_id} (listed in {split}.txt) not found under the JPEGImages folders",
                             xml_path, reason="annotation without image"), "image", **where)
        return None
    return read_voc_scene(xml_path, image_path, image_id, where, problems, classes=DIOR, class_set="dior",
                          require_size=True, image_id=order)
