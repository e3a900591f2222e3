"""Bad input, one case each, through the CLI: one clean line naming the file, a non-zero exit,
no traceback (unless --debug) and nothing half-written; `--skip-bad` skips and reports instead.

Policy (README, "Bad input and --skip-bad"): bad items stop the run (exit 2) or, with
--skip-bad, are skipped and listed; zero-area objects are always dropped and reported;
self-intersecting quadrilaterals and objects reaching past their image are repaired and
counted; write failures (an unwritable folder, a full disk) exit 1 and leave nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app

runner = CliRunner()

GOOD = "imagesource:GoogleEarth\ngsd:0.5\n10 10 20 10 20 20 10 20 ship 0\n"


# --------------------------------------------------------------------------- helpers


def _invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


def _one_line(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, exactly one line on stderr ("error: FILE...: problem"), no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _nothing_written(out: Path) -> None:
    """No output file at all: no JSON, no patch, no temporary file or folder."""
    if not out.exists():
        return
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.name.endswith(".tmp"))
    assert left == [], left


def _png(path: Path, size=(64, 64), value=120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 30)).save(path)


def _dota(root: Path, scenes: dict[str, str | None] | None = None) -> Path:
    """A DOTA split folder: 64 px scenes P1, P2 with one ship each (or the given label texts)."""
    scenes = scenes if scenes is not None else {"P1": GOOD, "P2": GOOD}
    for stem, text in scenes.items():
        _png(root / "images" / f"{stem}.png")
        if text is not None:
            (root / "labelTxt").mkdir(parents=True, exist_ok=True)
            (root / "labelTxt" / f"{stem}.txt").write_text(text, encoding="utf-8")
    return root


def _dota_args(src: Path, out: Path, *extra: str) -> list:
    return ["prepare-data", "dota", src, "--out", out, "--split", "32", "--gap", "8", *extra]


def _line(text: str) -> str:
    return f"imagesource:GoogleEarth\ngsd:0.5\n{text}\n"


# --------------------------------------------------------------------------- DOTA


def _dota_bad_line(text: str):
    def make(src: Path) -> None:
        (src / "labelTxt" / "P1.txt").write_text(_line(text), encoding="utf-8")
    return make


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _dota_truncated(src: Path) -> None:
    Image.effect_noise((64, 64), 64).convert("RGB").save(src / "images" / "P1.png")
    _truncate(src / "images" / "P1.png")


def _dota_duplicate_stem(src: Path) -> None:
    Image.new("RGB", (64, 64)).save(src / "images" / "P1.jpg")


DOTA_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "image without label file": (lambda s: (s / "labelTxt" / "P2.txt").unlink(),
                                 ("P2.txt", "no label file for image P2.png")),
    "label file without image": (lambda s: (s / "labelTxt" / "P9.txt").write_text(GOOD),
                                 ("P9.txt", "label file without an image")),
    "truncated image": (_dota_truncated, ("P1.png", "cannot read image")),
    "corrupt image": (lambda s: (s / "images" / "P1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png"),
                      ("P1.png", "cannot read image")),
    "not an image at all": (lambda s: (s / "images" / "P1.png").write_bytes(b"hello"),
                            ("P1.png", "not a recognised image file")),
    "unsupported image format": (lambda s: Image.new("RGB", (8, 8)).save(s / "images" / "P3.gif"),
                                 ("P3.gif", "unsupported image format '.gif'")),
    "image format disagrees with contents": (lambda s: Image.new("RGB", (64, 64)).save(s / "images" / "P1.png",
                                                                                       format="GIF"),
                                             ("P1.png", "unsupported image format GIF")),
    "two images, one name": (_dota_duplicate_stem, ("P1.", "two images share the name 'P1'")),
    "too few fields": (_dota_bad_line("10 10 20 10 20 20 10 ship 0"), ("P1.txt:3:", "must be numbers")),
    "too many fields": (_dota_bad_line("10 10 20 10 20 20 10 20 ship 0 1"), ("P1.txt:3:", "got 11 fields")),
    "only coordinates": (_dota_bad_line("10 10 20 10 20 20 10 20"), ("P1.txt:3:", "got 8 fields")),
    "non-numeric coordinate": (_dota_bad_line("10 10 2O 10 20 20 10 20 ship 0"), ("P1.txt:3:", "must be numbers")),
    "non-finite coordinate": (_dota_bad_line("10 10 nan 10 20 20 10 20 ship 0"), ("P1.txt:3:", "finite")),
    "absurd coordinate": (_dota_bad_line("10 10 1e12 10 20 20 10 20 ship 0"), ("P1.txt:3:", "far outside")),
    "unknown class": (_dota_bad_line("10 10 20 10 20 20 10 20 spaceship 0"), ("P1.txt:3:", "unknown class 'spaceship'")),
    "bad difficult flag": (_dota_bad_line("10 10 20 10 20 20 10 20 ship maybe"), ("P1.txt:3:", "difficult flag")),
    "object outside the image": (_dota_bad_line("100 100 120 100 120 120 100 120 ship 0"),
                                 ("P1.txt:3:", "object lies outside its 64x64 image")),
    "empty label file": (lambda s: (s / "labelTxt" / "P1.txt").write_text(""), ("P1.txt", "empty label file")),
    "label file not text": (lambda s: (s / "labelTxt" / "P1.txt").write_bytes(b"\xff\xfe\x00garbage\x81"),
                            ("P1.txt", "not UTF-8")),
}


@pytest.mark.parametrize("case", list(DOTA_CASES))
def test_dota_bad_input(tmp_path, case):
    make, needles = DOTA_CASES[case]
    src = _dota(tmp_path / "train")
    make(src)
    out = tmp_path / "out"
    _one_line(_invoke(_dota_args(src, out)), *needles)
    _nothing_written(out)


@pytest.mark.parametrize("case, args, needles", [
    ("missing source folder", ["prepare-data", "dota", "NOWHERE", "--out", "OUT"], ("DOTA source folder not found",)),
    ("split without images/", ["prepare-data", "dota", "EMPTY", "--out", "OUT"], ("no DOTA split here",)),
    ("DIOR folder missing", ["prepare-data", "dior", "NOWHERE", "--out", "OUT"], ("DIOR folder not found",)),
    ("COCO file missing", ["prepare-data", "coco", "NOWHERE/x.json", "--images", "EMPTY", "--out", "OUT"],
     ("x.json", "annotation file not found")),
    ("COCO image folder missing", ["prepare-data", "coco", "JSON", "--images", "NOWHERE", "--out", "OUT"],
     ("nowhere", "image folder not found")),
])
def test_missing_folders(tmp_path, case, args, needles):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "x.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}]}))
    subst = {"NOWHERE": tmp_path / "nowhere", "EMPTY": tmp_path / "EMPTY", "OUT": tmp_path / "out",
             "JSON": tmp_path / "x.json", "NOWHERE/x.json": tmp_path / "nowhere" / "x.json"}
    _one_line(_invoke([subst.get(a, a) for a in args]), *needles)
    _nothing_written(tmp_path / "out")


def test_dior_missing_subfolders(tmp_path):
    from test_dior import make_dior

    root = make_dior(tmp_path / "DIOR")
    for sub in ("JPEGImages-trainval", "JPEGImages-test"):
        (root / sub).rename(root / f"_{sub}")
    _one_line(_invoke(["prepare-data", "dior", root, "--out", tmp_path / "o"]), "no image folder")
    (root / "Annotations").rename(root / "_Annotations")
    _one_line(_invoke(["prepare-data", "dior", root, "--out", tmp_path / "o"]), "no DIOR annotations")
    _nothing_written(tmp_path / "o")


def test_debug_shows_the_traceback(tmp_path):
    src = _dota(tmp_path / "train")
    _dota_bad_line("1 2 3")(src)
    result = _invoke(["--debug", *_dota_args(src, tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" in result.output and "P1.txt:3:" in result.output


# --------------------------------------------------------------------------- DOTA: reported, not fatal


def test_dota_zero_area_dropped_and_reported(tmp_path):
    src = _dota(tmp_path / "train", {"P1": _line("10 10 20 10 20 20 10 20 ship 0\n5 5 5 5 5 5 5 5 plane 0")})
    out = tmp_path / "out"
    result = _invoke(_dota_args(src, out, "--json", "-"))
    assert result.exit_code == 0, result.output
    assert "dropped object: " in result.stderr and "P1.txt:4: zero-area polygon" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["skipped_counts"] == {"zero-area object": 1}
    (entry,) = summary["skipped"]
    assert (Path(entry["file"]).name, entry["line"], entry["action"]) == ("P1.txt", 4, "dropped")
    data = json.loads((out / "train_scenes.json").read_text())
    assert len(data["annotations"]) == 1 and data["info"]["skipped"] == [entry]


def test_dota_self_intersecting_repaired_and_partly_outside_clipped(tmp_path):
    bowtie = "10 10 20 20 20 10 10 20 ship 0"  # corners out of order
    past = "50 50 70 50 70 60 50 60 plane 0"  # reaches x = 70 in a 64 px scene
    src = _dota(tmp_path / "train", {"P1": _line(f"{bowtie}\n{past}")})
    out = tmp_path / "out"
    result = _invoke(_dota_args(src, out, "--json", str(tmp_path / "s.json")))
    assert result.exit_code == 0, result.output
    assert "1 object repaired (self-intersecting polygon" in result.stderr
    assert "1 object repaired (object partly outside image" in result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["repaired_counts"] == {"object partly outside image": 1, "self-intersecting polygon": 1}
    assert summary["skipped"] == [] and summary["splits"]["train"]["objects"] == 2
    scenes = json.loads((out / "train_scenes.json").read_text())
    boxes = sorted(a["bbox"] for a in scenes["annotations"])
    assert boxes == [[10.0, 10.0, 10.0, 10.0], [50.0, 50.0, 14.0, 10.0]]  # hull area 100; clipped at x = 64
    assert "repaired" in result.stdout  # the summary table


def test_dota_test_split_without_labels_still_works(tmp_path):
    src = _dota(tmp_path / "test", {"P1": None})
    result = _invoke(_dota_args(src, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "no labelTxt/ folder" in result.stderr
    assert json.loads((tmp_path / "out" / "test.json").read_text())["annotations"] == []


def test_dota_header_only_label_is_a_scene_without_objects(tmp_path):
    src = _dota(tmp_path / "train", {"P1": GOOD, "P2": "imagesource:GoogleEarth\ngsd:0.5\n"})
    result = _invoke(_dota_args(src, tmp_path / "out", "--json", "-"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["splits"]["train"]["scenes"] == 2 and summary["skipped"] == []


# --------------------------------------------------------------------------- DOTA --skip-bad


def test_dota_skip_bad_reports_every_item_and_keeps_the_rest(tmp_path):
    src = _dota(tmp_path / "train", {
        "P1": _line("10 10 20 10 20 20 10 20 ship 0\n"  # line 3: good
                    "10 10 20 10 20 20 10 spaceship 0\n"  # line 4: 7 numbers
                    "30 30 40 30 40 40 30 40 spaceship 0\n"  # line 5: unknown class
                    "5 5 5 5 5 5 5 5 plane 0\n"  # line 6: zero area (dropped with or without --skip-bad)
                    "100 100 120 100 120 120 100 120 ship 0\n"  # line 7: outside the 64 px image
                    "40 40 50 40 50 50 40 50 plane 1"),  # line 8: good
        "P2": None,  # image without label file
        "P3": GOOD,  # corrupt image, below
        "P4": GOOD,
    })
    (src / "images" / "P3.png").write_bytes(b"garbage")
    (src / "labelTxt" / "P9.txt").write_text(GOOD)  # label file without image
    Image.new("RGB", (8, 8)).save(src / "images" / "P5.gif")  # unsupported format
    out = tmp_path / "out"
    result = _invoke(_dota_args(src, out, "--skip-bad", "--json", str(tmp_path / "s.json")))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert sum(summary["skipped_counts"].values()) == len(summary["skipped"]) == 8
    got = sorted((Path(e["file"]).name, e["line"], e["item"], e["reason"], e["action"]) for e in summary["skipped"])
    assert got == [
        ("P1.txt", 4, "line", "malformed line", "skipped"),
        ("P1.txt", 5, "line", "unknown class", "skipped"),
        ("P1.txt", 6, "object", "zero-area object", "dropped"),
        ("P1.txt", 7, "object", "object outside image", "skipped"),
        ("P2.txt", None, "image", "image without label file", "skipped"),
        ("P3.png", None, "image", "unreadable image", "skipped"),
        ("P5.gif", None, "image", "unsupported image format", "skipped"),
        ("P9.txt", None, "label file", "label file without image", "skipped"),
    ]
    # one note per item on stderr, each naming its file (and line)
    for name, line, *_ in got:
        assert f"{name}:{line}:" in result.stderr if line else name in result.stderr
    assert result.stderr.count("note: skipped ") == 7 and result.stderr.count("note: dropped ") == 1
    assert "bad input (--json lists each item)" in result.stdout and "unknown class" in result.stdout
    # the good ones are written: P1 with its two good objects, and P4
    scenes = json.loads((out / "train_scenes.json").read_text())
    assert [Path(i["file_name"]).name for i in scenes["images"]] == ["P1.png", "P4.png"]
    assert sorted(a["bbox"] for a in scenes["annotations"]) == [[10.0, 10.0, 10.0, 10.0], [10.0, 10.0, 10.0, 10.0],
                                                                [40.0, 40.0, 10.0, 10.0]]
    assert [(Path(e["file"]).name, e["line"]) for e in scenes["info"]["skipped"]] == \
        [(Path(e["file"]).name, e["line"]) for e in summary["skipped"]]
    patches = json.loads((out / "train.json").read_text())
    assert {i["scene"] for i in patches["images"]} == {"P1", "P4"}
    assert all((out / i["file_name"]).is_file() for i in patches["images"])
    assert not list(out.glob(".*.tmp"))


def test_dota_skip_bad_same_output_with_workers(tmp_path):
    src = _dota(tmp_path / "train", {"P1": _line("1 2 3\n10 10 20 10 20 20 10 20 ship 0"), "P2": GOOD, "P3": GOOD})
    (src / "images" / "P2.png").write_bytes(b"garbage")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _invoke(_dota_args(src, one, "--skip-bad")).exit_code == 0
    assert _invoke(_dota_args(src, two, "--skip-bad", "--workers", "2")).exit_code == 0
    for name in ("train.json", "train_scenes.json"):
        assert json.loads((one / name).read_text()) == json.loads((two / name).read_text())


def test_dota_nothing_left_is_an_error(tmp_path):
    src = _dota(tmp_path / "train", {"P1": "", "P2": ""})
    _one_line(_invoke(["--quiet", *_dota_args(src, tmp_path / "out", "--skip-bad")]), "every one was skipped as bad")
    _nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------- DIOR


def _dior(tmp_path: Path) -> Path:
    from test_dior import make_dior

    return make_dior(tmp_path / "DIOR")


def _xml_path(root: Path, stem: str) -> Path:
    return root / "Annotations" / "Horizontal Bounding Boxes" / f"{stem}.xml"


def _edit_xml(stem: str, old: str, new: str):
    def make(root: Path) -> None:
        path = _xml_path(root, stem)
        text = path.read_text()
        assert old in text, (old, text)
        path.write_text(text.replace(old, new, 1))
    return make


def _dior_truncated(root: Path) -> None:
    path = root / "JPEGImages-trainval" / "00001.jpg"
    Image.effect_noise((80, 60), 64).convert("RGB").save(path, quality=95)
    _truncate(path)


def _dior_gif(root: Path) -> None:
    (root / "JPEGImages-trainval" / "00001.jpg").unlink()
    Image.new("RGB", (80, 60)).save(root / "JPEGImages-trainval" / "00001.gif")


DIOR_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "malformed XML": (lambda r: _xml_path(r, "00001").write_text("<annotation>\n<size><width>80</width>\n"),
                      ("00001.xml:", "not valid XML")),
    "not XML at all": (lambda r: _xml_path(r, "00001").write_bytes(b"\x00\x01binary"), ("00001.xml", "not valid XML")),
    "missing <size>": (_edit_xml("00001", "<size><width>80</width><height>60</height><depth>3</depth></size>", ""),
                       ("00001.xml", "no <size> element")),
    "missing <width>": (_edit_xml("00001", "<width>80</width>", ""), ("00001.xml", "<size> has no <width>")),
    "zero <size>": (_edit_xml("00001", "<width>80</width>", "<width>0</width>"),
                    ("00001.xml", "<size> must be whole positive pixel counts")),
    "missing <name>": (_edit_xml("00001", "<name>airplane</name>", ""), ("00001.xml", "object 2 has no <name>")),
    "missing <bndbox>": (_edit_xml("00001", "<bndbox><xmin>0</xmin><ymin>0</ymin><xmax>8</xmax><ymax>8</ymax></bndbox>",
                                   ""), ("00001.xml", "object 2 (airplane) has no <bndbox>")),
    "missing <xmin>": (_edit_xml("00001", "<xmin>10</xmin>", ""), ("00001.xml", "object 1", "has no <xmin>")),
    "non-numeric coordinate": (_edit_xml("00001", "<ymax>25</ymax>", "<ymax>2S</ymax>"),
                               ("00001.xml", "object 1", "<ymax> is not a number")),
    "inside-out box": (_edit_xml("00001", "<xmax>30</xmax>", "<xmax>5</xmax>"),
                       ("00001.xml", "object 1", "inside out")),
    "box outside the image": (_edit_xml("00003", "<xmin>3</xmin><ymin>4</ymin><xmax>13</xmax>",
                                        "<xmin>300</xmin><ymin>4</ymin><xmax>313</xmax>"),
                              ("00003.xml", "object 1 (vehicle)", "lies outside its 50x40 image")),
    "bad <difficult>": (_edit_xml("00001", "<difficult>1</difficult>", "<difficult>yes</difficult>"),
                        ("00001.xml", "object 2", "<difficult> must be 0 or 1")),
    "unknown class": (_edit_xml("00001", "<name>airplane</name>", "<name>zeppelin</name>"),
                      ("00001.xml", "object 2", "unknown class 'zeppelin'")),
    "size disagrees with the image": (lambda r: Image.new("RGB", (81, 60)).save(r / "JPEGImages-trainval" / "00001.jpg"),
                                      ("00001.xml", "the labels say 80x60 but 00001.jpg is 81x60")),
    "listed image without XML": (lambda r: _xml_path(r, "00002").unlink(),
                                 ("00002.xml", "no annotation for image 00002")),
    "XML without its image": (lambda r: (r / "JPEGImages-test" / "00003.jpg").unlink(),
                              ("00003.xml", "image 00003 (listed in test.txt) not found")),
    "truncated image": (_dior_truncated, ("00001.jpg", "cannot read image: truncated")),
    "unsupported image format": (_dior_gif, ("00001.gif", "unsupported image format '.gif'")),
    "id listed twice": (lambda r: (r / "ImageSets" / "Main" / "train.txt").write_text("00001\n00001\n"),
                        ("train.txt", "image 00001 is listed twice")),
}


@pytest.mark.parametrize("case", list(DIOR_CASES))
def test_dior_bad_input(tmp_path, case):
    make, needles = DIOR_CASES[case]
    root = _dior(tmp_path)
    make(root)
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "dior", root, "--out", out]), *needles)
    _nothing_written(out)


def test_dior_skip_bad(tmp_path):
    root = _dior(tmp_path)
    _edit_xml("00001", "<name>airplane</name>", "<name>zeppelin</name>")(root)  # one object of 00001
    _edit_xml("00003", "<xmax>13</xmax>", "<xmax>3</xmax>")(root)  # zero area: dropped in any case
    (root / "ImageSets" / "Main" / "val.txt").write_text("00002\n00004\n")  # 00004: neither XML nor image
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "dior", root, "--out", out, "--skip-bad", "--json", tmp_path / "s.json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    got = [(Path(e["file"]).name, e["item"], e["reason"], e["action"]) for e in summary["skipped"]]
    assert got == [("00001.xml", "object", "unknown class", "skipped"),
                   ("00004.xml", "image", "image without annotation", "skipped"),
                   ("00003.xml", "object", "zero-area object", "dropped")]
    assert "note: skipped object: " in result.stderr and "00001.xml: object 2: unknown class 'zeppelin'" in result.stderr
    assert "note: skipped image: " in result.stderr and "no annotation for image 00004" in result.stderr
    train = json.loads((out / "train.json").read_text())
    assert len(train["annotations"]) == 1 and [e["image"] for e in train["info"]["skipped"]] == ["00001"]
    val = json.loads((out / "val.json").read_text())
    assert [i["id"] for i in val["images"]] == [2] and [e["image"] for e in val["info"]["skipped"]] == ["00004"]
    trainval = json.loads((out / "trainval.json").read_text())
    assert [e["image"] for e in trainval["info"]["skipped"]] == ["00001", "00004"]
    test = json.loads((out / "test.json").read_text())
    assert test["annotations"] == [] and test["info"]["skipped"][0]["reason"] == "zero-area object"
    assert summary["splits"]["val"]["images"] == 1 and summary["splits"]["trainval"]["images"] == 2


def test_dior_skip_bad_empty_split_is_an_error(tmp_path):
    root = _dior(tmp_path)
    _xml_path(root, "00002").write_text("<annotation>")  # the only val image
    _one_line(_invoke(["--quiet", "prepare-data", "dior", root, "--out", tmp_path / "out", "--skip-bad"]),
              "val.txt", "no usable image left in split 'val'")
    _nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, mutate: Callable[[dict, Path], None] | None = None) -> tuple[Path, Path]:
    from test_coco_ingest import make_coco

    ann, images, data = make_coco(tmp_path)
    if mutate is not None:
        mutate(data, images)
        ann.write_text(json.dumps(data), encoding="utf-8")
    return ann, images


def _coco_truncated(data: dict, images: Path) -> None:
    Image.effect_noise((100, 80), 64).convert("RGB").save(images / "a.png")
    _truncate(images / "a.png")


COCO_CASES: dict[str, tuple[Callable[[dict, Path], None], tuple[str, ...]]] = {
    "duplicate image id": (lambda d, i: d["images"].append({"id": 7, "file_name": "a.png"}),
                           ("image id 7 appears twice",)),
    "duplicate annotation id": (lambda d, i: d["annotations"].append(
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]}), ("annotation id 1 appears twice",)),
    "duplicate category id": (lambda d, i: d["categories"].append({"id": 5, "name": "x"}),
                              ("category id 5 appears twice",)),
    "missing image file": (lambda d, i: d["images"].append({"id": 8, "file_name": "missing.png"}),
                           ("image 8: file 'missing.png' not found",)),
    "truncated image": (_coco_truncated, ("image 7: a.png: cannot read image",)),
    "unsupported image format": (lambda d, i: (Image.new("RGB", (9, 9)).save(i / "c.gif"),
                                               d["images"].append({"id": 10, "file_name": "c.gif"})),
                                 ("image 10: c.gif: unsupported image format GIF",)),
    "size disagrees with the image": (lambda d, i: d["images"][0].update(width=99), ("image 7: the JSON says 99x80",)),
    "negative box": (lambda d, i: d["annotations"][0].update(bbox=[1, 2, -3, 4]),
                     ("annotation 1: bbox width and height must not be negative",)),
    "non-numeric box": (lambda d, i: d["annotations"][0].update(bbox=[1, 2, "3", 4]),
                        ("annotation 1: bbox must be 4 numbers",)),
    "box outside the image": (lambda d, i: d["annotations"][0].update(bbox=[500, 2, 3, 4]),
                              ("annotation 1: bbox [500, 2, 3, 4] lies outside its 100x80 image",)),
    "unknown category id": (lambda d, i: d["annotations"].append(
        {"id": 98, "image_id": 7, "category_id": 4, "bbox": [1, 1, 2, 2]}), ("annotation 98 refers to category 4",)),
    "unknown image id": (lambda d, i: d["annotations"].append(
        {"id": 99, "image_id": 12, "category_id": 3, "bbox": [1, 1, 2, 2]}), ("annotation 99 refers to image 12",)),
    "image id not an integer": (lambda d, i: d["images"][0].update(id="7"),
                                ("image entry 1 ('a.png') has a missing or non-integer id",)),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_coco_bad_input(tmp_path, case):
    mutate, needles = COCO_CASES[case]
    ann, images = _coco(tmp_path, mutate)
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "coco", ann, "--images", images, "--out", out]), "instances.json: ", *needles)
    _nothing_written(out)


def test_coco_malformed_json_names_the_line(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text('{\n  "images": [,]\n}')
    _one_line(_invoke(["prepare-data", "coco", ann, "--images", tmp_path, "--out", tmp_path / "out"]),
              "bad.json:2: not valid JSON")
    _nothing_written(tmp_path / "out")


def test_coco_zero_size_box_dropped_and_reported(tmp_path):
    ann, images = _coco(tmp_path)  # annotation 3 of make_coco is [5, 5, 0, 4]
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "coco", ann, "--images", images, "--out", out])
    assert result.exit_code == 0, result.output
    assert "dropped annotation: " in result.stderr and "annotation 3: zero-size bbox [5, 5, 0, 4]" in result.stderr
    info = json.loads((out / "instances.json").read_text())["info"]
    assert [(e["reason"], e["action"]) for e in info["skipped"]] == [("zero-area object", "dropped")]
    assert [e["reason"] for e in info["repaired"]] == ["object partly outside image"]  # annotation 2, clipped


def test_coco_skip_bad(tmp_path):
    from pycocotools.coco import COCO

    def mutate(d: dict, images: Path) -> None:
        d["images"].append({"id": 9, "file_name": "a.png"})  # duplicate id 9: both 9s and their annotation go
        d["images"].append({"id": 11, "file_name": "gone.png"})
        d["annotations"][0]["bbox"] = [1, 2, -3, 4]
        d["annotations"].append({"id": 50, "image_id": 7, "category_id": 77, "bbox": [1, 1, 2, 2]})
        d["annotations"].append({"id": 51, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]})  # good

    ann, images = _coco(tmp_path, mutate)
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "coco", ann, "--images", images, "--out", out, "--skip-bad", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    got = [(e["item"], e["reason"], e["action"]) for e in summary["skipped"]]
    assert got == [("image", "duplicate id", "skipped"), ("image", "duplicate id", "skipped"),
                   ("image", "missing image", "skipped"), ("annotation", "bad box", "skipped"),
                   ("annotation", "unknown category", "skipped")]
    assert "annotation(s) left out with it" in summary["skipped"][0]["problem"]
    assert result.stderr.count("note: skipped ") == 5
    data = json.loads((out / "instances.json").read_text())
    assert [i["source_id"] for i in data["images"]] == [7]
    assert [a["bbox"] for a in data["annotations"]] == [[90.0, 70.0, 10.0, 10.0], [1.0, 1.0, 2.0, 2.0]]
    assert data["info"]["skipped"] == summary["skipped"]
    COCO(str(out / "instances.json"))


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("args, needles", [
    (["presets", "tiny-synthetic", "--set", "foo.bar=1"], ("tiny-synthetic: invalid config: foo: Extra inputs",)),
    (["presets", "tiny-synthetic", "--set", "train.nonsense=1"], ("train.nonsense: Extra inputs are not permitted",)),
    (["presets", "tiny-synthetic", "--set", "train.lr=-1"], ("train.lr: Input should be greater than 0",)),
    (["presets", "tiny-synthetic", "--set", "train.lr=fast"], ("train.lr: Input should be a valid number",)),
    (["presets", "tiny-synthetic", "--set", "train.lr"], ("expected KEY=VALUE",)),
    (["presets", "tiny-synthetic", "--set", "train.lr=1", "--set", "input.size=-3", "--set", "x=1"],
     ("input.size: Input should be greater than 0", "x: Extra inputs")),
    (["presets", "no-such-preset"], ("unknown preset 'no-such-preset'",)),
    (["presets", "PRESET_UNKNOWN_KEY"], ("mine.yaml: invalid config: colour: Extra inputs are not permitted",)),
    (["presets", "PRESET_BAD_YAML"], ("bad.yaml:4: not valid YAML",)),
    (["presets", "PRESET_NOT_MAPPING"], ("list.yaml: a preset must be a YAML mapping",)),
    (["presets", "MISSING.yaml"], ("MISSING.yaml: preset file not found",)),
])
def test_preset_errors(tmp_path, args, needles):
    from ds2d2_cli.config import presets_folder

    text = (presets_folder() / "tiny-synthetic.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text + "colour: blue\n")
    (tmp_path / "bad.yaml").write_text("name: x\ninput:\n  size: [1\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    subst = {"PRESET_UNKNOWN_KEY": tmp_path / "mine.yaml", "PRESET_BAD_YAML": tmp_path / "bad.yaml",
             "PRESET_NOT_MAPPING": tmp_path / "list.yaml", "MISSING.yaml": tmp_path / "MISSING.yaml"}
    result = _invoke([subst.get(a, a) for a in args])
    _one_line(result, *needles)
    assert result.stdout == ""


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoints(module_tmp) -> dict[str, Path]:
    """Tiny fake checkpoints (the loader checks metadata before any model is built) and a prepared split."""
    from safetensors.torch import save_file

    from ds2d2_cli.checkpoint import meta_for, save_checkpoint
    from ds2d2_cli.classes import SYNTHETIC
    from ds2d2_cli.config import load_config

    root = module_tmp("ckpt")
    config = load_config("tiny-synthetic")
    weights = {"w": torch.zeros(4)}
    paths = {
        "teacher": save_checkpoint(root / "teacher.safetensors", weights,
                                   meta_for("teacher", config, "teacher", SYNTHETIC, "tiny-synthetic")),
        "amplifier": save_checkpoint(root / "amplifier.safetensors", weights,
                                     meta_for("amplifier", config, "teacher", SYNTHETIC, "tiny-synthetic",
                                              teacher_sha256="0" * 64)),
    }
    save_file(weights, str(root / "plain.safetensors"))
    paths["plain"] = root / "plain.safetensors"
    (root / "notes.safetensors").write_text("hello, this is not a checkpoint at all")
    paths["text"] = root / "notes.safetensors"
    data = paths["teacher"].read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) - 5])
    paths["cut"] = root / "cut.safetensors"
    other = root / "data"
    other.mkdir()
    (other / "val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": n} for i, n in enumerate(["windmill", "dam"])]}))
    paths["data"] = other
    return paths


@pytest.mark.parametrize("which, extra, needles", [
    ("text", [], ("notes.safetensors: not a safetensors file",)),
    ("cut", [], ("cut.safetensors: truncated safetensors file",)),
    ("plain", [], ("plain.safetensors: a safetensors file, but not a ds2d2 checkpoint",)),
    ("amplifier", [], ("amplifier.safetensors: this is an amplifier checkpoint; expected a teacher or student",)),
    ("teacher", ["--data", "DATA"], ("val.json", "classes of teacher.safetensors", "do not match")),
    ("missing", [], ("missing.safetensors: checkpoint not found",)),
])
def test_checkpoint_errors(checkpoints, tmp_path, which, extra, needles):
    path = checkpoints.get(which, tmp_path / "missing.safetensors")
    extra = [checkpoints["data"] if a == "DATA" else a for a in extra]
    out = tmp_path / "eval.json"
    _one_line(_invoke(["eval", path, *extra, "--json", out]), *needles)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- where output goes


def _raise(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return fail


def test_output_folder_not_writable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (test_output_folder_refused covers it by simulation)")
    src = _dota(tmp_path / "train")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        _one_line(_invoke(_dota_args(src, out)), str(out), "Permission denied", code=1)
        ann, images = _coco(tmp_path / "c")
        _one_line(_invoke(["prepare-data", "coco", ann, "--images", images, "--out", out]), "Permission denied",
                  code=1)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def _prepare_args(kind: str, tmp_path) -> list:
    """`prepare-data KIND` of a small valid dataset under tmp_path into tmp_path/out."""
    if kind == "dota":
        return _dota_args(_dota(tmp_path / "train"), tmp_path / "out")
    if kind == "dior":
        return ["prepare-data", "dior", _dior(tmp_path), "--out", tmp_path / "out"]
    ann, images = _coco(tmp_path)
    return ["prepare-data", "coco", ann, "--images", images, "--out", tmp_path / "out"]


@pytest.mark.parametrize("kind", ["dota", "dior", "coco"])
def test_output_folder_refused(tmp_path, monkeypatch, kind):
    """The same as a read-only folder, simulated (so it runs as root too): temporary files cannot be made."""
    import tempfile

    args = _prepare_args(kind, tmp_path)
    monkeypatch.setattr(tempfile, "mkstemp", _raise(errno.EACCES))
    monkeypatch.setattr(tempfile, "mkdtemp", _raise(errno.EACCES))
    _one_line(_invoke(args), "out", "cannot write here: Permission denied", code=1)
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["dota", "coco", "synthetic", "train-teacher"])
def test_output_path_is_a_file(tmp_path, kind, tiny_data):
    """A write failure is exit 1 whichever command meets it (bad input is exit 2)."""
    (tmp_path / "out").write_text("I am a file")
    if kind == "dota":
        args = _dota_args(_dota(tmp_path / "train"), tmp_path / "out")
        needle = "output path exists and is not a folder"
    elif kind == "synthetic":
        args, needle = ["prepare-data", "synthetic", "--images", 2, "--out", tmp_path / "out" / "x"], "cannot write here"
    elif kind == "train-teacher":
        args = ["train-teacher", "--preset", "tiny-synthetic", "--data", tiny_data, "--out", tmp_path / "out" / "run"]
        needle = "cannot create the run folder"
    else:
        ann, images = _coco(tmp_path)
        args = ["prepare-data", "coco", ann, "--images", images, "--out", tmp_path / "out"]
        needle = "output path exists and is not a folder"  # every converter writes through one writer
    _one_line(_invoke(args), "out", needle, code=1)
    assert (tmp_path / "out").read_text() == "I am a file"


def test_disk_full_while_writing_patches(tmp_path, monkeypatch):
    src = _dota(tmp_path / "train")
    monkeypatch.setattr(Image.Image, "save", _raise(errno.ENOSPC))
    out = tmp_path / "out"
    _one_line(_invoke(_dota_args(src, out)), "out", "cannot write patch P1__1__0___0.png: No space left on device",
              code=1)
    _nothing_written(out)


@pytest.mark.parametrize("kind", ["dota", "dior", "coco"])
def test_disk_full_while_writing_json(tmp_path, monkeypatch, kind):
    """The disk fills up at the second JSON file (the first for COCO): no JSON appears, no temporary file stays."""
    args = _prepare_args(kind, tmp_path)
    real_dump, calls = json.dump, []

    def dump(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) == (1 if kind == "coco" else 2):
            fh.write("{\"partial\": ")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(obj, fh, *a, **k)

    monkeypatch.setattr(json, "dump", dump)
    _one_line(_invoke(args), ".json: cannot write: No space left on device", code=1)
    out = tmp_path / "out"
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.tmp"))
    if kind == "dota":
        assert not list(out.rglob("*.png"))  # patches are only moved into place after every split and JSON is ready


def _short_write(obj, path, *args, **kwargs):
    """What torch.save does when the disk fills up mid-file: part of the file, then a RuntimeError."""
    Path(path).write_bytes(b"PK\x03\x04 part of a checkpoint")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25896384 vs 25896272")


@pytest.mark.parametrize("free_mb, message, code", [
    (0, "checkpoints/last.pt: cannot write: no space left on device", 1),
    (10_000, "internal error: RuntimeError", 1),  # a short write with room left is not a full disk
])
def test_disk_full_while_writing_a_training_checkpoint(tiny_data, tmp_path, monkeypatch, free_mb, message, code):
    import shutil

    from conftest import TINY
    from ds2d2_cli import engine

    real_usage = shutil.disk_usage
    monkeypatch.setattr(engine.torch, "save", _short_write)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=free_mb << 20))
    out = tmp_path / "run"
    sets = [x for s in [*TINY, "train.max_iters=2"] for x in ("--set", s)]
    _one_line(_invoke(["train-teacher", "--preset", "tiny-synthetic", "--data", tiny_data, "--out", out, *sets]),
              message, code=code)
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoints/last.pt").exists()
    assert not (out / "model.safetensors").exists()
