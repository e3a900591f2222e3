"""Your own data, end to end: two custom classes in large scenes, labelled as VOC XML, YOLO txt or COCO.

Each format's folder is written here as its labelling tools write it; then every stage runs
from the CLI: prepare-data (cut with --split), train-teacher, train-amplifier, distill,
eval --merge-patches, predict on a whole scene, export --verify. The checkpoints must carry
the data's own class names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image, ImageDraw
from safetensors import safe_open
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app

from conftest import TINY
from test_prepare_cli import _sample  # the real DOTA sample, or a skip

runner = CliRunner()
CLASSES = ("tree", "car")  # in the order the labelling tool numbers them
SCENE = (300, 260)  # larger than the 128 px input: needs --split
COLOURS = {"tree": (40, 160, 60), "car": (200, 40, 40)}


def _scenes(seed: int = 0) -> dict[str, list[tuple[str, Image.Image, list[tuple[str, float, float, float, float]]]]]:
    """{split: [(stem, image, [(class, x0, y0, x1, y1)])]}: rectangles of each class on grey ground."""
    rng = random.Random(seed)
    out: dict[str, list] = {}
    for split, count in (("train", 2), ("val", 1)):
        out[split] = []
        for i in range(count):
            image = Image.new("RGB", SCENE, (110, 110, 100))
            draw = ImageDraw.Draw(image)
            objects = []
            for _ in range(10):
                name = rng.choice(CLASSES)
                w, h = rng.randint(14, 30), rng.randint(14, 30)
                x0, y0 = rng.randint(0, SCENE[0] - w - 1), rng.randint(0, SCENE[1] - h - 1)
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=COLOURS[name])
                objects.append((name, float(x0), float(y0), float(x0 + w), float(y0 + h)))
            out[split].append((f"{split}_{i:03d}", image, objects))
    return out


def write_voc(root: Path) -> list[str]:
    """LabelImg's layout: one folder per split, each XML beside its image."""
    for split, items in _scenes().items():
        folder = root / split
        folder.mkdir(parents=True)
        for stem, image, objects in items:
            image.save(folder / f"{stem}.png")
            boxes = "".join(
                f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
                f"<bndbox><xmin>{x0:g}</xmin><ymin>{y0:g}</ymin><xmax>{x1:g}</xmax><ymax>{y1:g}</ymax></bndbox>"
                "</object>" for n, x0, y0, x1, y1 in objects)
            (folder / f"{stem}.xml").write_text(
                f"<annotation><folder>{split}</folder><filename>{stem}.png</filename>"
                f"<size><width>{SCENE[0]}</width><height>{SCENE[1]}</height><depth>3</depth></size>"
                f"<segmented>0</segmented>{boxes}</annotation>", encoding="utf-8")
    return ["prepare-data", "voc", str(root)]


def write_yolo(root: Path) -> list[str]:
    """Ultralytics' layout: data.yaml, images/<split>/, labels/<split>/, normalised `class cx cy w h`."""
    w_img, h_img = SCENE
    for split, items in _scenes().items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem, image, objects in items:
            image.save(root / "images" / split / f"{stem}.png")
            lines = [f"{CLASSES.index(n)} {(x0 + x1) / 2 / w_img!r} {(y0 + y1) / 2 / h_img!r} "
                     f"{(x1 - x0) / w_img!r} {(y1 - y0) / h_img!r}" for n, x0, y0, x1, y1 in objects]
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                                    + "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES)), encoding="utf-8")
    return ["prepare-data", "yolo", str(root / "data.yaml")]


def write_coco(root: Path) -> list[list[str]]:
    """A labelling tool's export: one COCO JSON per split over one image folder."""
    (root / "imgs").mkdir(parents=True)
    commands = []
    for split, items in _scenes().items():
        doc = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
        for stem, image, objects in items:
            image.save(root / "imgs" / f"{stem}.png")
            image_id = len(doc["images"]) + 1
            doc["images"].append({"id": image_id, "file_name": f"{stem}.png", "width": SCENE[0], "height": SCENE[1]})
            for n, x0, y0, x1, y1 in objects:
                doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                           "category_id": CLASSES.index(n) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                           "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        (root / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")
        commands.append(["prepare-data", "coco", str(root / f"{split}.json"), "--images", str(root / "imgs"),
                         "--name", split])
    return commands


def _run(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def stage_options(data: Path, preset: str = "tiny-synthetic") -> list:
    """What every training stage of these runs is given: `preset` on `data`, tiny, 2 iterations, CPU."""
    return ["--preset", preset, "--data", data, "--max-iters", "2", "--device", "cpu",
            *_sets([*TINY, "data.classes=auto"])]


def train_every_stage(data: Path, runs: Path, preset: str = "tiny-synthetic",
                      extra: Sequence[str] = ()) -> tuple[Path, Path]:
    """train-teacher, train-amplifier and distill (DS2D2) on `data` (`stage_options`, then `extra`);
    teacher and student."""
    common = [*stage_options(data, preset), *extra]
    _run(["train-teacher", *common, "--out", runs / "teacher"])
    teacher = runs / "teacher" / "model.safetensors"
    _run(["train-amplifier", *common, "--teacher", teacher, "--out", runs / "amplifier"])
    _run(["distill", *common, "--teacher", teacher, "--amplifier", runs / "amplifier" / "model.safetensors",
          "--out", runs / "student"])
    return teacher, runs / "student" / "model.safetensors"


# The order each format gives its classes: VOC has no class list (sorted names), YOLO and COCO number them.
EXPECTED = {"voc": ["car", "tree"], "yolo": list(CLASSES), "coco": list(CLASSES)}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_own_data_every_stage(tmp_path, fmt):
    src, data, runs = tmp_path / "src", tmp_path / "data", tmp_path / "runs"
    cut = ["--out", data, "--split", "128", "--gap", "32"]
    if fmt == "coco":
        for command in write_coco(src):
            _run([*command, *cut])
    else:
        _run([*(write_voc(src) if fmt == "voc" else write_yolo(src)), *cut])
    prepared = json.loads((data / "train.json").read_text())
    assert [c["name"] for c in prepared["categories"]] == EXPECTED[fmt]
    assert len(prepared["images"]) == 2 * 9  # 300 x 260 in 128 px windows stepping 96: 3 x 3 per scene
    assert (data / "val_scenes.json").is_file()

    teacher, student = train_every_stage(data, runs)
    for model in (teacher, student):
        with safe_open(str(model), framework="pt") as fh:
            assert json.loads(fh.metadata()["classes"]) == EXPECTED[fmt]
    stored = json.loads((runs / "student" / "config.json").read_text())
    assert stored["data"]["classes"] == EXPECTED[fmt]  # `auto`, resolved

    metrics = json.loads(_run(["eval", student, "--merge-patches", "--device", "cpu", "--json", "-"]))
    assert metrics["merged_patches"] is True and set(metrics["per_class"]) == set(EXPECTED[fmt])

    scene = next((src / "imgs").glob("val_*.png")) if fmt == "coco" else \
        next(src.rglob("val_000.png"))
    _run(["predict", student, scene, "--out", runs / "predict", "--slice", "128", "--device", "cpu"])
    rows = json.loads((runs / "predict" / "predictions.json").read_text())
    images = json.loads((runs / "predict" / "images.json").read_text())
    assert images["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(EXPECTED[fmt])]
    assert all(0 <= r["bbox"][0] <= SCENE[0] for r in rows)

    summary = json.loads(_run(["export", student, "--verify", "--json", "-"]))
    assert summary["classes"] == EXPECTED[fmt] and summary["verify"]


# --------------------------------------------------------------------------- one tiling, three doors


def _dota_objects(label: Path) -> list[tuple[list[float], str, int]]:
    rows = []
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 9 and not line.startswith(("imagesource", "gsd")):
            rows.append(([float(v) for v in parts[:8]], parts[8], int(parts[9]) if len(parts) > 9 else 0))
    return rows


def _envelope(poly: list[float]) -> tuple[float, float, float, float]:
    return min(poly[0::2]), min(poly[1::2]), max(poly[0::2]), max(poly[1::2])


def _patch_boxes(folder: Path) -> dict[str, list[tuple[int, list[float]]]]:
    """{patch file name: [(category, bbox)]}: what a prepared split says each window holds."""
    doc = json.loads((folder / "train.json").read_text())
    names = {img["id"]: Path(img["file_name"]).name for img in doc["images"]}
    boxes: dict[str, list] = {name: [] for name in names.values()}
    for ann in doc["annotations"]:
        boxes[names[ann["image_id"]]].append((ann["category_id"], ann["bbox"]))
    return boxes


def _same_boxes(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)  # the same windows
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for (ca, ba), (cb, bb) in zip(a[name], b[name]):
            assert ca == cb and max(abs(x - y) for x, y in zip(ba, bb)) <= 0.01, (name, ba, bb)


def test_one_tiling_three_doors(tmp_path):
    """The real DOTA sample written as YOLO (polygons) and as VOC (envelopes) cuts into the same
    windows and boxes as `prepare-data dota` (to 0.01 px)."""
    from ds2d2_cli.classes import DOTA_V1_0

    sample = _sample()
    cut = ["--split", "1024", "--gap", "200", "--classes", "dota-v1.0"]
    _run(["prepare-data", "dota", sample, "--out", tmp_path / "dota", *cut])

    yolo, voc, boxes = tmp_path / "yolo", tmp_path / "voc" / "train", tmp_path / "dota-envelopes" / "train"
    for folder in (yolo / "images" / "train", yolo / "labels" / "train", voc, boxes / "images", boxes / "labelTxt"):
        folder.mkdir(parents=True)
    for image in sorted((sample / "train" / "images").glob("*.png")):
        width, height = Image.open(image).size
        objects = _dota_objects(sample / "train" / "labelTxt" / f"{image.stem}.txt")
        for target in (yolo / "images" / "train", voc, boxes / "images"):
            (target / image.name).symlink_to(image)
        (yolo / "labels" / "train" / f"{image.stem}.txt").write_text("".join(
            f"{DOTA_V1_0.index(name)} " + " ".join(repr(v / (width if i % 2 == 0 else height))
                                                   for i, v in enumerate(poly)) + "\n"
            for poly, name, _ in objects))
        xml = "".join(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0:g}</xmin>"
                      f"<ymin>{y0:g}</ymin><xmax>{x1:g}</xmax><ymax>{y1:g}</ymax></bndbox></object>"
                      for poly, name, difficult in objects for x0, y0, x1, y1 in [_envelope(poly)])
        (voc / f"{image.stem}.xml").write_text(f"<annotation><filename>{image.name}</filename><size><width>{width}"
                                               f"</width><height>{height}</height><depth>3</depth></size>{xml}"
                                               "</annotation>")
        (boxes / "labelTxt" / f"{image.stem}.txt").write_text("imagesource:GoogleEarth\n" + "".join(
            f"{x0:g} {y0:g} {x1:g} {y0:g} {x1:g} {y1:g} {x0:g} {y1:g} {name} {difficult}\n"
            for poly, name, difficult in objects for x0, y0, x1, y1 in [_envelope(poly)]))
    (yolo / "data.yaml").write_text(f"path: {yolo}\ntrain: images/train\nnames: {list(DOTA_V1_0)}\n")
    _run(["prepare-data", "yolo", yolo / "data.yaml", "--out", tmp_path / "from-yolo", *cut])
    _run(["prepare-data", "voc", tmp_path / "voc", "--out", tmp_path / "from-voc", *cut])
    _run(["prepare-data", "dota", boxes.parent, "--out", tmp_path / "dota-boxes", *cut])

    dota = _patch_boxes(tmp_path / "dota")
    assert sum(len(v) for v in dota.values()) > 500  # P0706's dense marina
    _same_boxes(_patch_boxes(tmp_path / "from-yolo"), dota)  # polygons kept: exactly DOTA's cut
    _same_boxes(_patch_boxes(tmp_path / "from-voc"), _patch_boxes(tmp_path / "dota-boxes"))  # boxes: the same rule


# --------------------------------------------------------------------------- COCO cut into patches


def test_coco_split_cuts_like_dota_and_keeps_scene_offsets(tmp_path):
    from pycocotools.coco import COCO

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (300, 200)).save(tmp_path / "imgs" / "scene.png")
    doc = {"images": [{"id": 4, "file_name": "scene.png", "width": 300, "height": 200}],
           "categories": [{"id": 1, "name": "Tree"}, {"id": 2, "name": "Car"}],
           "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [10, 10, 20, 20]},
                           {"id": 2, "image_id": 4, "category_id": 2, "bbox": [120, 50, 20, 10]},  # across x = 128
                           {"id": 3, "image_id": 4, "category_id": 2, "bbox": [250, 150, 10, 10]}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    summary = json.loads(_run(["prepare-data", "coco", tmp_path / "t.json", "--images", tmp_path / "imgs", "--out", out,
                               "--name", "train", "--split", "128", "--gap", "32", "--classes", "[car, tree]",
                               "--json", "-"]))
    assert summary["tiling"] == {"patch_size": 128, "gap": 32, "scales": [1.0], "iof_thr": 0.7, "partial": "drop",
                                 "padded": True}
    patches = json.loads((out / "train.json").read_text())
    assert [c["name"] for c in patches["categories"]] == ["car", "tree"]  # the list orders and renames
    # x windows 0, 96, 172 (the last moved back to end at 300); y windows 0, 72
    assert [tuple(i["window"]) for i in patches["images"]] == [(0, 0), (0, 72), (96, 0), (96, 72), (172, 0), (172, 72)]
    by_window = {tuple(i["window"]): [a["bbox"] for a in patches["annotations"] if a["image_id"] == i["id"]]
                 for i in patches["images"]}
    assert by_window[(0, 0)] == [[10.0, 10.0, 20.0, 20.0]]  # the car at x 120-140 is 8/20 inside: iof 0.4 < 0.7
    assert by_window[(96, 0)] == [[24.0, 50.0, 20.0, 10.0]]
    assert by_window[(172, 72)] == [[78.0, 78.0, 10.0, 10.0]]
    assert all("segmentation" not in a for a in patches["annotations"])  # boxes stay boxes
    scenes = json.loads((out / "train_scenes.json").read_text())
    assert [(i["file_name"].endswith("scene.png"), i["source_id"]) for i in scenes["images"]] == [(True, 4)]
    assert len(scenes["annotations"]) == 3
    COCO(str(out / "train.json"))
    assert (out / "train" / "images" / "scene__1__96___0.png").is_file()


def test_coco_list_filters_classes_and_whole_images_warn(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (600, 500)).save(tmp_path / "imgs" / "big.png")
    doc = {"images": [{"id": 1, "file_name": "big.png"}],
           "categories": [{"id": 1, "name": "tree"}, {"id": 2, "name": "person"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                           {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 5, 9]}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["prepare-data", "coco", str(tmp_path / "t.json"), "--images", str(tmp_path / "imgs"),
                                 "--out", str(tmp_path / "out"), "--classes", "tree", "--preset", "tiny-synthetic"])
    assert result.exit_code == 2 and "unknown class set 'tree'" in result.stderr  # one word is a set name
    result = runner.invoke(app, ["prepare-data", "coco", str(tmp_path / "t.json"), "--images", str(tmp_path / "imgs"),
                                 "--out", str(tmp_path / "out"), "--classes", "[tree]", "--preset", "tiny-synthetic"])
    assert result.exit_code == 0, result.output
    assert "left out, not in --classes: person (1)" in result.stdout
    assert ("warning: the median t image is 600 px on its longer side, more than 2x the 128 px input of preset "
            "tiny-synthetic") in " ".join(result.stderr.split())
    data = json.loads((tmp_path / "out" / "t.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["tree"] and len(data["annotations"]) == 1
    # --gap without --split would change nothing: refused
    result = runner.invoke(app, ["prepare-data", "coco", str(tmp_path / "t.json"), "--images", str(tmp_path / "imgs"),
                                 "--out", str(tmp_path / "out2"), "--gap", "10"])
    assert result.exit_code == 2 and "--gap only applies when cutting" in result.stderr
