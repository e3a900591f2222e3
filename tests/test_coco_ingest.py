"""`prepare-data coco`: validation errors name the file and the offending id; remapping; clipping."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from ds2d2_cli.classes import DIOR
from ds2d2_cli.data.coco import ingest_coco
from ds2d2_cli.errors import InputError


def make_coco(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (100, 80)).save(images / "a.png")
    Image.new("RGB", (50, 50)).save(images / "sub" / "b.jpg")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 9, "file_name": "sub/b.jpg"}],
        "categories": [{"id": 5, "name": "Vehicle"}, {"id": 3, "name": "airplane"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [90, 70, 11, 10.5]},  # overflows 1 / 0.5 px: clipped
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [5, 5, 0, 4]},  # no area: dropped
            {"id": 4, "image_id": 9, "category_id": 5, "bbox": [1, 2, 3, 4], "iscrowd": 1,
             "segmentation": [[1, 2, 4, 2, 4, 6, 1, 6]]},
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data), encoding="utf-8")
    return ann, images, data


def test_ingest_default_order(tmp_path):
    from pycocotools.coco import COCO

    ann, images, _ = make_coco(tmp_path)
    out = tmp_path / "out"
    summary = ingest_coco(ann, images, out)
    path = out / "instances.json"
    assert summary.out == str(path)
    data = json.loads(path.read_text())
    assert data["categories"] == [{"id": 1, "name": "airplane"}, {"id": 2, "name": "Vehicle"}]  # by original id
    assert [(i["id"], i["source_id"], i["width"], i["height"]) for i in data["images"]] == [(1, 7, 100, 80), (2, 9, 50, 50)]
    assert (out / data["images"][1]["file_name"]).resolve() == (images / "sub" / "b.jpg").resolve()
    anns = data["annotations"]
    assert [(a["id"], a["image_id"], a["category_id"], a["bbox"]) for a in anns] == [
        (1, 1, 2, [10.0, 10.0, 20.0, 30.0]), (2, 1, 1, [90.0, 70.0, 10.0, 10.0]), (3, 2, 2, [1.0, 2.0, 3.0, 4.0])]
    assert anns[0]["area"] == 600 and anns[1]["area"] == 100.0 and anns[2]["iscrowd"] == 1
    assert anns[2]["segmentation"] == [[1, 2, 4, 2, 4, 6, 1, 6]]
    assert (summary.images, summary.objects, summary.clipped, summary.degenerate) == (2, 3, 1, 1)
    COCO(str(path))


def test_ingest_class_set_and_name(tmp_path):
    ann, images, _ = make_coco(tmp_path)
    ingest_coco(ann, images, tmp_path / "out", name="train", classes="dior")
    data = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(DIOR)
    assert data["annotations"][0]["category_id"] == DIOR.index("vehicle") + 1
    assert data["info"]["ds2d2"]["classes"] == "dior" and data["info"]["ds2d2"]["split"] == "train"
    with pytest.raises(InputError, match="not a class of dota-v1.0"):
        ingest_coco(ann, images, tmp_path / "out", classes="dota-v1.0")


def _broken(tmp_path: Path, mutate) -> tuple[Path, Path]:
    ann, images, data = make_coco(tmp_path)
    data = copy.deepcopy(data)
    mutate(data)
    ann.write_text(json.dumps(data), encoding="utf-8")
    return ann, images


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["annotations"].append({"id": 99, "image_id": 12, "category_id": 3, "bbox": [1, 1, 2, 2]}),
     "annotation 99 refers to image 12"),
    (lambda d: d["annotations"].append({"id": 98, "image_id": 7, "category_id": 4, "bbox": [1, 1, 2, 2]}),
     "annotation 98 refers to category 4"),
    (lambda d: d["annotations"].append({"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]}),
     "annotation id 1 appears twice"),
    (lambda d: d["images"].append({"id": 7, "file_name": "a.png"}), "image id 7 appears twice"),
    (lambda d: d["images"].append({"id": 8, "file_name": "missing.png"}), "image 8: file 'missing.png' not found"),
    (lambda d: d["images"][0].update(width=99), "image 7: the JSON says 99x80"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1: bbox must be 4 numbers"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "annotation 1: bbox width and height must not"),
    (lambda d: d["annotations"][0].update(bbox=[500, 2, 3, 4]), "annotation 1: bbox [500, 2, 3, 4] lies outside"),
    (lambda d: d["annotations"][0].update(bbox=[90, 2, 40, 4]), "lies outside its 100x80 image"),
    (lambda d: d["categories"].append({"id": 5, "name": "x"}), "category id 5 appears twice"),
    (lambda d: d.pop("images"), "not a COCO detection file"),
])
def test_ingest_errors_name_file_and_id(tmp_path, mutate, needle):
    ann, images = _broken(tmp_path, mutate)
    with pytest.raises(InputError) as info:
        ingest_coco(ann, images, tmp_path / "out")
    assert str(info.value).startswith(f"{ann}: ")
    assert needle in str(info.value)
    assert not (tmp_path / "out" / "instances.json").exists()


def test_ingest_unreadable_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"images\": [,]\n}", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.json:2: not valid JSON"):
        ingest_coco(bad, tmp_path, tmp_path / "out")
    with pytest.raises(InputError, match="image folder not found"):
        ann, _, _ = make_coco(tmp_path)
        ingest_coco(ann, tmp_path / "nope", tmp_path / "out")


def test_a_given_area_that_rounds_to_zero_is_replaced_by_the_box_area(tmp_path):
    """Found by the fuzz test: a 1 x 1 box whose file says area 0.0039 must not be written with area 0."""
    ann, images, data = make_coco(tmp_path)
    data["annotations"] = [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 1, 1.0], "area": 0.00390625}]
    ann.write_text(json.dumps(data), encoding="utf-8")
    ingest_coco(ann, images, tmp_path / "out")
    (written,) = json.loads((tmp_path / "out" / "instances.json").read_text())["annotations"]
    assert written["bbox"] == [0.0, 0.0, 1.0, 1.0] and written["area"] == 1.0
