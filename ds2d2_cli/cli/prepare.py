"""`ds2d2 prepare-data`: every format people label in -> the COCO JSON ds2d2 trains on (one command per format)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ds2d2_cli.classes import CLASS_SETS
from ds2d2_cli.cli.common import RichReporter, handle_errors, stderr_console, stdout_console, write_json_output
from ds2d2_cli.errors import InputError

if TYPE_CHECKING:
    from ds2d2_cli.classes import ClassChoice
    from ds2d2_cli.data.tiling import Tiling
    from ds2d2_cli.data.coco_writer import PrepareSummary
    from ds2d2_cli.data.prepared import PreparedSummary
    from ds2d2_cli.data.validate import ProblemReport

app = typer.Typer(
    help="Convert DOTA / DIOR / COCO / VOC / YOLO / HRSC2016 / UCAS-AOD / synthetic data into the COCO JSON ds2d2 "
         "trains on, cut into patches with --split (see each command's --help).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_HELP = "also write the summary figures as JSON to FILE (`-` for stdout)"
SKIP_BAD_HELP = ("skip bad images, label files, lines and objects instead of stopping at the first; each is "
                 "reported, counted in the summary and listed in the output JSON's info.skipped")
CLASSES_HELP = f"class set: {', '.join(CLASS_SETS)}"
GAP_HELP = "overlap between neighbouring windows in pixels"
SCALES_HELP = "resize scenes by these factors first: --scales 1.0,0.5 (or repeat)"
IOF_HELP = "keep a cut object when at least this fraction of its area is inside the window"
WORKERS_HELP = "processes cutting scenes in parallel (0: one per CPU)"
PRESET_SIZE_HELP = ("the preset you will train with: images kept whole (no --split) are checked against its "
                    "input size")
SPLIT_HELP = ("cut images into SIZE x SIZE patches, as prepare-data dota does (writes OUT/<split>/images/ and "
              "OUT/<split>_scenes.json) \\[default: images stay whole]")
OWN_CLASSES_HELP = (f"a class set ({', '.join(CLASS_SETS)}: names outside it are bad input) or your own list "
                    "(car,truck or \\[car,truck]: keeps and orders those classes, leaves the others out) "
                    "\\[default: the data's own classes]")
PARTIAL_HELP = "cut objects under --iof-thr: drop them, or keep them as crowd (iscrowd 1, ignored in training)"
SCALING_HELP = ("how stored pixel values become the model's floats, recorded with the data: range (the type's "
                "range, /255 for 8-bit), percentile (the training split's 1st to 99th percentile per band), minmax "
                "(its minimum to maximum), db (SAR: 10*log10, then percentiles); auto: range for 8-bit images, "
                "percentile otherwise \\[default: auto]")
BOXES_HELP = ("hbb: horizontal boxes; obb: also each object's rotated box, `rbox` [cx, cy, w, h, theta] in "
              "the le90 convention (theta in radians, w >= h, theta in [-pi/2, pi/2), clockwise on screen), cut "
              "objects outlined as the DOTA devkit's ImgSplit writes them")
ORIENTED_FORMATS = "dota, hrsc2016, ucas-aod, yolo (YOLO-OBB labels)"
BAND_NAMES_HELP = ("name the images' bands in order: --band-names red,green,blue,nir (one name per band) "
                   "\\[default: the GeoTIFF band descriptions, red,green,blue for RGB images, else b1,b2 ...]")


def _parse_scales(values: List[str]) -> list[float]:
    scales: list[float] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                scales.append(float(part))
            except ValueError:
                raise InputError(f"--scales takes numbers such as 1.0,0.5 (got {part!r})") from None
    return scales or [1.0]


# The options every converter that can keep images whole shares (one definition, reused by each command).
SPLIT_OPTION = typer.Option(None, "--split", metavar="SIZE", help=SPLIT_HELP, show_default=False)
GAP_OPTION = typer.Option(None, "--gap", help=GAP_HELP + " \\[default: 200]", show_default=False)
SCALES_OPTION = typer.Option(None, "--scales", metavar="S[,S...]", help=SCALES_HELP + " \\[default: 1.0]",
                             show_default=False)
IOF_OPTION = typer.Option(None, "--iof-thr", help=IOF_HELP + " \\[default: 0.7]", show_default=False)
PARTIAL_OPTION = typer.Option(None, "--partial", help=PARTIAL_HELP + " \\[default: drop]", show_default=False)
WORKERS_OPTION = typer.Option(1, "--workers", "-j", help=WORKERS_HELP)
PRESET_OPTION = typer.Option("retina-dior", "--preset", "-p", help=PRESET_SIZE_HELP)
# How the pixels are read: every converter records it in the prepared JSON (`info.sample`).
SCALING_OPTION = typer.Option("auto", "--scaling", metavar="MODE", help=SCALING_HELP,
                              show_default=False)
BAND_NAMES_OPTION = typer.Option(None, "--band-names", metavar="NAME[,NAME...]", help=BAND_NAMES_HELP,
                                 show_default=False)
BOXES_OPTION = typer.Option("hbb", "--boxes", metavar="hbb|obb", help=BOXES_HELP)
HORIZONTAL_BOXES_OPTION = typer.Option("hbb", "--boxes", metavar="hbb",
                                       help=f"hbb only: this format has horizontal boxes (obb: {ORIENTED_FORMATS})")


def horizontal_only(boxes: str, command: str, why: str = "its labels are horizontal boxes") -> None:
    """`--boxes` of a format without oriented boxes: hbb, or a one-line InputError saying which formats have them."""
    from ds2d2_cli.data.coco_writer import check_boxes

    if check_boxes(boxes) == "obb":
        raise InputError(f"prepare-data {command} cannot write --boxes obb: {why}; oriented boxes come from "
                         f"{ORIENTED_FORMATS}")


def sample_options(scaling: str, band_names: Optional[str]) -> dict[str, Any]:
    """`--scaling` and `--band-names`, checked before any work: keyword arguments for the converters."""
    from ds2d2_cli.data.prepared import sample_choice

    names = None if band_names is None else band_names.split(",")
    scaling, checked = sample_choice(scaling, names)
    return {"scaling": scaling, "band_names": checked}


def tiling_options(split: Optional[int], gap: Optional[int], scales: Optional[List[str]], iof_thr: Optional[float],
                   partial: Optional[str]) -> "Tiling | None":
    """`--split SIZE` and its companions -> a Tiling; None (images stay whole) without --split.

    A companion option given without --split would change nothing: it is refused, not dropped.
    """
    from ds2d2_cli.data.tiling import Tiling

    if split is None:
        given = [name for name, value in (("--gap", gap), ("--scales", scales), ("--iof-thr", iof_thr),
                                          ("--partial", partial)) if value]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise InputError(f"{', '.join(given)} only {verb} when cutting scenes into patches: add --split SIZE")
        return None
    defaults = Tiling()
    return Tiling(split, defaults.gap if gap is None else gap, tuple(_parse_scales(scales or [])),
                  defaults.iof_thr if iof_thr is None else iof_thr, partial or defaults.partial).check()


def class_option(value: Optional[str]) -> "ClassChoice | None":
    """`--classes`: a shipped set's name or the user's own list (`car,truck` / `[car,truck]`)."""
    from ds2d2_cli.classes import class_choice

    return None if value is None else class_choice(value)


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _default_dota_out(src: Path, split: int) -> Path:
    base = src.parent if (src / "images").is_dir() else src
    base = Path(str(base).rstrip("/\\") or ".")
    return base.with_name(f"{base.name}-{split}") if base.name else Path(f"data-{split}")


def _problem_table(problems: ProblemReport) -> Table | None:
    """Counts of what was left out or repaired, by problem (None when the input was clean)."""
    tally: dict[tuple[str, str], int] = {}
    for entry in [*problems.skipped, *problems.repaired]:
        key = (entry["reason"], entry["action"])
        tally[key] = tally.get(key, 0) + 1
    if not tally:
        return None
    table = Table(title="bad input (--json lists each item)")
    table.add_column("problem")
    table.add_column("action")
    table.add_column("count", justify="right")
    for (reason, action), n in sorted(tally.items(), key=lambda kv: (kv[0][1] == "repaired", -kv[1], kv[0])):
        table.add_row(reason, action, str(n))
    return table


def _nonzero_class_table(title: str, columns: dict[str, dict[str, int]]) -> Table | None:
    names = [n for n in next(iter(columns.values()), {}) if any(col.get(n, 0) for col in columns.values())]
    if not names:
        return None
    table = Table(title=title)
    table.add_column("class")
    for header in columns:
        table.add_column(header, justify="right")
    for n in names:
        table.add_row(n, *(str(col.get(n, 0)) for col in columns.values()))
    return table


def _console(json_out: Optional[Path]) -> Console:
    """Tables on stdout, unless `--json -` reserves stdout for the JSON alone."""
    if json_out is not None and str(json_out) == "-":
        return Console(quiet=True)
    return stdout_console()


def _finish(console: Any, summary: PrepareSummary, per_class: dict[str, dict[str, int]], json_out: Optional[Path],
            done: str | None = None) -> None:
    """What every converter prints last: objects per class, the bad-input table, a closing line; then --json."""
    for table in (_nonzero_class_table("objects per class", per_class) if per_class else None,
                  _problem_table(summary.problems)):
        if table is not None:
            console.print(table)
    if done is not None:
        console.print(done)
    write_json_output(json_out, summary.to_dict())


def prepared_table(summary: "PreparedSummary", title: str) -> Table:
    """One table for every converter, from its summary: per split, images (and patches) and objects."""
    tiled = summary.tiling is not None
    columns = ["split", "images", "objects", "clipped", "dropped degenerate"]
    oriented = summary.boxes == "obb"
    if tiled:
        columns[2:2] = ["patches"]
        columns += ["patch boxes", "crowd kept", "dropped iof<thr"] + (["dropped shape"] if oriented else [])
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, s in summary.splits.items():
        row = [name, str(s.images), str(s.objects) if s.labelled else "-", str(s.clipped), str(s.degenerate)]
        if tiled:
            row[2:2] = [str(s.patches)]
            row += [str(s.annotations), str(s.crowd), str(s.dropped_iof)]
            if oriented:
                row.append(str(s.dropped_shape))
        table.add_row(*row)
    return table


def _tiling_title(summary: "PreparedSummary") -> str:
    t = summary.tiling
    boxes = ", rotated boxes le90" if summary.boxes == "obb" else ""
    if t is None:
        return f"whole images{boxes}"
    return f"{t['patch_size']} px, gap {t['gap']}, scales {', '.join(f'{s:g}' for s in t['scales'])}{boxes}"


def preset_input(preset: str) -> tuple[str, int]:
    """(preset, its input size) for the whole-image size check; read before any work, so a typo fails at once."""
    from ds2d2_cli.config import load_config

    return preset, load_config(preset).input.size


def finish_prepared(json_out: Optional[Path], summary: "PreparedSummary", title: str,
                    size_check: Optional[tuple[str, int]] = None) -> None:
    """What every converter prints: its table, objects per class, bad input, a closing line; then --json.

    With `size_check` (`preset_input`), whole images far larger than that preset's input are warned about.
    """
    from ds2d2_cli.data.prepared import whole_image_warning

    console = _console(json_out)
    warning = whole_image_warning(summary, size_check[1], size_check[0]) if size_check else None
    if warning:
        stderr_console().print(f"[yellow]warning:[/] {warning}", soft_wrap=True, markup=True, highlight=False)
    console.print(prepared_table(summary, f"{title} -> {summary.out} ({_tiling_title(summary)})"))
    columns: dict[str, dict[str, int]] = {}
    for name, s in summary.splits.items():
        if s.labelled:
            columns[f"{name} objects"] = s.objects_per_class
            if s.annotations_per_class is not None:
                columns[f"{name} patch boxes"] = s.annotations_per_class
    if summary.filtered:
        console.print(f"left out, not in --classes: {', '.join(f'{n} ({c})' for n, c in summary.filtered.items())}")
    _finish(console, summary, columns, json_out,
            f"done in {summary.seconds:.1f} s; wrote {', '.join(s.json for s in summary.splits.values())}")


@app.command("dota")
@handle_errors
def dota_command(
    src: Path = typer.Argument(Path("data/DOTA"), help="a DOTA split folder (images/, labelTxt/) or a folder of them "
                               "(train/, val/, test/)", show_default=True),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder",
                                       show_default="SRC-<split>, i.e. data/DOTA-1024 for the defaults"),
    split: int = typer.Option(1024, "--split", help="patch (window) size in pixels"),
    gap: int = typer.Option(200, "--gap", help=GAP_HELP),
    scales: List[str] = typer.Option(["1.0"], "--scales", metavar="S[,S...]", help=SCALES_HELP),
    iof_thr: float = typer.Option(0.7, "--iof-thr", help=IOF_HELP),
    workers: int = typer.Option(1, "--workers", "-j", help=WORKERS_HELP),
    classes: str = typer.Option("dota-v1.0", "--classes", help=CLASSES_HELP),
    partial: str = typer.Option("drop", "--partial", help=PARTIAL_HELP),
    boxes: str = BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Cut DOTA scenes into overlapping patches with COCO JSON, as the DOTA devkit's ImgSplit does.

    Windows step by split - gap; the last one in each direction is moved back to end at
    the scene border. Scenes smaller than a window give one patch, padded with black to
    the full window size (every patch is split x split). Every patch is kept, empty ones
    too. Objects cut by a window are clipped to it and kept when their inside fraction
    (iof) reaches --iof-thr. --boxes obb adds each object's rotated box (rbox, le90) and
    outlines cut objects as the devkit writes them (4 corners; pieces of fewer than 4 or
    more than 5 corners are left out, as the devkit leaves them out).

    Writes OUT/<split>/images/*.png, OUT/<split>.json (patches) and
    OUT/<split>_scenes.json (whole scenes, for evaluating merged detections).
    Scenes other than 8-bit RGB (multispectral, 16-bit, SAR GeoTIFF) give GeoTIFF
    patches (*.tif) with every band in its own type and each window's georeferencing;
    every JSON records the bands and how they are scaled (--scaling) in info.sample.
    A split without labelTxt/ (DOTA test) gets image-only JSON.

    Bad input (a label line that does not parse, an unknown class, an image without
    label file or the reverse, an unreadable image ...) stops the run with one line
    naming the file and line, and nothing is written; --skip-bad skips and reports it.

    Example: ds2d2 prepare-data dota data/DOTA --split 1024 --gap 200 --scales 1.0,0.5 -j 8
    """
    from ds2d2_cli.data.dota import prepare_dota

    if not src.exists() and _looks_like_number(str(src)):
        raise InputError(f"source folder {str(src)!r} not found; to give several scales write --scales 1.0,0.5")
    out = out if out is not None else _default_dota_out(src, split)
    sample = sample_options(scaling, band_names)
    summary = prepare_dota(src, out, size=split, gap=gap, scales=_parse_scales(scales), iof_thr=iof_thr,
                           workers=workers, classes=classes, partial=partial, skip_bad=skip_bad,
                           reporter=RichReporter(), boxes=boxes, **sample)
    finish_prepared(json_out, summary, "DOTA")


@app.command("dior")
@handle_errors
def dior_command(
    root: Path = typer.Argument(Path("data/DIOR"), help="DIOR folder (Annotations/, ImageSets/Main/, JPEGImages-*/)"),
    out: Path = typer.Option(Path("data/DIOR-coco"), "--out", "-o", help="output folder"),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    classes: Optional[str] = typer.Option(None, "--classes", help="a list of DIOR classes to keep, in this order "
                                          "(vehicle,ship): the others are left out \\[default: the 20 DIOR classes]"),
    preset: str = PRESET_OPTION,
    boxes: str = HORIZONTAL_BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Convert DIOR's VOC XML (horizontal boxes) into train/val/trainval/test COCO JSON.

    Images are not copied: file_name points at them relative to OUT; with --split SIZE
    they are cut into patches as prepare-data dota does. Each XML's <size> is checked
    against its image; boxes become COCO x, y, width, height (xmin, ymin, xmax - xmin,
    ymax - ymin). Bad input stops the run with one line naming the file (nothing is
    written); --skip-bad skips and reports it.

    Example: ds2d2 prepare-data dior data/DIOR --out data/DIOR-800 --split 800 --gap 200
    """
    from ds2d2_cli.data.dior import prepare_dior

    horizontal_only(boxes, "dior", "DIOR's labels are horizontal boxes (DIOR-R's oriented ones are another release)")
    size_check = preset_input(preset)
    tiling = tiling_options(split, gap, scales, iof_thr, partial)
    summary = prepare_dior(root, out, classes=class_option(classes), tiling=tiling, workers=workers,
                           skip_bad=skip_bad, reporter=RichReporter(), **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, "DIOR", size_check)


@app.command("coco")
@handle_errors
def coco_command(
    annotations: Path = typer.Argument(..., help="COCO detection JSON (images, annotations, categories)"),
    images: Path = typer.Option(..., "--images", help="folder the JSON's file_name entries are relative to"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    name: Optional[str] = typer.Option(None, "--name", help="split name: writes OUT/NAME.json "
                                       "\\[default: the annotation file's stem]"),
    classes: Optional[str] = typer.Option(None, "--classes", help=OWN_CLASSES_HELP.replace(
        "the data's own classes", "the file's own, by original id")),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    preset: str = PRESET_OPTION,
    boxes: str = HORIZONTAL_BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP.replace("label files, lines and objects",
                                                                                  "image entries and annotations")),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Validate a COCO detection file and write it with category ids 1..K; --split cuts large images.

    Checks ids, image files and sizes, and boxes (small overflows are clipped, boxes
    with no area dropped and reported). Without --split images are not copied: file_name
    points at them relative to OUT. With --split SIZE they are cut into patches as
    prepare-data dota cuts scenes (OUT/NAME/images/, OUT/NAME.json, OUT/NAME_scenes.json).
    A bad entry stops the run with one line naming the file and the id (nothing is
    written); --skip-bad skips and reports it.

    Example: ds2d2 prepare-data coco trees.json --images imgs --out data/trees --name train --split 512 --gap 128
    """
    from ds2d2_cli.data.coco import ingest_coco

    horizontal_only(boxes, "coco", "a COCO bbox is horizontal, and the minimum-area rectangle of an instance "
                    "outline is no oriented label")
    size_check = preset_input(preset)
    summary = ingest_coco(annotations, images, out, name=name, classes=class_option(classes), skip_bad=skip_bad,
                          tiling=tiling_options(split, gap, scales, iof_thr, partial), workers=workers,
                          reporter=RichReporter(), **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, "COCO", size_check)


@app.command("synthetic")
@handle_errors
def synthetic_command(
    out: Path = typer.Option(Path("data/synthetic"), "--out", "-o", help="output folder (DOTA layout)"),
    images: int = typer.Option(24, "--images", help="number of scenes"),
    size: int = typer.Option(640, "--size", help="scene width and height in pixels"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same scenes)"),
    bands: str = typer.Option("rgb", "--bands", help="rgb: 8-bit PNG; rgbn: 12-bit red, green, blue, nir in uint16 "
                              "GeoTIFF; sar: float32 GeoTIFF, VV backscatter with speckle (same scenes and labels)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Generate small synthetic DOTA-like scenes (train/ and val/) for smoke tests and demos.

    Then cut them into patches for the tiny-synthetic preset:
    ds2d2 prepare-data dota data/synthetic --split 128 --gap 32 --classes synthetic

    --bands rgbn or sar writes the same scenes and label files with P0000.tif images
    instead: near-infrared (vegetation bright, water dark, paint dark, so green-painted
    vehicles stand out from trees) or SAR (dark water, bright metal, speckle).
    """
    from ds2d2_cli.data.synthetic import generate_synthetic

    summary: dict[str, Any] = generate_synthetic(out, images=images, size=size, seed=seed, reporter=RichReporter(),
                                                 bands=bands)
    console = _console(json_out)
    table = Table(title=f"synthetic scenes -> {out}")
    table.add_column("split")
    table.add_column("scenes", justify="right")
    table.add_column("objects", justify="right")
    for name, s in summary.items():
        if isinstance(s, dict) and "images" in s:
            objects = s.get("objects", {})
            total = sum(objects.values()) if isinstance(objects, dict) else objects
            table.add_row(name, str(s["images"]), str(total))
    console.print(table)
    console.print(f"next (the tiny-synthetic preset's patches): "
                  f"ds2d2 prepare-data dota {out} --split 128 --gap 32 --classes synthetic", soft_wrap=True)
    write_json_output(json_out, summary)


@app.command("hrsc2016")
@handle_errors
def hrsc2016_command(
    root: Path = typer.Argument(..., help="HRSC2016 folder (FullDataSet/AllImages/, FullDataSet/Annotations/, "
                                "ImageSets/trainval.txt, test.txt)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    task: str = typer.Option("ship", "--task", help="ship: one class (HRSC2016 level 1); class: Class_ID through "
                             "the 31-name level-3 table"),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    preset: str = PRESET_OPTION,
    classes: Optional[str] = typer.Option(None, "--classes", help=OWN_CLASSES_HELP),
    boxes: str = BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP.replace("label files, lines",
                                                                                  "annotation files, list entries")),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Convert HRSC2016 (ships, rotated boxes in XML) into COCO JSON, one file per ImageSets list.

    Writes OUT/<list>.json for each of ImageSets/train, val, trainval, test.txt that exists
    (MMRotate trains on trainval and tests on test: --set data.train_split=trainval
    --set data.eval_split=test). Each rotated box (mbox_cx, mbox_cy, mbox_w, mbox_h,
    mbox_ang in radians) is kept as its four corners in segmentation, with their envelope
    as bbox; --boxes obb adds it as rbox (le90). Images stay whole unless --split cuts them
    into patches.

    Bad input (a missing image or annotation, a field that is not a number, an unknown
    Class_ID, an object outside its image, a truncated image, malformed XML) stops the
    run with one line naming the file and line, and nothing is written; --skip-bad skips
    and reports it.

    Example: ds2d2 prepare-data hrsc2016 data/HRSC2016 --out data/hrsc-ship --task ship
    """
    from ds2d2_cli.data.hrsc import TASKS, prepare_hrsc2016

    if task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    size_check = preset_input(preset)
    summary = prepare_hrsc2016(root, out, task=task, classes=class_option(classes),
                               tiling=tiling_options(split, gap, scales, iof_thr, partial), workers=workers,
                               skip_bad=skip_bad, reporter=RichReporter(), boxes=boxes,
                               **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, f"HRSC2016 ({task} task)", size_check)


@app.command("ucas-aod")
@handle_errors
def ucas_aod_command(
    root: Path = typer.Argument(..., help="UCAS-AOD folder (CAR/, PLANE/, Neg/: each image beside its .txt labels)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="share of each folder's images that goes to val "
                                       "(UCAS-AOD has no official split)"),
    seed: int = typer.Option(0, "--seed", help="which images go to val: the same seed gives the same split"),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    preset: str = PRESET_OPTION,
    classes: Optional[str] = typer.Option(None, "--classes", help=OWN_CLASSES_HELP),
    boxes: str = BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Convert UCAS-AOD (cars and airplanes, rotated boxes) into train and val COCO JSON.

    Classes car (CAR/) and airplane (PLANE/); Neg/ images have no objects. Image numbers
    restart in each folder, so scenes are named FOLDER_STEM (CAR_P0001, PLANE_P0001,
    Neg_N0001). There is no official split: --val-fraction of each folder's images go to
    val, chosen by --seed alone (stratified by folder, the same on every machine). Each
    label line's polygon (x1 y1 ... x4 y4) is kept in segmentation, with its envelope as
    bbox; --boxes obb adds its minimum-area rectangle as rbox (le90). Images stay whole
    unless --split cuts them into patches.

    Bad input (a line without 13 numbers, a number that does not parse, an image without
    its label file, an object outside its image, a truncated image) stops the run with one
    line naming the file and line, and nothing is written; --skip-bad skips and reports it.

    Example: ds2d2 prepare-data ucas-aod data/UCAS_AOD --out data/ucas --val-fraction 0.2 --seed 0
    """
    from ds2d2_cli.data.ucas import prepare_ucas_aod

    size_check = preset_input(preset)
    summary = prepare_ucas_aod(root, out, val_fraction=val_fraction, seed=seed, classes=class_option(classes),
                               tiling=tiling_options(split, gap, scales, iof_thr, partial), workers=workers,
                               skip_bad=skip_bad, reporter=RichReporter(), boxes=boxes,
                               **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, f"UCAS-AOD (val {val_fraction:g}, seed {seed})", size_check)


@app.command("voc")
@handle_errors
def voc_command(
    root: Path = typer.Argument(..., help="split folders (train/, val/ ...) of NAME.xml beside NAME.jpg, as LabelImg "
                                "saves them, or a VOC folder (Annotations/, JPEGImages/, ImageSets/Main/)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    classes: Optional[str] = typer.Option(None, "--classes", help=OWN_CLASSES_HELP),
    preset: str = PRESET_OPTION,
    boxes: str = HORIZONTAL_BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP.replace("label files, lines",
                                                                                  "XML files")),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Convert Pascal VOC XML (LabelImg, CVAT, Label Studio, the VOC devkit) into COCO JSON per split.

    Without --split images stay whole (file_name points at them relative to OUT); with
    --split SIZE they are cut into patches as prepare-data dota does. Class names are
    taken as the XMLs write them (all of them, sorted, unless --classes). An image
    without an XML beside it has no objects (LabelImg saves none for an unlabelled
    image). <difficult> is kept; boxes (xmin, ymin, xmax, ymax, taken as given) reaching
    past the image are clipped and counted; a missing or 0 <size> is read from the image.

    Bad input (an XML without its image, malformed XML, a bad number, an unknown class
    under a class set, a box outside its image, an unreadable image ...) stops the run
    with one line naming the file and object, and nothing is written; --skip-bad skips
    and reports it.

    Example: ds2d2 prepare-data voc my/labels --out prepared --split 1024 --gap 200
    """
    from ds2d2_cli.data.voc import prepare_voc

    horizontal_only(boxes, "voc")
    size_check = preset_input(preset)
    tiling = tiling_options(split, gap, scales, iof_thr, partial)
    summary = prepare_voc(root, out, classes=class_option(classes), tiling=tiling, workers=workers,
                          skip_bad=skip_bad, reporter=RichReporter(), **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, "VOC", size_check)


@app.command("yolo")
@handle_errors
def yolo_command(
    data_yaml: Path = typer.Argument(..., metavar="DATA.yaml", help="the dataset's YAML, as Ultralytics reads it "
                                     "(path, train, val, test, names)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    classes: Optional[str] = typer.Option(None, "--classes", help=OWN_CLASSES_HELP.replace(
        "the data's own classes", "data.yaml's names, in id order")),
    split: Optional[int] = SPLIT_OPTION,
    gap: Optional[int] = GAP_OPTION,
    scales: Optional[List[str]] = SCALES_OPTION,
    iof_thr: Optional[float] = IOF_OPTION,
    partial: Optional[str] = PARTIAL_OPTION,
    workers: int = WORKERS_OPTION,
    preset: str = PRESET_OPTION,
    boxes: str = BOXES_OPTION,
    scaling: str = SCALING_OPTION,
    band_names: Optional[str] = BAND_NAMES_OPTION,
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Convert a YOLO txt dataset (the Ultralytics layout) into COCO JSON; --split cuts large images.

    Reads DATA.yaml as Ultralytics does: train, val (and test) are folders of images, .txt
    lists of images or lists of those, relative to `path` (default: the YAML's folder);
    names is a list or a map 0: name .... Each image's labels are the file with its last
    /images/ replaced by /labels/ and its suffix by .txt: one `class x_center y_center
    width height` line per object, normalised to 0..1, or polygon lines (YOLO-OBB,
    segmentation), kept as `segmentation` with their envelope as the box; --boxes obb
    (YOLO-OBB labels only) adds each one's rotated box as rbox (le90). An image without
    a label file has no objects.

    Without --split images are not copied: OUT/<split>.json points at them. With --split
    SIZE they are cut as prepare-data dota cuts scenes (OUT/<split>/images/,
    OUT/<split>.json, OUT/<split>_scenes.json). A bad line or image stops the run with one
    line naming the file and line (nothing is written); --skip-bad skips and reports it.

    Example: ds2d2 prepare-data yolo trees/data.yaml --out data/trees --split 512 --gap 128
    """
    from ds2d2_cli.data.yolo import prepare_yolo

    size_check = preset_input(preset)
    summary = prepare_yolo(data_yaml, out, classes=class_option(classes),
                           tiling=tiling_options(split, gap, scales, iof_thr, partial), workers=workers,
                           skip_bad=skip_bad, reporter=RichReporter(), boxes=boxes,
                           **sample_options(scaling, band_names))
    finish_prepared(json_out, summary, "YOLO", size_check)
