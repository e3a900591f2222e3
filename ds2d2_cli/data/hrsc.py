"""HRSC2016 (ships, rotated boxes in XML) -> a prepared data folder, through the shared writer.

Read from MMRotate's loader, config and test sample (open-mmlab/mmrotate, branches main and
1.x: `mmrotate/datasets/hrsc.py`, `configs/_base_/datasets/hrsc.py`,
`tools/data/hrsc/README.md`, `tests/data/hrsc/FullDataSet/Annotations/100000006.xml`,
`tests/data/hrsc/demo.txt`, `tests/test_datasets/test_hrsc.py`), and the rotated-box corners
from `mmrotate/core/bbox/transforms.py` (`obb2poly_np_le90`) and
`mmrotate/structures/bbox/box_converters.py` (`rbox2qbox`), which agree. Split lists
beyond trainval/test (`ImageSets/train.txt`, `val.txt`) as in jbwang1997/OBBDetection
`configs/obb/_base_/datasets/hrsc.py`.

Layout (the official release)::

    ROOT/FullDataSet/AllImages/<id>.bmp
    ROOT/FullDataSet/Annotations/<id>.xml
    ROOT/ImageSets/{train,val,trainval,test}.txt    one image id per line

Every one of those four lists that exists becomes a split of that name (MMRotate trains on
trainval and tests on test); an image listed by two (train and trainval) is read once.

Each XML is an `<HRSC_Image>` with `<Img_SizeWidth>`/`<Img_SizeHeight>` and
`<HRSC_Objects>` holding zero or more `<HRSC_Object>`: `<Class_ID>` (`1000000` + a two-digit
id), `<difficult>`, a horizontal `<box_xmin/ymin/xmax/ymax>`, and the rotated box
`<mbox_cx>`, `<mbox_cy>`, `<mbox_w>`, `<mbox_h>`, `<mbox_ang>` (radians). The rotated box is
the label, as in MMRotate: its four corners become the polygon (`segmentation`; the
envelope, clipped to the image, is `bbox`). The separate horizontal `box_*` is not used.

Angle convention (MMRotate's `le90` conversion used by its HRSC loader), ds2d2's own
(`ds2d2_cli.rotated`): image axes (x right, y down); the side of length w points along
(cos a, sin a), the side of length h along (-sin a, cos a), so a positive angle turns the box
clockwise on screen. The corners (`rotated.rbox_to_poly`), in this order: c - u - v,
c + u - v, c + u + v, c - u + v with u = w/2 (cos a, sin a), v = h/2 (-sin a, cos a). With
`--boxes obb` the `rbox` is the minimum-area rectangle of those corners: the mbox in le90
form (w >= h, angle in [-pi/2, pi/2)), to the written precision.

Tasks: `ship` (HRSC2016 level 1: every object is `ship`, Class_ID ignored) and `class`
(level 3: Class_ID through MMRotate's 31-name table, `classwise=True`). MMRotate leaves
objects of an id outside that table out silently; here they are bad input.

Bad input (one line naming the file and line; `skip_bad` skips and reports): an image id
listed twice or not a plain name, a missing or malformed annotation file (not XML, another
root element), a size that is not a whole number, a missing or non-numeric `mbox_*` field,
a negative width or height, an unknown Class_ID (class task), a bad `difficult` flag; and,
through the shared writer, a missing, truncated or unreadable image, a size that does not
match the image, and an object wholly outside its image (clipped when partly outside).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from xml.parsers import expat

import torch

from ds2d2_cli.classes import ClassChoice
from ds2d2_cli.data.coco_writer import check_boxes
from ds2d2_cli.data.dota import MAX_COORDINATE
from ds2d2_cli.data.prepared import PreparedSummary, write_prepared
from ds2d2_cli.data.scenes import Scene, SceneObject, SplitPlan, resolve_classes
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.validate import IMAGE_EXTS, BadItem, Problems, difficult_flag, finite, held_progress, one_line
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.rotated import rbox_to_poly

TASKS = ("ship", "class")
SPLITS = ("train", "val", "trainval", "test")  # the ImageSets lists, in output order
SHIP_CLASSES = ("ship",)
# Level-3 table (MMRotate HRSCDataset, classwise=True): Class_ID "1000000" + id -> name. Ids 21 and 23 are not in it.
CLASS_TABLE: tuple[tuple[str, str], ...] = (
    ("01", "ship"), ("02", "aircraft carrier"), ("03", "warcraft"), ("04", "merchant ship"), ("05", "Nimitz"),
    ("06", "Enterprise"), ("07", "Arleigh Burke"), ("08", "WhidbeyIsland"), ("09", "Perry"), ("10", "Sanantonio"),
    ("11", "Ticonderoga"), ("12", "Kitty Hawk"), ("13", "Kuznetsov"), ("14", "Abukuma"), ("15", "Austen"),
    ("16", "Tarawa"), ("17", "Blue Ridge"), ("18", "Container"), ("19", "OXo|--)"), ("20", "Car carrier([]==[])"),
    ("22", "Hovercraft"), ("24", "yacht"), ("25", "CntShip(_|.--.--|_]="), ("26", "Cruise"), ("27", "submarine"),
    ("28", "lute"), ("29", "Medical"), ("30", "Car carrier(======|"), ("31", "Ford-class"), ("32", "Midway-class"),
    ("33", "Invincible-class"),
)
HRSC_CLASSES = tuple(name for _, name in CLASS_TABLE)
CLASS_BY_ID = {f"1000000{short}": name for short, name in CLASS_TABLE}
BOX_FIELDS = ("mbox_cx", "mbox_cy", "mbox_w", "mbox_h", "mbox_ang")


# --------------------------------------------------------------------------- one annotation file


@dataclass
class HrscLabels:
    path: Path
    size: tuple[int, int] | None  # (width, height) the file declares; None when absent or 0
    objects: list[SceneObject]


def _read_xml(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """The document and the line each element starts on (messages name the line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadItem("annotation file not found", path, reason="missing annotation") from None
    except OSError as exc:
        raise BadItem(f"cannot read annotation file: {one_line(exc.strerror or exc)}", path,
                      reason="unreadable annotation") from None
    parser = expat.ParserCreate()
    builder = ET.TreeBuilder()
    lines: dict[ET.Element, int] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise BadItem(f"not well-formed XML ({expat.ErrorString(exc.code)}, column {exc.offset + 1})", path,
                      exc.lineno, reason="malformed XML") from None
    return builder.close(), lines


def parse_hrsc_xml(path: str | Path, task: str = "ship",
                   on_bad: Callable[[BadItem], None] | None = None) -> HrscLabels:
    """Parse one HRSC2016 annotation; objects are named `ship` (ship task) or by the 31-name table (class task).

    A file that cannot be read, is not XML, is not an `<HRSC_Image>` or declares a size that
    is not a whole number raises a BadItem. A bad object (a missing or non-numeric
    `mbox_*`, a negative side, an unknown Class_ID, a bad difficult flag) raises too, or is
    handed to `on_bad` and left out when one is given (--skip-bad).
    """
    path = Path(path)
    if task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    root, lines = _read_xml(path)
    if root.tag != "HRSC_Image":
        raise BadItem(f"not an HRSC2016 annotation: the root element is <{root.tag}>, expected <HRSC_Image>", path,
                      lines.get(root), reason="malformed XML")
    labels = HrscLabels(path, _declared_size(root, lines, path), [])

    def bad(message: str, element: ET.Element, reason: str) -> None:
        exc = BadItem(message, path, lines.get(element), reason=reason)
        if on_bad is None:
            raise exc
        on_bad(exc)

    for index, obj in enumerate(root.findall("HRSC_Objects/HRSC_Object"), start=1):
        item = f"HRSC_Object {index}"
        values: list[float] = []
        for tag in BOX_FIELDS:
            node = obj.find(tag)
            text = (node.text or "").strip() if node is not None else ""
            if node is None or not text:
                bad(f"{item}: <{tag}> is missing or empty", obj if node is None else node, "malformed object")
                break
            value = finite(text)
            if value is None:
                bad(f"{item}: <{tag}> must be a finite number (got {text[:40]!r})", node, "malformed object")
                break
            if tag != "mbox_ang" and abs(value) > MAX_COORDINATE:
                bad(f"{item}: <{tag}> {value:g} is far outside any image (more than {MAX_COORDINATE:g} px)", node,
                    "object outside image")
                break
            if tag in ("mbox_w", "mbox_h") and value < 0:
                bad(f"{item}: <{tag}> must not be negative (got {text[:40]})", node, "malformed object")
                break
            values.append(value)
        if len(values) < len(BOX_FIELDS):
            continue
        name = SHIP_CLASSES[0]
        if task == "class":
            node = obj.find("Class_ID")
            class_id = (node.text or "").strip() if node is not None else ""
            if class_id not in CLASS_BY_ID:
                got = f"{class_id[:40]!r}" if class_id else "none"
                bad(f"{item}: unknown <Class_ID> {got} (the class task knows the {len(CLASS_TABLE)} ids "
                    f"1000000{CLASS_TABLE[0][0]} to 1000000{CLASS_TABLE[-1][0]} of MMRotate's table; "
                    "--task ship ignores Class_ID)", obj if node is None else node, "unknown class")
                continue
            name = CLASS_BY_ID[class_id]
        node = obj.find("difficult")
        flag_text = (node.text or "").strip() if node is not None else ""
        difficult = difficult_flag(flag_text)
        if difficult is None:
            bad(f"{item}: <difficult> must be 0 or 1 (got {flag_text[:40]!r})", node, "malformed object")
            continue
        corners = rbox_to_poly(torch.tensor(values, dtype=torch.float64)).numpy()  # the mbox's convention
        labels.objects.append(SceneObject(corners, name, difficult, line=lines.get(obj),
                                          item=item))
    return labels


def _declared_size(root: ET.Element, lines: dict[ET.Element, int], path: Path) -> tuple[int, int] | None:
    """(width, height) from Img_SizeWidth/Img_SizeHeight; None when either is absent or 0 (the image decides)."""
    size: list[int] = []
    for tag in ("Img_SizeWidth", "Img_SizeHeight"):
        node = root.find(tag)
        text = (node.text or "").strip() if node is not None else ""
        if not text:
            return None
        value = finite(text)
        if value is None or value < 0 or value != int(value):
            raise BadItem(f"<{tag}> must be a whole number of pixels (got {text[:40]!r})", path, lines.get(node),
                          reason="malformed XML")
        size.append(int(value))
    return (size[0], size[1]) if size[0] > 0 and size[1] > 0 else None


# --------------------------------------------------------------------------- the dataset


def read_image_set(path: Path, problems: Problems, split: str) -> list[str]:
    """The image ids of one ImageSets list, in order; an id listed twice or not a plain name is a bad item."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise InputError(f"cannot read image list: {one_line(reason)}", path) from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        image_id = raw.strip()
        if not image_id:
            continue
        where = {"split": split, "image": image_id[:60]}
        if len(image_id.split()) != 1 or any(c in image_id for c in "/\\") or image_id in (".", ".."):
            problems.bad(BadItem(f"not an image id: {image_id[:60]!r} (one id such as 100000001 per line)", path,
                                 lineno, reason="malformed list"), "list entry", **where)
            continue
        if image_id in seen:
            problems.bad(BadItem(f"image id {image_id} listed twice (first on line {seen[image_id]})", path, lineno,
                                 reason="duplicate id"), "list entry", **where)
            continue
        seen[image_id] = lineno
        ids.append(image_id)
    if not ids and not problems.skipped_where(split=split):
        raise InputError("the image list is empty", path)
    return ids


def find_image(images_dir: Path, image_id: str) -> Path:
    """`<id>.bmp` as the release ships it, else the one `<id>.<ext>` there (a converted copy); the .bmp when none."""
    bmp = images_dir / f"{image_id}.bmp"
    if bmp.is_file():
        return bmp
    others = [images_dir / f"{image_id}{ext}" for ext in IMAGE_EXTS if ext != ".bmp"]
    found = [p for p in others if p.is_file()]
    return found[0] if len(found) == 1 else bmp


def hrsc_layout(root: Path) -> tuple[Path, Path, list[tuple[str, Path]]]:
    """(images dir, annotations dir, [(split, list file)]) of an HRSC2016 folder; an InputError says what is missing."""
    if not root.is_dir():
        raise InputError("HRSC2016 folder not found", root)
    images_dir, ann_dir, sets_dir = root / "FullDataSet" / "AllImages", root / "FullDataSet" / "Annotations", \
        root / "ImageSets"
    expected = "expected FullDataSet/AllImages/, FullDataSet/Annotations/ and ImageSets/trainval.txt, test.txt " \
               "(the official HRSC2016 layout)"
    for folder in (images_dir, ann_dir):
        if not folder.is_dir():
            raise InputError(f"no {folder.relative_to(root)}/ folder: {expected}", root)
    lists = [(split, sets_dir / f"{split}.txt") for split in SPLITS if (sets_dir / f"{split}.txt").is_file()]
    if not lists:
        raise InputError(f"no image list ({', '.join(f'{s}.txt' for s in SPLITS)}) in ImageSets/: {expected}", root)
    return images_dir, ann_dir, lists


def plan_hrsc(root: Path, task: str, problems: Problems) -> list[SplitPlan]:
    """Every listed split's scenes; an image listed by two splits is one Scene (read and reported once)."""
    images_dir, ann_dir, lists = hrsc_layout(root)
    read: dict[str, Scene | None] = {}  # image id -> its scene; None: skipped as bad
    plans: list[SplitPlan] = []
    for split, list_path in lists:
        plan = SplitPlan(split, images_dir, [])
        for image_id in read_image_set(list_path, problems, split):
            if image_id not in read:
                read[image_id] = _read_scene(images_dir, ann_dir, image_id, task, problems, split)
            scene = read[image_id]
            if scene is not None:
                plan.scenes.append(scene)
        if not plan.scenes:
            raise InputError(f"no usable image left in split {split!r}: every one was skipped as bad", list_path)
        plans.append(plan)
    return plans


def _read_scene(images_dir: Path, ann_dir: Path, image_id: str, task: str, problems: Problems,
                split: str) -> Scene | None:
    where = {"split": split, "image": image_id}
    xml_path = ann_dir / f"{image_id}.xml"
    try:
        labels = parse_hrsc_xml(xml_path, task, on_bad=lambda exc: problems.bad(exc, "object", **where))
    except BadItem as exc:  # the whole file, or a bad object without --skip-bad
        problems.bad(exc, "image", **where)
        return None
    return Scene(find_image(images_dir, image_id), image_id, labels.objects, label_path=xml_path, size=labels.size,
                 where=where)


def _shared_reports(plans: Sequence[SplitPlan]) -> dict[str, list[str]]:
    """Which earlier splits' reports a split's JSON also lists: those it shares images with (trainval: train, val)."""
    shares: dict[str, list[str]] = {}
    for i, plan in enumerate(plans):
        mine = {id(s) for s in plan.scenes}
        shares[plan.name] = [p.name for p in plans[:i] if mine & {id(s) for s in p.scenes}]
    return shares


def prepare_hrsc2016(root: str | Path, out: str | Path, *, task: str = "ship", classes: ClassChoice | None = None,
                     tiling: Tiling | None = None, workers: int = 1, skip_bad: bool = False,
                     reporter: Reporter | None = None, scaling: str = "auto",
                     band_names: Sequence[str] | None = None, boxes: str = "hbb") -> PreparedSummary:
    """Convert an HRSC2016 folder into `out` (whole images, or patches with `tiling`); the summary figures.

    Every annotation is parsed (and errors raised) before anything is written; a failed run
    leaves no JSON and no patches (`ds2d2_cli.data.prepared`). `classes` filters and orders
    (a list) or checks against a shipped set; without it the classes are the task's own:
    `ship`, or the 31 level-3 names in table order. `boxes` "obb" adds each object's rotated
    box (`rbox`, le90: the minimum-area rectangle of its corners, which is the mbox itself
    while the object is whole).
    """
    if task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    check_boxes(boxes)
    with held_progress(reporter if reporter is not None else NullReporter()) as held:
        root, out = Path(root), Path(out)
        inside = (out.resolve(), *out.resolve().parents)
        if out.resolve() == root.resolve() or any((root / d).resolve() in inside for d in ("FullDataSet", "ImageSets")):
            raise InputError("--out must be a folder of its own, not the HRSC2016 folder or one of its data folders",
                             out)
        started = time.perf_counter()
        problems = Problems(skip_bad, held)
        plans = plan_hrsc(root, task, problems)
        declared = SHIP_CLASSES if task == "ship" else HRSC_CLASSES
        class_names, filtered = resolve_classes(plans, classes, declared, problems)
        figures = write_prepared(plans, out, source="hrsc2016", class_names=class_names,
                                 classes_label=classes.label if classes is not None else None, tiling=tiling,
                                 problems=problems, reporter=held, workers=workers, meta={"task": task},
                                 report_splits=_shared_reports(plans), scaling=scaling, band_names=band_names,
                                 boxes=boxes)
        problems.flush()
        return PreparedSummary(source=str(root), out=str(out), classes=classes.label if classes is not None else None,
                               problems=problems.report(), seconds=round(time.perf_counter() - started, 3),
                               format="hrsc2016", tiling=tiling.meta() if tiling is not None else None, splits=figures,
                               filtered=filtered, boxes=boxes)
