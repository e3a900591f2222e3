"""`prepare-data yolo`: the Ultralytics layout read as Ultralytics reads it, onto the shared writer.

Pixel values are worked by hand: a 200 x 100 image, `0 0.5 0.5 0.2 0.4` is the box centred
at (100, 50), 40 x 40 px, so COCO [80, 30, 40, 40].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_input import _invoke, _nothing_written, _one_line, _truncate

from ds2d2_cli.data.dota import prepare_dota
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.yolo import label_path_for, prepare_yolo

W, H = 200, 100
NAMES = "names: [car, truck]\n"


def _png(path: Path, size=(W, H), noise: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, (90, 60, 30))
    image.save(path)


def make_yolo(root: Path, labels: dict[str, str | None], yaml: str = "train: images/train\nval: images/val\n" + NAMES,
              size=(W, H)) -> Path:
    """A dataset in the Ultralytics layout: `labels` maps "split/stem" to its label text (None: no label file)."""
    for key, text in labels.items():
        split, stem = key.split("/")
        _png(root / "images" / split / f"{stem}.png", size)
        if text is not None:
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text, encoding="utf-8")
    (root / "data.yaml").write_text(yaml, encoding="utf-8")
    return root / "data.yaml"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _anns(doc: dict) -> list[dict]:
    return [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in doc["annotations"]]


# --------------------------------------------------------------------------- reading


def test_label_path_is_ultralytics_rule():
    sep = os.sep
    assert label_path_for(f"{sep}d{sep}images{sep}train{sep}a.jpg") == f"{sep}d{sep}labels{sep}train{sep}a.txt"
    # only the last /images/ changes; without one, the label lies beside the image
    assert (label_path_for(f"{sep}images{sep}x{sep}images{sep}b.v2.png")
            == f"{sep}images{sep}x{sep}labels{sep}b.v2.txt")
    assert label_path_for(f"{sep}d{sep}train{sep}c.jpeg") == f"{sep}d{sep}train{sep}c.txt"


def test_box_line_gives_exact_pixels_names_as_list(tmp_path):
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.3\n",
                                       "val/b": "1 0.5 0.5 1 1\n"})
    summary = prepare_yolo(data, tmp_path / "out")
    train = _json(tmp_path / "out" / "train.json")
    assert train["categories"] == [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}]
    assert _anns(train) == [
        {"category_id": 1, "bbox": [80.0, 30.0, 40.0, 40.0], "area": 1600.0, "iscrowd": 0, "difficult": 0},
        # truck: centre (50, 75), 20 x 30 px
        {"category_id": 2, "bbox": [40.0, 60.0, 20.0, 30.0], "area": 600.0, "iscrowd": 0, "difficult": 0},
    ]
    (image,) = train["images"]
    assert (image["width"], image["height"]) == (W, H)
    assert (tmp_path / "out" / image["file_name"]).resolve() == (tmp_path / "ds/images/train/a.png").resolve()
    assert _anns(_json(tmp_path / "out" / "val.json"))[0]["bbox"] == [0.0, 0.0, 200.0, 100.0]
    info = train["info"]["ds2d2"]
    assert info["source"] == "yolo" and info["names"] == ["car", "truck"] and info["split"] == "train"
    assert summary.format == "yolo" and summary.splits["train"].objects == 2 and summary.tiling is None


def test_names_as_dict_map_ids(tmp_path):
    yaml = "train: images/train\nval: images/train\nnames:\n  1: truck\n  0: car\n  '2': bus\n"
    data = make_yolo(tmp_path / "ds", {"train/a": "2 0.5 0.5 0.2 0.4\n1 0.5 0.5 0.1 0.1\n"}, yaml)
    prepare_yolo(data, tmp_path / "out")
    doc = _json(tmp_path / "out" / "train.json")
    assert [c["name"] for c in doc["categories"]] == ["car", "truck", "bus"]
    assert [a["category_id"] for a in doc["annotations"]] == [3, 2]


def test_nc_without_names_gives_class_i(tmp_path):
    data = make_yolo(tmp_path / "ds", {"train/a": "1 0.5 0.5 0.2 0.4\n"},
                     "train: images/train\nval: images/train\nnc: 2\n")
    prepare_yolo(data, tmp_path / "out")
    assert [c["name"] for c in _json(tmp_path / "out" / "train.json")["categories"]] == ["class_0", "class_1"]


def test_obb_and_segment_lines_keep_their_polygon(tmp_path):
    # a diamond (YOLO-OBB, 4 corners) and a 5-point outline: polygons are kept, their envelope is the box
    obb = "0 0.25 0.1 0.4 0.5 0.25 0.9 0.1 0.5"  # (50,10) (80,50) (50,90) (20,50): diagonals 60 x 80
    seg = "1 0.5 0.2 0.7 0.2 0.8 0.5 0.6 0.8 0.5 0.5"  # (100,20) (140,20) (160,50) (120,80) (100,50)
    data = make_yolo(tmp_path / "ds", {"train/a": f"{obb}\n{seg}\n", "val/b": ""})
    prepare_yolo(data, tmp_path / "out")
    first, second = _anns(_json(tmp_path / "out" / "train.json"))
    assert first == {"category_id": 1, "bbox": [20.0, 10.0, 60.0, 80.0], "area": 2400.0, "iscrowd": 0,
                     "segmentation": [[50.0, 10.0, 80.0, 50.0, 50.0, 90.0, 20.0, 50.0]], "difficult": 0}
    assert second["bbox"] == [100.0, 20.0, 60.0, 60.0]
    assert second["segmentation"] == [[100.0, 20.0, 140.0, 20.0, 160.0, 50.0, 120.0, 80.0, 100.0, 50.0]]
    # shoelace: 0.5 * (-800 + 3800 + 6800 - 2000 - 3000)
    assert second["area"] == 2400.0


def test_image_without_label_file_has_no_objects(tmp_path):
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n", "train/b": None, "train/c": "",
                                       "val/d": "0 0.5 0.5 0.2 0.4\n"})
    result = _invoke(["prepare-data", "yolo", data, "--out", tmp_path / "out", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert "train: 1 of 3 images without a label file" in result.stderr and "labels/train/b.txt" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["images_without_labels"] == {"train": 1, "val": 0}
    doc = _json(tmp_path / "out" / "train.json")
    assert [i["file_name"].rsplit("/", 1)[-1] for i in doc["images"]] == ["a.png", "b.png", "c.png"]
    assert [a["image_id"] for a in doc["annotations"]] == [1]
    assert doc["info"]["ds2d2"]["labelled"] is True


def test_split_without_any_label_file_is_image_only(tmp_path):
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n", "val/b": None, "test/c": None},
                     "train: images/train\nval: images/val\ntest: images/test\n" + NAMES)
    result = _invoke(["prepare-data", "yolo", data, "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "val: no label file for any of its 1 image" in result.stderr
    assert _json(tmp_path / "out" / "test.json")["info"]["ds2d2"]["labelled"] is False


def test_train_only_and_whole_image_size_warning(tmp_path):
    # no val: (Ultralytics needs one to train, preparing does not): noted; whole images far larger than the
    # preset's input are warned about
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n"}, "train: images/train\n" + NAMES,
                     size=(600, 300))
    result = _invoke(["prepare-data", "yolo", data, "--out", tmp_path / "out", "--preset", "tiny-synthetic"])
    assert result.exit_code == 0, result.output
    assert "data.yaml names no val: images" in result.stderr
    assert ("warning: the median train image is 600 px on its longer side, more than 2x the 128 px input of preset "
            "tiny-synthetic") in " ".join(result.stderr.split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.json"]


def test_classes_list_filters_and_orders(tmp_path):
    yaml = "train: images/train\nval: images/val\nnames: [car, truck, bus]\n"
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n1 0.2 0.2 0.1 0.1\n2 0.8 0.8 0.1 0.1\n",
                                       "val/b": ""}, yaml)
    result = _invoke(["prepare-data", "yolo", data, "--out", tmp_path / "out", "--classes", "truck,car", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["filtered"] == {"bus": 1} and summary["classes"] == "truck,car"
    doc = _json(tmp_path / "out" / "train.json")
    assert [c["name"] for c in doc["categories"]] == ["truck", "car"]
    assert [a["category_id"] for a in doc["annotations"]] == [2, 1]


def test_classes_named_set_matches_spelling(tmp_path):
    # Ultralytics' dota8.yaml spells DOTA classes with spaces: a ds2d2 set name matches them
    yaml = "train: images/train\nval: images/train\nnames: {0: plane, 1: storage tank}\n"
    data = make_yolo(tmp_path / "ds", {"train/a": "1 0.5 0.5 0.2 0.4\n"}, yaml)
    prepare_yolo(data, tmp_path / "out", classes="dota-v1.0")
    doc = _json(tmp_path / "out" / "train.json")
    assert len(doc["categories"]) == 15 and doc["annotations"][0]["category_id"] == 10  # storage-tank


def test_roboflow_layout_txt_lists_and_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Roboflow: no path, entries ../train/images that only exist without the ../
    rf = tmp_path / "rf"
    _png(rf / "train" / "images" / "a.png")
    (rf / "train" / "labels").mkdir(parents=True)
    (rf / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    _png(rf / "valid" / "images" / "b.png")
    (rf / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['tree']\n")
    prepare_yolo(rf / "data.yaml", tmp_path / "out-rf")
    assert _anns(_json(tmp_path / "out-rf" / "train.json"))[0]["bbox"] == [80.0, 30.0, 40.0, 40.0]

    # path relative to the YAML's folder (not found from the current folder); .txt lists with ./ entries;
    # a folder searched recursively
    ds = tmp_path / "store" / "ds"
    _png(ds / "images" / "train" / "x" / "a.png")
    _png(ds / "images" / "train" / "y" / "b.png")
    (ds / "labels" / "train" / "y").mkdir(parents=True)
    (ds / "labels" / "train" / "y" / "b.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    _png(ds / "images" / "val" / "c.png")
    (ds / "val.txt").write_text("./images/val/c.png\n\n./notes.md\n")
    (tmp_path / "store" / "cfg").mkdir()
    (tmp_path / "store" / "cfg" / "d.yaml").write_text("path: ../ds\ntrain: [images/train]\nval: val.txt\n" + NAMES)
    summary = prepare_yolo(tmp_path / "store" / "cfg" / "d.yaml", tmp_path / "out-ds")
    train = _json(tmp_path / "out-ds" / "train.json")
    assert [i["file_name"].rsplit("/", 1)[-1] for i in train["images"]] == ["a.png", "b.png"]
    assert [a["image_id"] for a in train["annotations"]] == [2]
    assert summary.splits["val"].images == 1 and not summary.splits["val"].labelled


def test_duplicate_lines_dropped_and_reported(tmp_path):
    data = make_yolo(tmp_path / "ds", {"train/a": "0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2 0.2\n",
                                       "val/b": ""})
    summary = prepare_yolo(data, tmp_path / "out")
    assert summary.splits["train"].objects == 2
    (entry,) = summary.problems.skipped
    assert (entry["line"], entry["reason"], entry["action"]) == (2, "duplicate object", "dropped")
    assert "the same class and coordinates as line 1" in entry["problem"]


def test_slightly_past_the_border_is_clipped(tmp_path):
    # 1.005 is rounding: clipped to the image and counted, as every converter clips
    data = make_yolo(tmp_path / "ds", {"train/a": "0 1.005 0.5 0.1 0.2\n", "val/b": ""})
    summary = prepare_yolo(data, tmp_path / "out")
    assert _anns(_json(tmp_path / "out" / "train.json"))[0]["bbox"] == [191.0, 40.0, 9.0, 20.0]
    assert summary.splits["train"].clipped == 1


# --------------------------------------------------------------------------- tiling: the DOTA grid


def test_split_gives_the_dota_grid_and_boxes(tmp_path):
    """Scenes as DOTA labelTxt and as YOLO: the same windows, boxes and polygon pieces.

    P1 (300 x 260) holds YOLO-OBB lines, P2 (200 x 150) box lines (a file is all polygons or
    all boxes, as Ultralytics reads it); DOTA has the same objects as quadrilaterals.
    """
    rect = (30, 40, 150, 90)  # x0 y0 x1 y1: cut by several windows
    quad = [(200, 120), (260, 160), (230, 230), (170, 190)]  # rotated
    small = (10, 200, 40, 250)
    boxes = [(0, (20, 10, 180, 60)), (1, (120, 100, 190, 140))]
    scenes = {"P1": ((300, 260), [(0, "poly", rect), (1, "poly", quad), (1, "poly", small)]),
              "P2": ((200, 150), [(c, "box", b) for c, b in boxes])}
    names = ["plane", "ship"]
    dota, yolo = tmp_path / "dota" / "train", tmp_path / "yolo"
    (dota / "labelTxt").mkdir(parents=True)
    (yolo / "labels" / "train").mkdir(parents=True)

    def corners(shape):
        if len(shape) != 4 or not isinstance(shape[0], (int, float)):
            return list(shape)
        x0, y0, x1, y1 = shape
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    for stem, ((width, height), objects) in scenes.items():
        _png(dota / "images" / f"{stem}.png", (width, height), noise=True)
        (yolo / "images" / "train").mkdir(parents=True, exist_ok=True)
        (yolo / "images" / "train" / f"{stem}.png").write_bytes((dota / "images" / f"{stem}.png").read_bytes())
        dota_lines, yolo_lines = ["imagesource:GoogleEarth", "gsd:0.5"], []
        for cls, kind, shape in objects:
            points = corners(shape)
            dota_lines.append(" ".join(f"{x} {y}" for x, y in points) + f" {names[cls]} 0")
            if kind == "poly":
                yolo_lines.append(f"{cls} " + " ".join(f"{x / width!r} {y / height!r}" for x, y in points))
            else:
                x0, y0, x1, y1 = shape
                yolo_lines.append(f"{cls} {(x0 + x1) / 2 / width!r} {(y0 + y1) / 2 / height!r} "
                                  f"{(x1 - x0) / width!r} {(y1 - y0) / height!r}")
        (dota / "labelTxt" / f"{stem}.txt").write_text("\n".join(dota_lines) + "\n")
        (yolo / "labels" / "train" / f"{stem}.txt").write_text("\n".join(yolo_lines) + "\n")
    (yolo / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [plane, ship]\n")

    prepare_dota(tmp_path / "dota", tmp_path / "out-dota", size=128, gap=32)
    summary = prepare_yolo(yolo / "data.yaml", tmp_path / "out-yolo", classes="dota-v1.0", tiling=Tiling(128, 32))
    assert summary.tiling == Tiling(128, 32).meta()
    by_dota, by_yolo = _json(tmp_path / "out-dota" / "train.json"), _json(tmp_path / "out-yolo" / "train.json")
    assert by_yolo["categories"] == by_dota["categories"]
    windows = [(i["file_name"], i["window"], i["scene"]) for i in by_dota["images"]]
    assert [(i["file_name"], i["window"], i["scene"]) for i in by_yolo["images"]] == windows
    # P1: starts 0, 96, 172 across and 0, 96, 132 down; P2: 0, 72 across and 0, 22 down
    assert len(windows) == 9 + 4
    assert len(by_yolo["annotations"]) == len(by_dota["annotations"]) > 5
    p2 = {i["id"] for i in by_yolo["images"] if i["scene"] == "P2"}
    for a, b in zip(by_dota["annotations"], by_yolo["annotations"]):
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (b["image_id"], b["category_id"], b["iscrowd"])
        assert b["bbox"] == pytest.approx(a["bbox"], abs=0.01) and b["area"] == pytest.approx(a["area"], abs=0.01)
        if b["image_id"] in p2:
            assert "segmentation" not in b  # box lines stay boxes
        else:
            assert np.allclose(b["segmentation"], a["segmentation"], atol=0.01)
    whole = _json(tmp_path / "out-yolo" / "train_scenes.json")
    assert [a["bbox"] for a in whole["annotations"]] == [
        [30.0, 40.0, 120.0, 50.0], [170.0, 120.0, 90.0, 110.0], [10.0, 200.0, 30.0, 50.0],
        [20.0, 10.0, 160.0, 50.0], [120.0, 100.0, 70.0, 40.0]]


# --------------------------------------------------------------------------- bad input


def _yolo_args(data: Path, out: Path, *extra) -> list:
    return ["prepare-data", "yolo", data, "--out", out, *extra]


def _good(root: Path) -> Path:
    return make_yolo(root, {"train/a": "0 0.5 0.5 0.2 0.4\n", "train/b": "1 0.5 0.5 0.2 0.4\n",
                            "val/c": "0 0.5 0.5 0.2 0.4\n"})


def _label(text: str):
    def make(root: Path) -> None:
        (root / "labels" / "train" / "a.txt").write_text(text)
    return make


def _yaml(text: str):
    def make(root: Path) -> None:
        (root / "data.yaml").write_text(text)
    return make


def _truncated(root: Path) -> None:
    Image.effect_noise((W, H), 64).convert("RGB").save(root / "images" / "train" / "a.png")
    _truncate(root / "images" / "train" / "a.png")


def _exif_rotated(root: Path) -> None:
    (root / "images" / "train" / "a.png").unlink()
    exif = Image.Exif()
    exif[274] = 6
    Image.new("RGB", (W, H)).save(root / "images" / "train" / "a.jpg", exif=exif)


YOLO_CASES = {
    "train folder missing": (_yaml("train: images/nowhere\nval: images/val\n" + NAMES),
                             ("data.yaml:1:", "train: 'images/nowhere' not found")),
    "val list file missing": (_yaml("train: images/train\nval: val.txt\n" + NAMES),
                              ("data.yaml:2:", "val: 'val.txt' not found")),
    "not YAML": (_yaml("train: [images/train\nval: images/val\n"), ("data.yaml:", "not valid YAML")),
    "YAML not a mapping": (_yaml("- images/train\n"), ("data.yaml", "not a dataset YAML")),
    "no names": (_yaml("train: images/train\nval: images/val\n"), ("data.yaml", "no 'names:'")),
    "names neither list nor map": (_yaml("train: images/train\nval: images/val\nnames: car\n"),
                                   ("data.yaml:3:", "names must be a list")),
    "names ids with a gap": (_yaml("train: images/train\nval: images/val\nnames: {0: car, 2: truck}\n"),
                             ("data.yaml:3:", "class ids must be 0 to 1")),
    "names twice": (_yaml("train: images/train\nval: images/val\nnames: [car, Car]\n"),
                    ("data.yaml:3:", "names a class twice")),
    "nc disagrees": (_yaml("train: images/train\nval: images/val\nnc: 3\n" + NAMES), ("nc is 3",)),
    "no train": (_yaml("val: images/val\n" + NAMES), ("data.yaml", "no 'train:'")),
    "train empty": (_yaml("train:\nval: images/val\n" + NAMES), ("data.yaml:1:", "train: must be a folder")),
    "bad number": (_label("0 0.5 O.5 0.2 0.4\n"), ("a.txt:1:", "coordinates must be numbers, got 'O.5'")),
    "not finite": (_label("0 0.5 nan 0.2 0.4\n"), ("a.txt:1:", "finite")),
    "class not a number": (_label("car 0.5 0.5 0.2 0.4\n"), ("a.txt:1:", "class id must be a whole number")),
    "unknown class id": (_label("0 0.5 0.5 0.2 0.4\n5 0.5 0.5 0.2 0.4\n"),
                         ("a.txt:2:", "unknown class id 5 (data.yaml names 2 classes, ids 0 to 1)")),
    "box far outside": (_label("0 1.5 0.5 0.2 0.4\n"), ("a.txt:1:", "coordinate 1.5 is outside 0..1")),
    "pixel coordinates": (_label("0 100 50 40 40\n"), ("a.txt:1:", "coordinate 100 is outside 0..1")),
    "box wholly outside within the tolerance": (_label("0 1.008 0.5 0.004 0.2\n"),
                                                ("a.txt:1:", "object lies outside its 200x100 image")),
    "negative width": (_label("0 0.5 0.5 -0.005 0.2\n"), ("a.txt:1:", "must not be negative")),
    "3 numbers": (_label("0 0.5 0.5 0.2\n"), ("a.txt:1:", "expected 5 fields", "got 4")),
    "5 numbers": (_label("0 0.5 0.5 0.2 0.4 0.1\n"), ("a.txt:1:", "got 6")),
    "odd polygon": (_label("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1\n"), ("a.txt:1:", "x y pairs", "got 8 fields")),
    "box line among polygons": (_label("0 0.1 0.1 0.2 0.1 0.2 0.2\n0 0.5 0.5 0.2 0.4\n"),
                                ("a.txt:2:", "box line (5 fields) in a file of polygon lines")),
    "label file not text": (lambda r: (r / "labels" / "train" / "a.txt").write_bytes(b"\xff\xfe0 garbage\x81"),
                            ("a.txt", "not UTF-8")),
    "truncated image": (_truncated, ("a.png", "cannot read image")),
    "not an image": (lambda r: (r / "images" / "train" / "a.png").write_bytes(b"hello"),
                     ("a.png", "not a recognised image file")),
    "unsupported format": (lambda r: Image.new("RGB", (W, H)).save(r / "images" / "train" / "d.webp"),
                           ("d.webp", "unsupported image format '.webp'")),
    "two images, one name": (lambda r: _png(r / "images" / "train" / "sub" / "a.png"),
                             ("share the name 'a'",)),
    "listed image missing": (lambda r: ((r / "list.txt").write_text("./images/train/a.png\n./images/train/zz.png\n"),
                                        _yaml("train: list.txt\nval: images/val\n" + NAMES)(r)),
                             ("list.txt:2:", "image not found")),
    "EXIF-rotated JPEG": (_exif_rotated, ("a.jpg", "EXIF orientation 6")),
}


@pytest.mark.parametrize("case", list(YOLO_CASES))
def test_yolo_bad_input(tmp_path, case):
    make, needles = YOLO_CASES[case]
    data = _good(tmp_path / "ds")
    make(tmp_path / "ds")
    out = tmp_path / "out"
    _one_line(_invoke(_yolo_args(data, out)), *needles)
    _nothing_written(out)


def test_yolo_bad_input_tiled(tmp_path):
    """The tiled path stops on the same problems: a truncated image, an object outside its image."""
    data = _good(tmp_path / "ds")
    _truncated(tmp_path / "ds")
    _one_line(_invoke(_yolo_args(data, tmp_path / "out", "--split", "64", "--gap", "16")), "a.png", "cannot read image")
    _nothing_written(tmp_path / "out")
    data = _good(tmp_path / "ds2")
    _label("0 1.008 0.5 0.004 0.2\n")(tmp_path / "ds2")
    _one_line(_invoke(_yolo_args(data, tmp_path / "out", "--split", "64", "--gap", "16")), "a.txt:1:",
              "outside its 200x100 image")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("case", ["missing file", "a folder", "out is the dataset", "out inside the images"])
def test_yolo_refused_arguments(tmp_path, case):
    data = _good(tmp_path / "ds")
    args = {"missing file": _yolo_args(tmp_path / "nope.yaml", tmp_path / "out"),
            "a folder": _yolo_args(tmp_path / "ds", tmp_path / "out"),
            "out is the dataset": _yolo_args(data, tmp_path / "ds"),
            "out inside the images": _yolo_args(data, tmp_path / "ds" / "images" / "train" / "o")}[case]
    needles = {"missing file": ("nope.yaml", "dataset YAML not found"),
               "a folder": ("expected the dataset's YAML file", "data.yaml"),
               "out is the dataset": ("--out must be a folder of its own",),
               "out inside the images": ("--out must be a folder of its own", "split 'train'")}[case]
    _one_line(_invoke(args), *needles)
    assert not list((tmp_path / "ds").rglob("*.json"))


def test_yolo_skip_bad_reports_and_keeps_the_rest(tmp_path):
    data = make_yolo(tmp_path / "ds", {
        "train/a": "0 0.5 0.5 0.2 0.4\n7 0.5 0.5 0.2 0.4\n0 0.5 x 0.2 0.4\n1 0.1 0.1 0.1 0.1\n",
        "train/b": "0 0.5 0.5 0.2 0.4\n", "val/c": "1 0.5 0.5 0 0.2\n0 0.5 0.5 0.2 0.4\n"})
    _truncated_b = tmp_path / "ds" / "images" / "train" / "b.png"
    Image.effect_noise((W, H), 64).convert("RGB").save(_truncated_b)
    _truncate(_truncated_b)
    result = _invoke(_yolo_args(data, tmp_path / "out", "--skip-bad", "--json", "-"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_counts"] == {"malformed line": 1, "unknown class": 1, "unreadable image": 1,
                                         "zero-area object": 1}
    assert summary["splits"]["train"]["images"] == 1 and summary["splits"]["train"]["objects"] == 2
    assert summary["splits"]["val"]["objects"] == 1 and summary["splits"]["val"]["degenerate"] == 1
    train = _json(tmp_path / "out" / "train.json")
    lines = sorted((Path(e["file"]).name, e["line"]) for e in train["info"]["skipped"])
    assert lines == [("a.txt", 2), ("a.txt", 3), ("b.png", None)]
    assert "skipped line: " in result.stderr and "a.txt:2: unknown class id 7" in result.stderr
