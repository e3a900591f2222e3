"""DIOR VOC XML -> COCO: layout discovery, class-name normalisation, box convention, size checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ds2d2_cli.classes import DIOR
from ds2d2_cli.data.dior import parse_voc_xml, prepare_dior
from ds2d2_cli.errors import InputError


def _xml(width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int], int | None]]) -> str:
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        diff = f"<difficult>{difficult}</difficult>" if difficult is not None else ""
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose>{diff}<bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def make_dior(root: Path, official: bool = True) -> Path:
    ann = root / "Annotations" / "Horizontal Bounding Boxes" if official else root / "Annotations"
    ann.mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    trainval = root / ("JPEGImages-trainval" if official else "JPEGImages")
    test = root / ("JPEGImages-test" if official else "JPEGImages")
    trainval.mkdir(exist_ok=True)
    test.mkdir(exist_ok=True)
    scenes = {
        "00001": (trainval, 80, 60, [("Expressway-Service-area", (10, 5, 30, 25), 0), ("airplane", (0, 0, 8, 8), 1)]),
        "00002": (trainval, 64, 64, [("golffield", (1, 2, 60, 63), None), ("Expressway-toll-station", (5, 5, 9, 70), 0)]),
        "00003": (test, 50, 40, [("vehicle", (3, 4, 13, 9), 0)]),
    }
    for stem, (folder, w, h, objects) in scenes.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(folder / f"{stem}.jpg")
        (ann / f"{stem}.xml").write_text(_xml(w, h, objects), encoding="utf-8")
    for split, ids in (("train", ["00001"]), ("val", ["00002"]), ("test", ["00003"])):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return root


def test_parse_voc_xml_normalises_class_names(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml(100, 90, [("Expressway-Service-area", (1, 2, 3, 4), 1), ("golf-field", (5, 6, 7, 8), None),
                                   ("Expressway-toll-station", (0, 0, 9, 9), 0), ("baseball field", (1, 1, 2, 2), 0)]),
                    encoding="utf-8")
    info = parse_voc_xml(path)
    assert (info["width"], info["height"]) == (100, 90)
    assert [(o["name"], o["box"], o["difficult"]) for o in info["objects"]] == [
        ("expressway-service-area", (1.0, 2.0, 3.0, 4.0), 1),
        ("golffield", (5.0, 6.0, 7.0, 8.0), 0),
        ("expressway-toll-station", (0.0, 0.0, 9.0, 9.0), 0),
        ("baseballfield", (1.0, 1.0, 2.0, 2.0), 0),
    ]


def test_parse_voc_xml_errors(tmp_path):
    bad_class = tmp_path / "b.xml"
    bad_class.write_text(_xml(10, 10, [("spaceship", (1, 1, 2, 2), 0)]), encoding="utf-8")
    with pytest.raises(InputError, match="spaceship") as info:
        parse_voc_xml(bad_class)
    assert "b.xml" in str(info.value)
    broken = tmp_path / "c.xml"
    broken.write_text("<annotation><size>", encoding="utf-8")
    with pytest.raises(InputError, match="not valid XML"):
        parse_voc_xml(broken)
    no_box = tmp_path / "d.xml"
    no_box.write_text("<annotation><size><width>4</width><height>4</height></size>"
                      "<object><name>dam</name></object></annotation>", encoding="utf-8")
    with pytest.raises(InputError, match="no <bndbox>"):
        parse_voc_xml(no_box)


@pytest.mark.parametrize("official", [True, False])
def test_prepare_dior(tmp_path, official):
    from pycocotools.coco import COCO

    root = make_dior(tmp_path / "DIOR", official)
    out = tmp_path / "out"
    summary = prepare_dior(root, out)
    assert set(summary.splits) == {"train", "val", "trainval", "test"}
    for split in ("train", "val", "trainval", "test"):
        assert (out / f"{split}.json").is_file()
        COCO(str(out / f"{split}.json"))
    train = json.loads((out / "train.json").read_text())
    assert [c["name"] for c in train["categories"]] == list(DIOR)
    assert [c["id"] for c in train["categories"]] == list(range(1, 21))
    (img,) = train["images"]
    assert img["id"] == 1 and (img["width"], img["height"]) == (80, 60)
    assert (out / img["file_name"]).resolve() == next(root.glob("JPEGImages*/00001.jpg")).resolve()
    esa = DIOR.index("expressway-service-area") + 1
    assert [(a["category_id"], a["bbox"], a["difficult"]) for a in train["annotations"]] == [
        (esa, [10.0, 5.0, 20.0, 20.0], 0), (DIOR.index("airplane") + 1, [0.0, 0.0, 8.0, 8.0], 1)]
    trainval = json.loads((out / "trainval.json").read_text())
    assert [i["id"] for i in trainval["images"]] == [1, 2]
    # 00002's toll station reaches y=70 in a 64 px image: clipped
    toll = [a for a in trainval["annotations"] if a["category_id"] == DIOR.index("expressway-toll-station") + 1]
    assert toll[0]["bbox"] == [5.0, 5.0, 4.0, 59.0]
    assert summary.splits["val"].clipped == 1
    test = json.loads((out / "test.json").read_text())
    assert test["images"][0]["id"] == 3 and len(test["annotations"]) == 1
    assert test["info"]["ds2d2"]["split"] == "test"


def test_size_mismatch(tmp_path):
    root = make_dior(tmp_path / "DIOR")
    Image.new("RGB", (81, 60)).save(root / "JPEGImages-trainval" / "00001.jpg")
    with pytest.raises(InputError) as info:
        prepare_dior(root, tmp_path / "out")
    message = str(info.value)
    assert "00001.xml" in message and "80x60" in message and "81x60" in message
    assert not (tmp_path / "out").exists()


def test_missing_pieces(tmp_path):
    with pytest.raises(InputError, match="not found"):
        prepare_dior(tmp_path / "nowhere", tmp_path / "out")
    root = make_dior(tmp_path / "DIOR")
    (root / "JPEGImages-test" / "00003.jpg").unlink()
    with pytest.raises(InputError, match="image 00003"):
        prepare_dior(root, tmp_path / "out")
    root2 = make_dior(tmp_path / "DIOR2")
    (root2 / "Annotations" / "Horizontal Bounding Boxes" / "00002.xml").unlink()
    with pytest.raises(InputError, match="no annotation for image 00002"):
        prepare_dior(root2, tmp_path / "out")


def test_prepare_dior_tiled_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from ds2d2_cli.cli.app import app

    root = make_dior(tmp_path / "DIOR")
    out = tmp_path / "DIOR-64"
    result = CliRunner().invoke(app, ["prepare-data", "dior", str(root), "--out", str(out), "--split", "64", "--gap",
                                      "16", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["format"] == "dior" and summary["tiling"]["patch_size"] == 64
    assert {s: v["patches"] for s, v in summary["splits"].items()} == {"train": 2, "val": 1, "trainval": 3, "test": 1}
    train = json.loads((out / "train.json").read_text())
    # 00001 is 80x60: windows at x 0 and 16 (80 - 64); the service area (10..30) keeps 14 of its 20 px in the
    # second: iof 0.7, kept (the threshold is inclusive)
    assert [(i["scene"], i["window"]) for i in train["images"]] == [("00001", [0, 0]), ("00001", [16, 0])]
    esa = DIOR.index("expressway-service-area") + 1
    assert [(a["image_id"], a["category_id"], a["bbox"], a["difficult"]) for a in train["annotations"]] == [
        (1, esa, [10.0, 5.0, 20.0, 20.0], 0), (1, DIOR.index("airplane") + 1, [0.0, 0.0, 8.0, 8.0], 1),
        (2, esa, [0.0, 5.0, 14.0, 20.0], 0)]
    scenes = json.loads((out / "trainval_scenes.json").read_text())
    assert [i["id"] for i in scenes["images"]] == [1, 2]  # DIOR's own numbers


def test_prepare_dior_class_list(tmp_path):
    from ds2d2_cli.classes import class_choice

    root = make_dior(tmp_path / "DIOR")
    summary = prepare_dior(root, tmp_path / "out", classes=class_choice("[vehicle, Expressway-Service-area]"))
    assert summary.filtered == {"airplane": 1, "expressway-toll-station": 1, "golffield": 1}
    trainval = json.loads((tmp_path / "out" / "trainval.json").read_text())
    assert [c["name"] for c in trainval["categories"]] == ["vehicle", "Expressway-Service-area"]
    assert [(a["category_id"], a["bbox"]) for a in trainval["annotations"]] == [(2, [10.0, 5.0, 20.0, 20.0])]
