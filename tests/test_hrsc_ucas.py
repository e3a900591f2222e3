"""HRSC2016 and UCAS-AOD converters: the formats as released, exact geometry, splits, tiling and bad input.

Fixtures are written like the real files: HRSC XML with the tags of MMRotate's sample
(tests/data/hrsc/FullDataSet/Annotations/100000006.xml), UCAS-AOD label lines as in the
release (13 tab-separated numbers in %e notation, a trailing tab; the first sample line of
ming71/UCAS-AOD-benchmark's README).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input import _invoke, _nothing_written, _one_line  # the CLI checks every converter's tests share

from ds2d2_cli.data.hrsc import CLASS_BY_ID, HRSC_CLASSES
from ds2d2_cli.data.tiling import window_origins
from ds2d2_cli.data.ucas import split_of



# --------------------------------------------------------------------------- helpers


def _image(path: Path, size=(80, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- HRSC2016 fixtures

# (cx, cy, w, h, angle, Class_ID): the corners below are worked out by hand in the tests.
BOX_A = ("40", "30", "20", "10", "0", "100000013")  # axis-aligned 20 x 10: Kuznetsov
BOX_B = ("20", "20", "4", "2", "1.5707963", "100000001")  # pi/2: the 4 px side turns vertical: ship
BOX_C = ("60", "20", "2.8284271", "2.8284271", "0.7853982", "100000027")  # pi/4: a diamond: submarine


def _hrsc_object(index: int, box: tuple[str, ...], difficult: int = 0) -> str:
    cx, cy, w, h, ang, class_id = box
    return f"""    <HRSC_Object>
      <Object_ID>10000000{index}</Object_ID>
      <Class_ID>{class_id}</Class_ID>
      <Object_NO>10000000{index}</Object_NO>
      <truncated>0</truncated>
      <difficult>{difficult}</difficult>
      <box_xmin>0</box_xmin>
      <box_ymin>0</box_ymin>
      <box_xmax>1</box_xmax>
      <box_ymax>1</box_ymax>
      <mbox_cx>{cx}</mbox_cx>
      <mbox_cy>{cy}</mbox_cy>
      <mbox_w>{w}</mbox_w>
      <mbox_h>{h}</mbox_h>
      <mbox_ang>{ang}</mbox_ang>
      <segmented>0</segmented>
      <seg_color>
      </seg_color>
      <header_x>0</header_x>
      <header_y>0</header_y>
    </HRSC_Object>
"""


def _hrsc_xml(image_id: str, objects: str, size=(80, 60)) -> str:
    """An annotation with the header and the tags of the released files (MMRotate's sample)."""
    return f"""<HRSC_Image>
  <Img_ID>{image_id}</Img_ID>
  <Place_ID>100000001</Place_ID>
  <Source_ID>100000001</Source_ID>
  <Img_NO>{image_id}</Img_NO>
  <Img_FileName>{image_id}</Img_FileName>
  <Img_FileFmt>bmp</Img_FileFmt>
  <Img_Date>1900-01-01</Img_Date>
  <Img_CusType>sealand</Img_CusType>
  <Img_Des>
  </Img_Des>
  <Img_Location>69.040297,33.070036</Img_Location>
  <Img_SizeWidth>{size[0]}</Img_SizeWidth>
  <Img_SizeHeight>{size[1]}</Img_SizeHeight>
  <Img_SizeDepth>3</Img_SizeDepth>
  <Img_Resolution>1.07</Img_Resolution>
  <Img_Resolution_Layer>18</Img_Resolution_Layer>
  <Img_Scale>100</Img_Scale>
  <Img_SclPxlNum>
  </Img_SclPxlNum>
  <segmented>0</segmented>
  <Img_Havemask>0</Img_Havemask>
  <Img_MaskFileName>
  </Img_MaskFileName>
  <Img_MaskFileFmt>
  </Img_MaskFileFmt>
  <Img_MaskType>
  </Img_MaskType>
  <Img_SegFileName>
  </Img_SegFileName>
  <Img_SegFileFmt>
  </Img_SegFileFmt>
  <Img_Rotation>000d</Img_Rotation>
  <Annotated>1</Annotated>
  <HRSC_Objects>
{objects}  </HRSC_Objects>
</HRSC_Image>"""


def _hrsc(root: Path, xmls: dict[str, str] | None = None, sets: dict[str, list[str]] | None = None) -> Path:
    """An HRSC2016 folder: 100000001 (objects A, B, C), 100000002 (no objects) in trainval; 100000003 (A) in test."""
    if xmls is None:
        xmls = {
            "100000001": _hrsc_xml("100000001", _hrsc_object(1, BOX_A) + _hrsc_object(2, BOX_B, difficult=1)
                                   + _hrsc_object(3, BOX_C)),
            "100000002": _hrsc_xml("100000002", ""),
            "100000003": _hrsc_xml("100000003", _hrsc_object(4, BOX_A)),
        }
    sets = sets if sets is not None else {"trainval": ["100000001", "100000002"], "test": ["100000003"]}
    for image_id, text in xmls.items():
        _image(root / "FullDataSet" / "AllImages" / f"{image_id}.bmp")
        (root / "FullDataSet" / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "FullDataSet" / "Annotations" / f"{image_id}.xml").write_text(text, encoding="utf-8")
    (root / "ImageSets").mkdir(parents=True, exist_ok=True)
    for split, ids in sets.items():
        (root / "ImageSets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return root


def _xml_line(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


# --------------------------------------------------------------------------- HRSC2016


def rotated_box_corners(cx, cy, w, h, angle):
    """An mbox's corners as the converter computes them (ds2d2_cli.rotated.rbox_to_poly)."""
    from ds2d2_cli.rotated import rbox_to_poly

    return rbox_to_poly(torch.tensor([cx, cy, w, h, angle], dtype=torch.float64)).numpy()


def test_rotated_box_corners_by_hand():
    # w=4, h=2 at angle pi/2: the w side (cos, sin) = (0, 1) turns vertical, the h side (-sin, cos) = (-1, 0)
    assert np.allclose(rotated_box_corners(10, 20, 4, 2, math.pi / 2), [[11, 18], [11, 22], [9, 22], [9, 18]])
    assert np.allclose(rotated_box_corners(10, 20, 4, 2, 0), [[8, 19], [12, 19], [12, 21], [8, 21]])
    # a positive angle turns clockwise on screen (y down): at pi/6 the w side points right and down
    corners = rotated_box_corners(0, 0, 2, 0, math.pi / 6)
    assert np.allclose(corners[1], [math.cos(math.pi / 6), 0.5])


def test_class_table_is_mmrotates():
    assert len(HRSC_CLASSES) == 31
    assert CLASS_BY_ID["100000013"] == "Kuznetsov"  # MMRotate's sample 100000006.xml: label 12 of 31 (0-based)
    assert HRSC_CLASSES.index("Kuznetsov") == 12
    assert "100000021" not in CLASS_BY_ID and "100000023" not in CLASS_BY_ID
    assert CLASS_BY_ID["100000033"] == "Invincible-class"


def test_hrsc_ship_task_whole_images(tmp_path):
    root = _hrsc(tmp_path / "HRSC2016")
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", out, "--json", tmp_path / "summary.json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["splits"]) == ["trainval", "test"]
    assert summary["splits"]["trainval"]["images"] == 2 and summary["splits"]["trainval"]["objects"] == 3
    assert summary["format"] == "hrsc2016" and summary["tiling"] is None

    data = json.loads((out / "trainval.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "ship"}]
    assert data["info"]["ds2d2"]["task"] == "ship"
    images = {i["id"]: i for i in data["images"]}
    assert [(i["width"], i["height"]) for i in images.values()] == [(80, 60), (80, 60)]
    assert (out / images[1]["file_name"]).resolve() == (root / "FullDataSet/AllImages/100000001.bmp").resolve()
    assert [a["image_id"] for a in data["annotations"]] == [1, 1, 1]  # 100000002 has none (empty HRSC_Objects)
    a, b, c = data["annotations"]
    # A: centre (40, 30), 20 x 10, angle 0 -> corners (30, 25) (50, 25) (50, 35) (30, 35)
    assert a["segmentation"] == [[30.0, 25.0, 50.0, 25.0, 50.0, 35.0, 30.0, 35.0]]
    assert a["bbox"] == [30.0, 25.0, 20.0, 10.0] and a["area"] == 200.0 and a["difficult"] == 0
    # B: centre (20, 20), w 4, h 2, angle pi/2: u = (0, 2), v = (-1, 0) -> (21, 18) (21, 22) (19, 22) (19, 18)
    assert b["segmentation"] == [[21.0, 18.0, 21.0, 22.0, 19.0, 22.0, 19.0, 18.0]]
    assert b["bbox"] == [19.0, 18.0, 2.0, 4.0] and b["area"] == 8.0 and b["difficult"] == 1
    # C: centre (60, 20), sides 2*sqrt(2), angle pi/4: u = (1, 1), v = (-1, 1) -> a diamond
    assert c["segmentation"] == [[60.0, 18.0, 62.0, 20.0, 60.0, 22.0, 58.0, 20.0]]
    assert c["bbox"] == [58.0, 18.0, 4.0, 4.0] and c["area"] == 8.0
    assert {x["category_id"] for x in data["annotations"]} == {1}

    test = json.loads((out / "test.json").read_text())
    assert len(test["images"]) == 1 and len(test["annotations"]) == 1


def test_hrsc_class_task_and_classes_filter(tmp_path):
    root = _hrsc(tmp_path / "HRSC2016")
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "out", "--task", "class"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "trainval.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(HRSC_CLASSES)
    names = {c["id"]: c["name"] for c in data["categories"]}
    # Class_IDs 100000013, 100000001, 100000027 -> table rows 13, 1 and 25 (ids 21 and 23 are not in it)
    assert [(a["category_id"], names[a["category_id"]]) for a in data["annotations"]] == [
        (13, "Kuznetsov"), (1, "ship"), (25, "submarine")]

    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "two", "--task", "class",
                      "--classes", "submarine,Kuznetsov", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["filtered"] == {"ship": 1}
    data = json.loads((tmp_path / "two" / "trainval.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["submarine", "Kuznetsov"]
    assert [a["category_id"] for a in data["annotations"]] == [2, 1]


def test_hrsc_real_sample_is_clipped_to_its_image(tmp_path):
    """MMRotate's sample object (100000006.xml, a 1172 x 816 image) reaches past the bottom border."""
    obj = _hrsc_object(6, ("341.2143", "443.3325", "778.4297", "178.2595", "-1.122944", "100000013"))
    root = _hrsc(tmp_path / "HRSC2016", {"100000006": _hrsc_xml("100000006", obj, (1172, 816))},
                 {"test": ["100000006"]})
    _image(root / "FullDataSet/AllImages/100000006.bmp", (1172, 816))
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "out", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"]["test"]["clipped"] == 1
    ann = json.loads((tmp_path / "out" / "test.json").read_text())["annotations"][0]
    corners = rotated_box_corners(341.2143, 443.3325, 778.4297, 178.2595, -1.122944)
    assert corners[:, 1].max() > 816  # the rotated box ends at y 832.8
    x, y, w, h = ann["bbox"]
    assert y + h == pytest.approx(816, abs=0.01) and x == pytest.approx(corners[:, 0].min(), abs=0.01)


def test_hrsc_shared_images_and_tiling(tmp_path):
    ids = ["100000001", "100000002", "100000003"]
    root = _hrsc(tmp_path / "HRSC2016", sets={"train": ids[:1], "val": ids[1:2], "trainval": ids[:2],
                                              "test": ids[2:]})
    out = tmp_path / "tiled"
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", out, "--split", "32", "--gap", "8", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["splits"]) == ["train", "val", "trainval", "test"]
    per_scene = len(window_origins(80, 60, 32, 8))  # x 0, 24, 48; y 0, 24, 28
    assert per_scene == 9
    assert [s["patches"] for s in summary["splits"].values()] == [9, 9, 18, 9]
    trainval = json.loads((out / "trainval.json").read_text())
    assert sorted({i["scene"] for i in trainval["images"]}) == ["100000001", "100000002"]
    assert all((out / i["file_name"]).is_file() for i in trainval["images"])
    scenes = json.loads((out / "trainval_scenes.json").read_text())
    assert [a["bbox"] for a in scenes["annotations"]] == [[30.0, 25.0, 20.0, 10.0], [19.0, 18.0, 2.0, 4.0],
                                                          [58.0, 18.0, 4.0, 4.0]]


def test_hrsc_skip_bad_object_is_listed_where_the_image_is(tmp_path):
    bad = _hrsc_object(2, ("20", "20", "abc", "2", "0", "100000001"))
    xmls = {"100000001": _hrsc_xml("100000001", _hrsc_object(1, BOX_A) + bad),
            "100000002": _hrsc_xml("100000002", "")}
    root = _hrsc(tmp_path / "HRSC2016", xmls, {"train": ["100000001"], "val": ["100000002"],
                                               "trainval": ["100000001", "100000002"]})
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "out", "--skip-bad", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_counts"] == {"malformed object": 1}
    for split in ("train", "trainval"):
        skipped = json.loads((tmp_path / "out" / f"{split}.json").read_text())["info"]["skipped"]
        assert [(e["line"], e["reason"]) for e in skipped] == [
            (_xml_line(root / "FullDataSet/Annotations/100000001.xml", "<mbox_w>abc"), "malformed object")]
    assert json.loads((tmp_path / "out" / "val.json").read_text())["info"]["skipped"] == []


def _hrsc_case(root: Path, case: str) -> tuple[list[str], tuple[str, ...]]:
    """Break the standard folder one way; (extra CLI args, what the error line must name)."""
    ann = root / "FullDataSet" / "Annotations"
    one = ann / "100000001.xml"
    text = one.read_text()
    if case == "missing image":
        (root / "FullDataSet/AllImages/100000002.bmp").unlink()
        return [], ("100000002.bmp", "image file not found")
    if case == "missing annotation":
        (ann / "100000002.xml").unlink()
        return [], ("100000002.xml", "annotation file not found")
    if case == "bad number":
        one.write_text(text.replace("<mbox_w>4</mbox_w>", "<mbox_w>4,5</mbox_w>"))
        return [], (f"100000001.xml:{_xml_line(one, '<mbox_w>4,5')}:", "HRSC_Object 2", "<mbox_w>", "'4,5'")
    if case == "missing field":
        one.write_text(text.replace("<mbox_ang>0</mbox_ang>", "", 1))
        return [], (f"100000001.xml:{_xml_line(one, '<HRSC_Object>')}:", "<mbox_ang> is missing")
    if case == "negative side":
        one.write_text(text.replace("<mbox_h>10</mbox_h>", "<mbox_h>-10</mbox_h>", 1))
        return [], (f"100000001.xml:{_xml_line(one, '<mbox_h>-10')}:", "must not be negative")
    if case == "unknown Class_ID":
        one.write_text(text.replace("100000027", "100000021"))
        return ["--task", "class"], (f"100000001.xml:{_xml_line(one, '100000021')}:", "unknown <Class_ID> '100000021'")
    if case == "object outside image":
        one.write_text(text.replace("<mbox_cx>60</mbox_cx>", "<mbox_cx>600</mbox_cx>"))
        # the line of its <HRSC_Object>, the one before its <Object_ID>
        return [], (f"100000001.xml:{_xml_line(one, '<Object_ID>100000003') - 1}:", "outside its 80x60 image")
    if case == "truncated image":
        _truncate(root / "FullDataSet/AllImages/100000003.bmp")
        return [], ("100000003.bmp", "cannot read image")
    if case == "malformed XML":
        one.write_text(text.replace("</Img_Des>", ""))
        return [], ("100000001.xml:", "not well-formed XML (mismatched tag")
    if case == "wrong root":
        one.write_text("<annotation>\n  <size/>\n</annotation>\n")
        return [], ("100000001.xml:1:", "root element is <annotation>")
    if case == "size mismatch":
        one.write_text(text.replace("<Img_SizeWidth>80<", "<Img_SizeWidth>100<"))
        return [], ("100000001.xml", "the labels say 100x60 but 100000001.bmp is 80x60")
    if case == "bad size":
        one.write_text(text.replace("<Img_SizeWidth>80<", "<Img_SizeWidth>eighty<"))
        return [], (f"100000001.xml:{_xml_line(one, 'eighty')}:", "whole number of pixels")
    if case == "duplicate id":
        (root / "ImageSets/test.txt").write_text("100000003\n100000003\n")
        return [], ("test.txt:2:", "listed twice")
    if case == "bad task":
        return ["--task", "L3"], ("--task must be one of ship, class",)
    raise AssertionError(case)


HRSC_CASES = ["missing image", "missing annotation", "bad number", "missing field", "negative side",
              "unknown Class_ID", "object outside image", "truncated image", "malformed XML", "wrong root",
              "size mismatch", "bad size", "duplicate id", "bad task"]


@pytest.mark.parametrize("case", HRSC_CASES)
def test_hrsc_bad_input(tmp_path, case):
    root = _hrsc(tmp_path / "HRSC2016")
    extra, needles = _hrsc_case(root, case)
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "hrsc2016", root, "--out", out, *extra]), *needles)
    _nothing_written(out)


def test_hrsc_layout_errors(tmp_path):
    _one_line(_invoke(["prepare-data", "hrsc2016", tmp_path / "nowhere", "--out", tmp_path / "o"]),
              "HRSC2016 folder not found")
    (tmp_path / "empty").mkdir()
    _one_line(_invoke(["prepare-data", "hrsc2016", tmp_path / "empty", "--out", tmp_path / "o"]),
              "no FullDataSet/AllImages/ folder", "official HRSC2016 layout")
    root = _hrsc(tmp_path / "HRSC2016", sets={})
    _one_line(_invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "o"]), "no image list")
    _one_line(_invoke(["prepare-data", "hrsc2016", root, "--out", root / "FullDataSet" / "x"]),
              "--out must be a folder of its own")
    _one_line(_invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "o", "--gap", "8"]),
              "--gap only applies when cutting scenes into patches")


# --------------------------------------------------------------------------- UCAS-AOD fixtures

# The first sample line of ming71/UCAS-AOD-benchmark's README (a CAR label), as the release writes it.
REAL_LINE = ("2.763971e+02\t9.125021e+01\t2.911375e+02\t3.823406e+01\t3.308891e+02\t4.928647e+01\t3.161486e+02\t"
             "1.023026e+02\t1.055379e+02\t2.787673e+02\t3.876027e+01\t4.975157e+01\t6.301615e+01\t")


def _ucas_line(x0: float, y0: float, x1: float, y1: float) -> str:
    """An axis-aligned box as a release line: corners, angle 0, then x y width height."""
    values = [x0, y0, x1, y0, x1, y1, x0, y1, 0.0, x0, y0, x1 - x0, y1 - y0]
    return "".join(f"{v:e}\t" for v in values)


def _ucas(root: Path, cars: int = 2, planes: int = 2, negs: int = 1, size=(80, 60)) -> Path:
    """CAR/P0001.. and PLANE/P0001.. (numbering restarts), each with one box; Neg/N0001.. without labels."""
    for folder, count, box in (("CAR", cars, (10, 20, 20, 24)), ("PLANE", planes, (30, 10, 50, 40))):
        for i in range(1, count + 1):
            _image(root / folder / f"P{i:04d}.png", size)
            (root / folder / f"P{i:04d}.txt").write_text(_ucas_line(*box) + "\n", encoding="utf-8")
    for i in range(1, negs + 1):
        _image(root / "Neg" / f"N{i:04d}.png", size)
    return root


# --------------------------------------------------------------------------- UCAS-AOD


def test_ucas_real_line_and_unique_names(tmp_path):
    root = _ucas(tmp_path / "UCAS_AOD", cars=1, planes=1, negs=1)
    _image(root / "CAR" / "P0001.png", (400, 200))
    (root / "CAR" / "P0001.txt").write_text(REAL_LINE + "\n" + _ucas_line(10, 20, 20, 24) + "\n")
    out = tmp_path / "out"
    # with one image per folder nothing goes to val; with 0.5 and two images per folder one does
    result = _invoke(["prepare-data", "ucas-aod", root, "--out", out])
    _one_line(result, "no image goes to val")
    _nothing_written(out)
    _image(root / "CAR" / "P0002.png")
    (root / "CAR" / "P0002.txt").write_text("")  # an empty label file: no objects
    result = _invoke(["prepare-data", "ucas-aod", root, "--out", out, "--val-fraction", "0.5", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "ucas-aod" and list(summary["splits"]) == ["train", "val"]
    both = {}
    for split in ("train", "val"):
        data = json.loads((out / f"{split}.json").read_text())
        assert [c["name"] for c in data["categories"]] == ["car", "airplane"]
        assert data["info"]["ds2d2"]["seed"] == 0 and data["info"]["ds2d2"]["val_fraction"] == 0.5
        for image in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            both[str(Path(image["file_name"]).relative_to(Path(image["file_name"]).parents[1]))] = anns
    assert sorted(both) == ["CAR/P0001.png", "CAR/P0002.png", "Neg/N0001.png", "PLANE/P0001.png"]
    assert both["Neg/N0001.png"] == []
    assert both["CAR/P0002.png"] == []
    real, box = both["CAR/P0001.png"]
    # the README's sample polygon, rounded to 0.01 px; its envelope as bbox (x0 + w = 330.89, y0 + h = 102.3)
    assert real["segmentation"] == [[276.4, 91.25, 291.14, 38.23, 330.89, 49.29, 316.15, 102.3]]
    assert real["bbox"] == [276.4, 38.23, 54.49, 64.07] and real["category_id"] == 1
    assert box["segmentation"] == [[10.0, 20.0, 20.0, 20.0, 20.0, 24.0, 10.0, 24.0]]
    assert box["bbox"] == [10.0, 20.0, 10.0, 4.0] and box["area"] == 40.0
    plane = both["PLANE/P0001.png"][0]
    assert plane["bbox"] == [30.0, 10.0, 20.0, 30.0] and plane["category_id"] == 2


def test_ucas_split_is_seeded_stratified_and_deterministic(tmp_path):
    root = _ucas(tmp_path / "UCAS_AOD", cars=5, planes=10, negs=5)

    def val_images(seed: int, out: Path) -> list[str]:
        result = _invoke(["prepare-data", "ucas-aod", root, "--out", out, "--seed", seed, "--split", "32",
                          "--gap", "8", "--json", "-"])
        assert result.exit_code == 0, result.output
        scenes = json.loads((out / "val_scenes.json").read_text())["images"]
        patches = json.loads((out / "val.json").read_text())["images"]
        names = sorted({p["scene"] for p in patches})
        assert len(names) == len(scenes)
        assert all(Path(p["file_name"]).name.startswith(p["scene"] + "__") for p in patches)
        return names

    first = val_images(0, tmp_path / "a")
    assert first == val_images(0, tmp_path / "b")  # same seed, same split
    # 20% of each folder: 1 of 5 cars, 2 of 10 planes, 1 of 5 negatives
    assert [sum(n.startswith(f) for n in first) for f in ("CAR_", "PLANE_", "Neg_")] == [1, 2, 1]
    assert val_images(1, tmp_path / "c") != first
    train = json.loads((tmp_path / "a" / "train_scenes.json").read_text())["images"]
    assert len(train) == 16
    patches = json.loads((tmp_path / "a" / "train.json").read_text())["images"]
    assert len(patches) == 16 * len(window_origins(80, 60, 32, 8))
    assert {"CAR_P0001", "PLANE_P0001"} <= {p["scene"] for p in patches} | set(first)


def test_split_of_by_hand():
    names = [f"CAR_P{i:04d}" for i in range(1, 11)]
    assert len(split_of(names, 0.2, 0)) == 2 and len(split_of(names, 0.25, 0)) == 3  # 2.5 rounds up
    assert split_of(names, 0.2, 7) == split_of(list(reversed(names)), 0.2, 7)  # the listing order does not matter
    assert split_of(["one"], 0.9, 0) == set()  # a folder never goes wholly to val


def _ucas_case(root: Path, case: str) -> tuple[list[str], tuple[str, ...]]:
    label = root / "CAR" / "P0001.txt"
    if case == "image without label file":
        label.unlink()
        return [], ("CAR/P0001.txt", "no label file for image P0001.png")
    if case == "label file without image":
        (root / "PLANE" / "P0002.png").unlink()
        return [], ("PLANE/P0002.txt", "label file without an image")
    if case == "bad number":
        label.write_text(_ucas_line(10, 20, 20, 24).replace("2.000000e+01", "2,0e+01", 1) + "\n")
        return [], ("CAR/P0001.txt:1:", "field 2 (y1) must be a finite number, got '2,0e+01'")
    if case == "wrong field count":
        label.write_text(_ucas_line(10, 20, 20, 24) + "\n" + "\t".join(_ucas_line(10, 20, 20, 24).split()[:12]) + "\n")
        return [], ("CAR/P0001.txt:2:", "expected 13 numbers", "got 12 fields")
    if case == "unknown class":
        return ["--classes", "dota-v1.0"], ("CAR/P0001.txt:1:", "unknown class 'car'")
    if case == "object outside image":
        label.write_text(_ucas_line(100, 20, 120, 24) + "\n")
        return [], ("CAR/P0001.txt:1:", "outside its 80x60 image")
    if case == "truncated image":
        _truncate(root / "PLANE" / "P0001.png")
        return [], ("PLANE/P0001.png", "cannot read image")
    if case == "objects in a negative image":
        (root / "Neg" / "N0001.txt").write_text(_ucas_line(10, 20, 20, 24) + "\n")
        return [], ("Neg/N0001.txt:1:", "negative images (no objects)")
    if case == "unsupported file":
        (root / "CAR" / "notes.doc").write_text("x")
        return [], ("CAR/notes.doc", "unsupported image format")
    if case == "bad val fraction":
        return ["--val-fraction", "1"], ("--val-fraction must be between 0 and 1",)
    raise AssertionError(case)


UCAS_CASES = ["image without label file", "label file without image", "bad number", "wrong field count",
              "unknown class", "object outside image", "truncated image", "objects in a negative image",
              "unsupported file", "bad val fraction"]


@pytest.mark.parametrize("case", UCAS_CASES)
def test_ucas_bad_input(tmp_path, case):
    root = _ucas(tmp_path / "UCAS_AOD")
    extra, needles = _ucas_case(root, case)
    out = tmp_path / "out"
    _one_line(_invoke(["prepare-data", "ucas-aod", root, "--out", out, "--val-fraction", "0.5", *extra]), *needles)
    _nothing_written(out)


def test_ucas_skip_bad_and_layout_errors(tmp_path):
    root = _ucas(tmp_path / "UCAS_AOD")
    (root / "CAR" / "P0001.txt").write_text(_ucas_line(10, 20, 20, 24) + "\nnot a line\n")
    (root / "PLANE" / "P0009.txt").write_text(_ucas_line(10, 20, 20, 24) + "\n")  # no P0009.png
    result = _invoke(["prepare-data", "ucas-aod", root, "--out", tmp_path / "out", "--val-fraction", "0.5",
                      "--skip-bad", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_counts"] == {"label file without image": 1, "malformed line": 1}
    for split in ("train", "val"):  # a file of no image is listed in both
        skipped = json.loads((tmp_path / "out" / f"{split}.json").read_text())["info"]["skipped"]
        assert "label file without image" in {e["reason"] for e in skipped}
    assert sum(s["objects"] for s in summary["splits"].values()) == 4

    _one_line(_invoke(["prepare-data", "ucas-aod", tmp_path / "nowhere", "--out", tmp_path / "o"]),
              "UCAS-AOD folder not found")
    (tmp_path / "empty" / "Neg").mkdir(parents=True)
    _one_line(_invoke(["prepare-data", "ucas-aod", tmp_path / "empty", "--out", tmp_path / "o"]),
              "no CAR/ or PLANE/ folder")
    _one_line(_invoke(["prepare-data", "ucas-aod", root, "--out", root / "CAR"]), "--out must be a folder of its own")


def test_error_on_line_100_is_printed_as_written(tmp_path):
    """rich would print ":100:" as an emoji: the consoles are made without emoji codes."""
    root = _ucas(tmp_path / "UCAS_AOD")
    (root / "CAR" / "P0001.txt").write_text((_ucas_line(10, 20, 20, 24) + "\n") * 99 + "1 2 3\n")
    _one_line(_invoke(["prepare-data", "ucas-aod", root, "--out", tmp_path / "out", "--val-fraction", "0.5"]),
              "CAR/P0001.txt:100: expected 13 numbers")
