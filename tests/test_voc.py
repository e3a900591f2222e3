"""Pascal VOC XML -> COCO (`prepare-data voc`): both layouts, sizes, difficult, clipping, --classes, tiling,
and the bad-input catalogue through the CLI (one line naming the file and object, exit 2, nothing written).

The XML is written the way the VOC2007 annotations are (MMDetection's test copy:
open-mmlab/mmdetection tests/data/VOCdevkit/VOC2012/Annotations/000001.xml) and LabelImg
saves them (folder, filename, path, source, size, segmented, object name / pose /
truncated / difficult / bndbox).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_bad_input import _invoke, _nothing_written, _one_line  # the CLI checks every converter's tests share

from ds2d2_cli.classes import class_choice
from ds2d2_cli.data.tiling import Tiling
from ds2d2_cli.data.voc import find_voc_layout, parse_voc_xml, prepare_voc, split_lists
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter


# A VOC2007 annotation as the devkit ships it (tabs, <source>, <owner>, <segmented>).
VOC2007_XML = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>000002.jpg</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>flickr</image>
\t\t<flickrid>329145082</flickrid>
\t</source>
\t<owner>
\t\t<flickrid>hiromori2</flickrid>
\t\t<name>Hiroyuki Mori</name>
\t</owner>
\t<size>
\t\t<width>335</width>
\t\t<height>500</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
\t<object>
\t\t<name>train</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>139</xmin>
\t\t\t<ymin>200</ymin>
\t\t\t<xmax>207</xmax>
\t\t\t<ymax>301</ymax>
\t\t</bndbox>
\t</object>
</annotation>
"""


def voc_xml(filename: str, size: tuple | None, objects: list[tuple[str, tuple, int]], depth: str = "3") -> str:
    """An XML as LabelImg writes it; `size` None leaves <size> out, (0, 0) is what CVAT writes without the image."""
    parts = ["<annotation>", "\t<folder>train</folder>", f"\t<filename>{filename}</filename>",
             f"\t<path>/home/user/survey/train/{filename}</path>",
             "\t<source>\n\t\t<database>Unknown</database>\n\t</source>"]
    if size is not None:
        parts.append(f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
                     f"\t\t<depth>{depth}</depth>\n\t</size>")
    parts.append("\t<segmented>0</segmented>")
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>0</truncated>\n\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n"
                     f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n"
                     f"\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _image(path: Path, size: tuple[int, int], noise: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, (90, 120, 60))
    image.save(path)


def make_labelimg(root: Path) -> Path:
    """LabelImg folders: train/ (a: 2 objects, b: no XML, c: CVAT size 0 + a box past the border), val/ (d)."""
    _image(root / "train" / "a.png", (100, 80))
    (root / "train" / "a.xml").write_text(voc_xml("a.png", (100, 80), [("Tree", (10, 20, 30, 50), 0),
                                                                       ("car", (60.5, 5, 90, 25.5), 1)]))
    _image(root / "train" / "b.jpg", (40, 30))  # LabelImg saved no XML: no objects
    _image(root / "train" / "c.jpg", (64, 48))
    (root / "train" / "c.xml").write_text(voc_xml("c.jpg", (0, 0), [("Tree", (50, 40, 80, 70), 0)], depth=""))
    _image(root / "val" / "d.png", (50, 50))
    (root / "val" / "d.xml").write_text(voc_xml("d.png", None, [("tree", (1, 2, 11, 12), 0)]))
    (root / "train" / "classes.txt").write_text("Tree\ncar\n")  # LabelImg's YOLO-mode list: not ours, left out
    return root


def make_devkit(root: Path) -> Path:
    """VOCdevkit/VOC2007: 000001, 000002 (train, val; trainval both), 000003 (test, no XML), per-class lists."""
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    _image(voc / "JPEGImages" / "000001.jpg", (60, 40))
    _image(voc / "JPEGImages" / "000002.jpg", (335, 500))
    _image(voc / "JPEGImages" / "000003.jpg", (20, 20))
    (voc / "Annotations" / "000001.xml").write_text(voc_xml("000001.jpg", (60, 40), [("car", (1, 1, 21, 11), 0),
                                                                                      ("person", (5, 5, 9, 30), 1)]))
    (voc / "Annotations" / "000002.xml").write_text(VOC2007_XML)
    lists = voc / "ImageSets" / "Main"
    for split, ids in (("train", ["000001"]), ("val", ["000002"]), ("trainval", ["000001", "000002"]),
                       ("test", ["000003"])):
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (lists / "car_train.txt").write_text("000001  1\n")  # the devkit's per-class list: not a split
    (lists / "car_trainval.txt").write_text("000001  1\n000002 -1\n")
    return root


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _boxes(doc: dict) -> list[tuple]:
    names = {c["id"]: c["name"] for c in doc["categories"]}
    files = {i["id"]: Path(i["file_name"]).name for i in doc["images"]}
    return [(files[a["image_id"]], names[a["category_id"]], a["bbox"], a["difficult"]) for a in doc["annotations"]]


# --------------------------------------------------------------------------- the parser


def test_parse_the_voc2007_annotation(tmp_path):
    path = tmp_path / "000002.xml"
    path.write_text(VOC2007_XML)
    assert parse_voc_xml(path) == {"width": 335, "height": 500, "objects": [
        {"name": "train", "box": (139.0, 200.0, 207.0, 301.0), "difficult": 0, "index": 1}]}


@pytest.mark.parametrize("size, expected", [(None, (None, None)), ((0, 0), (None, None)), ((64, 48), (64, 48))])
def test_parse_size_missing_or_zero_is_unknown(tmp_path, size, expected):
    path = tmp_path / "x.xml"
    path.write_text(voc_xml("x.png", size, [("Car", (1, 2, 3, 4), 1)], depth=""))
    info = parse_voc_xml(path)
    assert (info["width"], info["height"]) == expected
    assert info["objects"] == [{"name": "Car", "box": (1.0, 2.0, 3.0, 4.0), "difficult": 1, "index": 1}]


def test_find_layout(tmp_path):
    labelimg = make_labelimg(tmp_path / "survey")
    assert find_voc_layout(labelimg) == (None, [("train", labelimg / "train"), ("val", labelimg / "val")])
    assert find_voc_layout(labelimg / "val") == (None, [("val", labelimg / "val")])
    devkit = make_devkit(tmp_path / "VOCdevkit")
    assert find_voc_layout(devkit) == (devkit / "VOC2007", [])
    assert find_voc_layout(devkit / "VOC2007") == (devkit / "VOC2007", [])
    assert list(split_lists(devkit / "VOC2007" / "ImageSets" / "Main")) == ["train", "val", "trainval", "test"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no VOC data here"):
        find_voc_layout(tmp_path / "empty")
    with pytest.raises(InputError, match="VOC folder not found"):
        find_voc_layout(tmp_path / "nowhere")


# --------------------------------------------------------------------------- LabelImg folders


def test_labelimg_whole_images(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    out = tmp_path / "out"
    reporter = NullReporter()
    summary = prepare_voc(root, out, reporter=reporter)
    assert summary.format == "voc" and summary.tiling is None and summary.classes is None
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "val.json"]
    train, val = _load(out / "train.json"), _load(out / "val.json")
    # classes: every name found, spelling-insensitively (Tree / tree), sorted
    assert [c["name"] for c in train["categories"]] == ["car", "Tree"]
    assert [(i["id"], Path(i["file_name"]).name, i["width"], i["height"]) for i in train["images"]] == [
        (1, "a.png", 100, 80), (2, "b.jpg", 40, 30), (3, "c.jpg", 64, 48)]
    assert (out / train["images"][0]["file_name"]).resolve() == (root / "train" / "a.png").resolve()
    assert _boxes(train) == [("a.png", "Tree", [10.0, 20.0, 20.0, 30.0], 0),
                             ("a.png", "car", [60.5, 5.0, 29.5, 20.5], 1),  # difficult kept
                             ("c.jpg", "Tree", [50.0, 40.0, 14.0, 8.0], 0)]  # clipped to the 64x48 image
    assert "segmentation" not in train["annotations"][0] and train["annotations"][0]["area"] == 600.0
    assert train["info"]["ds2d2"]["source"] == "voc" and train["info"]["ds2d2"]["split"] == "train"
    (repair,) = train["info"]["repaired"]
    assert (Path(repair["file"]).name, repair["reason"], repair["image"]) == ("c.xml", "object partly outside image",
                                                                               "c")
    assert repair["problem"] == "object 1 (Tree): object extends past its 64x48 image: clipped to it"
    assert _boxes(val) == [("d.png", "Tree", [1.0, 2.0, 10.0, 10.0], 0)]  # no <size>: read from the image
    assert summary.splits["train"].images == 3 and summary.splits["train"].objects == 3
    assert summary.splits["train"].clipped == 1 and summary.splits["val"].clipped == 0
    assert summary.splits["train"].objects_per_class == {"car": 1, "Tree": 2}
    assert any("train: 1 image(s) without an XML taken as images without objects" in n and "b.jpg" in n
               for n in reporter.notes)
    assert any("1 file(s) neither an image nor an XML left out, e.g. classes.txt" in n for n in reporter.notes)


def test_classes_list_filters_and_orders(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    summary = prepare_voc(root, tmp_path / "out", classes=class_choice("[tree]"))
    train = _load(tmp_path / "out" / "train.json")
    assert [c["name"] for c in train["categories"]] == ["tree"]
    assert [(b[0], b[1]) for b in _boxes(train)] == [("a.png", "tree"), ("c.jpg", "tree")]
    assert summary.filtered == {"car": 1} and summary.classes == "tree"
    assert train["info"]["ds2d2"]["classes"] == "tree"
    prepare_voc(root, tmp_path / "out2", classes=class_choice("[tree, car]"))
    assert [c["name"] for c in _load(tmp_path / "out2" / "train.json")["categories"]] == ["tree", "car"]


def test_split_cuts_patches(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    out = tmp_path / "out"
    summary = prepare_voc(root, out, tiling=Tiling(64, 16))
    assert summary.tiling is not None and summary.tiling["patch_size"] == 64
    train = _load(out / "train.json")
    # a (100x80): windows at x 0 and 36 (the last moved back to end at the border), y 0 and 16, left to right
    # in the outer loop as the devkit's ImgSplit; b (40x30) and c (64x48): one padded window each
    assert [(i["scene"], i["window"]) for i in train["images"]] == [
        ("a", [0, 0]), ("a", [0, 16]), ("a", [36, 0]), ("a", [36, 16]), ("b", [0, 0]), ("c", [0, 0])]
    assert all((out / i["file_name"]).is_file() and i["width"] == i["height"] == 64 for i in train["images"])
    assert summary.splits["train"].patches == 6
    scenes = _load(out / "train_scenes.json")
    assert [Path(i["file_name"]).name for i in scenes["images"]] == ["a.png", "b.jpg", "c.jpg"]
    # the car (60.5..90, 5..25.5) keeps 3.5 of its 29.5 px width in the x=0 windows and 9.5 of its 20.5 px
    # height in the y=16 ones: under --iof-thr 0.7 it is kept in window (36, 0) only, at x 60.5 - 36 = 24.5.
    # c's tree (50..80, 40..70) has 14 x 8 of its 30 x 30 px inside its scene: iof 0.12, dropped from the
    # patch (the devkit's rule), kept clipped in the whole scene
    assert [(a["image_id"], a["bbox"], a["difficult"]) for a in train["annotations"]] == [
        (1, [10.0, 20.0, 20.0, 30.0], 0), (2, [10.0, 4.0, 20.0, 30.0], 0), (3, [24.5, 5.0, 29.5, 20.5], 1)]
    assert summary.splits["train"].dropped_iof == 4
    assert [a["bbox"] for a in scenes["annotations"]][-1] == [50.0, 40.0, 14.0, 8.0]


# --------------------------------------------------------------------------- the VOC devkit layout


def test_devkit_layout(tmp_path):
    root = make_devkit(tmp_path / "VOCdevkit")
    out = tmp_path / "out"
    reporter = NullReporter()
    summary = prepare_voc(root, out, reporter=reporter)
    assert list(summary.splits) == ["train", "val", "trainval", "test"]
    train = _load(out / "train.json")
    assert [c["name"] for c in train["categories"]] == ["car", "person", "train"]
    assert _boxes(train) == [("000001.jpg", "car", [1.0, 1.0, 20.0, 10.0], 0),
                             ("000001.jpg", "person", [5.0, 5.0, 4.0, 25.0], 1)]
    assert _boxes(_load(out / "val.json")) == [("000002.jpg", "train", [139.0, 200.0, 68.0, 101.0], 0)]
    trainval = _load(out / "trainval.json")
    assert [Path(i["file_name"]).name for i in trainval["images"]] == ["000001.jpg", "000002.jpg"]
    assert len(trainval["annotations"]) == 3
    test = _load(out / "test.json")  # no XML for any test image: image-only, as VOC2012's test set
    assert [Path(i["file_name"]).name for i in test["images"]] == ["000003.jpg"] and test["annotations"] == []
    assert test["info"]["ds2d2"]["labelled"] is False and summary.splits["test"].labelled is False
    assert any("test: no annotation for any image of test.txt" in n for n in reporter.notes)


def test_devkit_reports_follow_the_shared_images(tmp_path):
    """A problem of a train image is listed in train.json and trainval.json, not in val.json."""
    root = make_devkit(tmp_path / "VOCdevkit")
    ann = root / "VOC2007" / "Annotations" / "000001.xml"
    ann.write_text(ann.read_text().replace("<xmax>21</xmax>", "<xmax>9x</xmax>"))
    out = tmp_path / "out"
    summary = prepare_voc(root, out, skip_bad=True)
    assert [(Path(e["file"]).name, e["item"], e["reason"], e["split"]) for e in summary.problems.skipped] == [
        ("000001.xml", "object", "malformed field", "train")]
    assert [len(_load(out / f"{s}.json")["info"]["skipped"]) for s in ("train", "val", "trainval", "test")] == \
        [1, 0, 1, 0]
    assert _boxes(_load(out / "train.json")) == [("000001.jpg", "person", [5.0, 5.0, 4.0, 25.0], 1)]


# --------------------------------------------------------------------------- the CLI and bad input


def test_cli_prepares_and_summarises(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    out = tmp_path / "prepared"
    result = _invoke(["prepare-data", "voc", root, "--out", out, "--split", "64", "--gap", "16", "--classes",
                      "Tree,car", "--json", tmp_path / "s.json"])
    assert result.exit_code == 0, result.output
    assert "VOC -> " in result.stdout
    summary = _load(tmp_path / "s.json")
    assert summary["format"] == "voc" and summary["classes"] == "Tree,car"
    assert {s: v["patches"] for s, v in summary["splits"].items()} == {"train": 6, "val": 1}
    assert [c["name"] for c in _load(out / "val.json")["categories"]] == ["Tree", "car"]
    _one_line(_invoke(["prepare-data", "voc", root, "--out", tmp_path / "o2", "--gap", "16"]), "add --split SIZE")
    _one_line(_invoke(["prepare-data", "voc", root, "--out", root]), "--out must be a folder of its own")


def _edit(stem: str, old: str, new: str):
    def make(root: Path) -> None:
        path = next(root.glob(f"*/{stem}.xml"))
        text = path.read_text()
        assert old in text, (old, text)
        path.write_text(text.replace(old, new, 1))
    return make


def _truncated(root: Path) -> None:
    path = root / "train" / "a.png"
    Image.effect_noise((100, 80), 64).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


LABELIMG_CASES = {
    "XML without its image": (lambda r: (r / "train" / "a.png").unlink(),
                              [], ("a.xml", "no image for a.xml (expected a.png, a.jpg ... beside it)")),
    "bad number in <xmin>": (_edit("a", "<xmin>10</xmin>", "<xmin>1O</xmin>"),
                             [], ("a.xml", "object 1 (Tree): <xmin> is not a number ('1O')")),
    "unknown class under a set": (lambda r: None, ["--classes", "dota-v1.0"],
                                  ("a.xml", "object 1 (Tree): unknown class 'Tree'", "class set dota-v1.0")),
    "box wholly outside the image": (_edit("d", "<xmin>1</xmin>\n\t\t\t<ymin>2</ymin>\n\t\t\t<xmax>11</xmax>",
                                           "<xmin>100</xmin>\n\t\t\t<ymin>2</ymin>\n\t\t\t<xmax>111</xmax>"),
                                     [], ("d.xml", "object 1 (tree): object lies outside its 50x50 image")),
    "truncated image": (_truncated, [], ("a.png", "cannot read image")),
    "malformed XML": (lambda r: (r / "train" / "a.xml").write_text("<annotation>\n<size><width>80</width>\n"),
                      [], ("a.xml:", "not valid XML")),
    "not a VOC annotation": (lambda r: (r / "train" / "a.xml").write_text("<annotations><image/></annotations>"),
                             [], ("a.xml", "not a Pascal VOC annotation: the root element is <annotations>")),
    "inside-out box": (_edit("a", "<xmax>30</xmax>", "<xmax>5</xmax>"), [], ("a.xml", "object 1 (Tree)", "inside out")),
    "missing <name>": (_edit("a", "<name>car</name>", ""), [], ("a.xml", "object 2 has no <name>")),
    "bad <difficult>": (_edit("a", "<difficult>1</difficult>", "<difficult>yes</difficult>"), [],
                        ("a.xml", "object 2 (car): <difficult> must be 0 or 1, got 'yes'")),
    "negative <size>": (_edit("a", "<width>100</width>", "<width>-100</width>"), [],
                        ("a.xml", "<size> must be whole positive pixel counts (0 when unknown), got -100x80")),
    "size disagrees with the image": (_edit("a", "<width>100</width>", "<width>101</width>"), [],
                                      ("a.xml", "the labels say 101x80 but a.png is 100x80")),
    "two images, one name": (lambda r: _image(r / "train" / "a.jpg", (100, 80)), [],
                             ("a.xml", "two images share the name 'a' (a.jpg, a.png)")),
    "unsupported image format": (lambda r: ((r / "train" / "a.png").unlink(),
                                            Image.new("RGB", (100, 80)).save(r / "train" / "a.gif")),
                                 [], ("a.gif", "unsupported image format '.gif'")),
}


@pytest.mark.parametrize("case", list(LABELIMG_CASES))
def test_bad_input(tmp_path, case):
    make, extra, needles = LABELIMG_CASES[case]
    root = make_labelimg(tmp_path / "survey")
    make(root)
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "voc", root, "--out", out, *extra]), *needles)
    _nothing_written(out)


@pytest.mark.parametrize("case, make, needles", [
    ("listed image without XML", lambda v: (v / "ImageSets" / "Main" / "val.txt").write_text("000002\n000009\n"),
     ("000009.xml", "no annotation for image 000009 (listed in val.txt)")),
    ("XML without its image", lambda v: (v / "JPEGImages" / "000001.jpg").unlink(),
     ("000001.xml", "image 000001 (listed in train.txt) not found in JPEGImages/")),
    ("id listed twice", lambda v: (v / "ImageSets" / "Main" / "val.txt").write_text("000002\n000002\n"),
     ("val.txt", "image 000002 is listed twice")),
    ("no split lists", lambda v: [p.unlink() for p in (v / "ImageSets" / "Main").glob("*.txt")],
     ("VOC2007", "no split lists: expected ImageSets/Main/<split>.txt")),
    ("no JPEGImages", lambda v: (v / "JPEGImages").rename(v / "images"), ("VOC2007", "no JPEGImages/ folder")),
])
def test_devkit_bad_input(tmp_path, case, make, needles):
    root = make_devkit(tmp_path / "VOCdevkit")
    make(root / "VOC2007")
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "voc", root, "--out", out]), *needles)
    _nothing_written(out)


def test_skip_bad_reports_and_counts(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    _edit("a", "<xmin>10</xmin>", "<xmin>ten</xmin>")(root)  # one object of a
    (root / "train" / "e.xml").write_text(voc_xml("e.png", (10, 10), [("car", (1, 1, 2, 2), 0)]))  # no image
    _edit("d", "<xmax>11</xmax>", "<xmax>1</xmax>")(root)  # zero width: dropped in any case
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "voc", root, "--out", out, "--skip-bad", "--json", tmp_path / "s.json"])
    assert result.exit_code == 0, result.output
    summary = _load(tmp_path / "s.json")
    assert [(Path(e["file"]).name, e["item"], e["reason"], e["action"]) for e in summary["skipped"]] == [
        ("a.xml", "object", "malformed field", "skipped"),
        ("e.xml", "image", "annotation without image", "skipped"),
        ("d.xml", "object", "zero-area object", "dropped")]
    assert summary["skipped_counts"] == {"annotation without image": 1, "malformed field": 1, "zero-area object": 1}
    assert "note: skipped object: " in result.stderr and "a.xml: object 1 (Tree): <xmin> is not a number" in \
        result.stderr
    train = _load(out / "train.json")
    assert [(b[0], b[1]) for b in _boxes(train)] == [("a.png", "car"), ("c.jpg", "Tree")]
    assert [e["image"] for e in train["info"]["skipped"]] == ["a", "e"]
    val = _load(out / "val.json")
    assert val["annotations"] == [] and val["info"]["skipped"][0]["reason"] == "zero-area object"
    assert summary["splits"]["train"]["images"] == 3 and summary["splits"]["train"]["skipped"] == 2


def test_skip_bad_empty_split_is_an_error(tmp_path):
    root = make_labelimg(tmp_path / "survey")
    (root / "val" / "d.xml").write_text("<annotation>")
    _one_line(_invoke(["--quiet", "prepare-data", "voc", root, "--out", tmp_path / "out", "--skip-bad"]),
              "val", "no usable image left in split 'val'")
    _nothing_written(tmp_path / "out")
