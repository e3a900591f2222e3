"""DOTA splitting: devkit window origins, polygon clipping, the iof rule, label parsing, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds2d2_cli.classes import DOTA_V1_0
from ds2d2_cli.data.dota import (
    SplitStats,
    parse_dota_labels,
    prepare_dota,
    window_annotations,
    window_origins,
    window_starts,
)
from ds2d2_cli.data.polygons import clip_polygon, convex_hull, fix_bowtie, polygon_area
from ds2d2_cli.errors import InputError


def square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


# --------------------------------------------------------------------------- windows


def test_window_origins_devkit_example():
    # P0706 of the devkit example: 1111 x 1182 (w x h), 1024 / 200.
    assert window_starts(1111, 1024, 200) == [0, 87]
    assert window_starts(1182, 1024, 200) == [0, 158]
    assert window_origins(1111, 1182, 1024, 200) == [(0, 0), (0, 158), (87, 0), (87, 158)]


@pytest.mark.parametrize("length, expected", [
    (1, [0]),
    (500, [0]),  # smaller than a window: one window at 0 (the patch is padded)
    (1023, [0]),
    (1024, [0]),  # exactly one window
    (1025, [0, 1]),
    (1848, [0, 824]),  # 824 + 1024: the second window ends exactly at the border
    (1849, [0, 824, 825]),  # devkit quirk: the last window moved back next to the previous one
    (2672, [0, 824, 1648]),  # exact multiple of the step plus one window
    (3000, [0, 824, 1648, 1976]),
])
def test_window_starts(length, expected):
    assert window_starts(length, 1024, 200) == expected


def test_window_origins_small_image():
    assert window_origins(712, 557, 1024, 200) == [(0, 0)]


@pytest.mark.parametrize("size, gap", [(256, 256), (256, 300), (0, 0), (256, -1)])
def test_window_bad_gap(size, gap):
    with pytest.raises(InputError):
        window_starts(1000, size, gap)


# --------------------------------------------------------------------------- polygons


def test_polygon_area_and_clipping_exact():
    sq = square(0, 0, 10, 10)
    assert polygon_area(sq) == 100.0
    # half outside to the right -> 50, iof 0.5
    clipped = clip_polygon(square(5, 0, 15, 10), (0, 0, 10, 10))
    assert polygon_area(clipped) == pytest.approx(50.0)
    assert polygon_area(clipped) / polygon_area(square(5, 0, 15, 10)) == pytest.approx(0.5)
    # a corner: a quarter inside
    assert polygon_area(clip_polygon(square(5, 5, 15, 15), (0, 0, 10, 10))) == pytest.approx(25.0)
    # fully inside: unchanged
    assert polygon_area(clip_polygon(square(2, 3, 4, 8), (0, 0, 10, 10))) == pytest.approx(10.0)
    # fully outside and edge-touching: nothing
    assert len(clip_polygon(square(20, 20, 30, 30), (0, 0, 10, 10))) == 0
    assert polygon_area(clip_polygon(square(10, 0, 20, 10), (0, 0, 10, 10))) == 0.0
    # window inside the polygon: the window itself
    assert polygon_area(clip_polygon(square(-5, -5, 50, 50), (0, 0, 10, 10))) == pytest.approx(100.0)


def test_clip_rotated_diamond():
    # diamond centred at (10, 10) with half-diagonal 10: area 200; the box x <= 10 keeps half
    diamond = np.array([[10, 0], [20, 10], [10, 20], [0, 10]], dtype=np.float64)
    assert polygon_area(diamond) == pytest.approx(200.0)
    assert polygon_area(clip_polygon(diamond, (0, 0, 10, 20))) == pytest.approx(100.0)
    # the box [0, 5] x [0, 20] keeps the left triangle: base 10 (y 5..15), height 5 -> 25
    assert polygon_area(clip_polygon(diamond, (0, 0, 5, 20))) == pytest.approx(25.0)


def test_clip_concave_area():
    # L-shape of area 300 (20x20 minus a 10x10 corner); clip to x <= 10 keeps 200
    l_shape = np.array([[0, 0], [20, 0], [20, 10], [10, 10], [10, 20], [0, 20]], dtype=np.float64)
    assert polygon_area(l_shape) == pytest.approx(300.0)
    assert polygon_area(clip_polygon(l_shape, (0, 0, 10, 30))) == pytest.approx(200.0)
    assert polygon_area(clip_polygon(l_shape, (0, 0, 30, 5))) == pytest.approx(100.0)


def test_bowtie_becomes_hull():
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=np.float64)
    fixed = fix_bowtie(bowtie)
    assert polygon_area(fixed) == pytest.approx(100.0)
    ok = square(0, 0, 4, 4)
    assert fix_bowtie(ok) is not None and np.array_equal(fix_bowtie(ok), ok)
    assert len(convex_hull(np.array([[0, 0], [1, 1], [2, 2]]))) == 2


# --------------------------------------------------------------------------- the iof rule


def _one(poly, window, thr, partial):
    stats = SplitStats()
    anns = window_annotations([poly], [3], [1], window, thr, partial, stats, DOTA_V1_0)
    return anns, stats


def test_iof_rule_keep_drop_crowd():
    half = square(90, 0, 110, 20)  # half inside the window (0, 0, 100, 100): iof 0.5
    anns, stats = _one(half, (0, 0, 100, 100), 0.7, "drop")
    assert anns == [] and stats.dropped_iof == 1 and stats.crowd == 0
    anns, stats = _one(half, (0, 0, 100, 100), 0.7, "crowd")
    assert len(anns) == 1 and anns[0]["iscrowd"] == 1 and stats.crowd == 1 and stats.dropped_iof == 0
    assert anns[0]["bbox"] == [90.0, 0.0, 10.0, 20.0]
    anns, stats = _one(half, (0, 0, 100, 100), 0.5, "drop")  # iof >= thr: kept
    assert len(anns) == 1 and anns[0]["iscrowd"] == 0
    assert anns[0]["area"] == 200.0 and anns[0]["difficult"] == 1 and anns[0]["category_id"] == 3
    assert stats.annotations_per_class == {DOTA_V1_0[2]: 1}


def test_fully_inside_translated_and_touching_ignored():
    anns, stats = _one(square(60, 70, 80, 75), (50, 50, 150, 150), 0.7, "drop")
    assert anns[0]["bbox"] == [10.0, 20.0, 20.0, 5.0]
    assert anns[0]["segmentation"] == [[10.0, 20.0, 30.0, 20.0, 30.0, 25.0, 10.0, 25.0]]
    assert anns[0]["iscrowd"] == 0 and anns[0]["area"] == 100.0
    anns, stats = _one(square(150, 60, 160, 70), (50, 50, 150, 150), 0.7, "drop")  # touches the edge only
    assert anns == [] and stats.dropped_iof == 0 and stats.degenerate == 0


# --------------------------------------------------------------------------- labels


def test_parse_header_difficult_and_class_spelling(tmp_path):
    path = tmp_path / "P0001.txt"
    path.write_text(
        "imagesource:GoogleEarth\n"
        "gsd:0.146343590398\n"
        "10 10 20 10 20 20 10 20 Small-Vehicle 1\n"
        "\n"
        "30 30 40 30 40 40 30 40 plane 0\n"
        "50 50 60 50 60 60 50 60 ship\n",
        encoding="utf-8",
    )
    labels = parse_dota_labels(path, DOTA_V1_0)
    assert labels.imagesource == "GoogleEarth"
    assert labels.gsd == pytest.approx(0.146343590398)
    assert [(o.name, o.difficult, o.line) for o in labels.objects] == [
        ("small-vehicle", 1, 3), ("plane", 0, 5), ("ship", 0, 6)]
    assert labels.objects[0].poly.shape == (4, 2)


def test_parse_gsd_null(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("imagesource:GF2\ngsd:null\n", encoding="utf-8")
    labels = parse_dota_labels(path, DOTA_V1_0)
    assert labels.gsd is None and labels.imagesource == "GF2" and labels.objects == []


@pytest.mark.parametrize("line, needle", [
    ("1 2 3 4 5 6 7 ship 0", "must be numbers"),  # 7 coordinates + class + flag: shifted fields
    ("1 2 3 4 5 6 7 8", "got 8 fields"),
    ("1 2 3 4 5 6 7 x ship 0", "must be numbers"),
    ("1 2 3 4 5 6 7 8 ship 0 extra", "got 11 fields"),
    ("1 2 3 4 5 6 7 8 ship maybe", "difficult"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    path = tmp_path / "P0042.txt"
    path.write_text(f"imagesource:GoogleEarth\ngsd:0.1\n{line}\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        parse_dota_labels(path, DOTA_V1_0)
    assert f"P0042.txt:3: " in str(info.value)
    assert needle in str(info.value)


def test_unknown_class_names_file_and_line(tmp_path):
    path = tmp_path / "P0007.txt"
    path.write_text("1 1 5 1 5 5 1 5 ship 0\n1 1 5 1 5 5 1 5 container-crane 0\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        parse_dota_labels(path, DOTA_V1_0, "dota-v1.0")
    message = str(info.value)
    assert "P0007.txt:2:" in message and "container-crane" in message and "--classes" in message


# --------------------------------------------------------------------------- whole runs


def _scene(split_dir: Path, stem: str, size: tuple[int, int], lines: list[str] | None, value: int = 200) -> None:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 30)).save(split_dir / "images" / f"{stem}.png")
    if lines is not None:
        (split_dir / "labelTxt").mkdir(parents=True, exist_ok=True)
        (split_dir / "labelTxt" / f"{stem}.txt").write_text(
            "imagesource:GoogleEarth\ngsd:0.5\n" + "".join(f"{line}\n" for line in lines), encoding="utf-8")


def _tiny_dataset(root: Path) -> Path:
    _scene(root / "train", "A", (300, 200), [
        "10 10 40 10 40 40 10 40 plane 0",
        "230 100 290 100 290 150 230 150 ship 1",  # crosses the window at x=256
        "0 0 0 0 0 0 0 0 ship 0",  # degenerate
    ])
    _scene(root / "train", "B", (256, 256), ["100 100 120 100 120 130 100 130 harbor 0"], value=90)
    _scene(root / "val", "C", (120, 90), ["5 5 25 5 25 25 5 25 storage-tank 0"])
    _scene(root / "test", "D", (150, 150), None)
    return root


def test_prepare_tiny_dataset(tmp_path):
    from pycocotools.coco import COCO

    src = _tiny_dataset(tmp_path / "src")
    out = tmp_path / "out"
    summary = prepare_dota(src, out, size=256, gap=56)
    assert list(summary.splits) == ["train", "val", "test"]
    train = summary.splits["train"]
    # A: 300 x 200 -> left {0, 44}, top {0}; B: 256 x 256 -> one window
    assert train.scenes == 2 and train.patches == 3
    assert train.objects == 3 and train.degenerate == 1
    data = json.loads((out / "train.json").read_text())
    names = [img["file_name"] for img in data["images"]]
    assert names == ["train/images/A__1__0___0.png", "train/images/A__1__44___0.png", "train/images/B__1__0___0.png"]
    assert [img["id"] for img in data["images"]] == [1, 2, 3]
    first = data["images"][0]
    assert first["window"] == [0, 0] and first["scale"] == 1.0 and first["scene"] == "A"
    assert (first["scene_width"], first["scene_height"], first["scene_id"]) == (300, 200, 1)
    assert data["info"]["ds2d2"] == {"source": "dota", "classes": "dota-v1.0", "split": "train", "patch_size": 256,
                                     "gap": 56, "scales": [1.0], "iof_thr": 0.7, "partial": "drop",
                                     "padded": True, "labelled": True}
    assert [c["name"] for c in data["categories"]] == list(DOTA_V1_0)
    assert [c["id"] for c in data["categories"]] == list(range(1, 16))
    # the ship crossing x=256: iof (256-230)/60 < 0.7 in window 0 -> dropped; whole in window 44
    ships = [a for a in data["annotations"] if a["category_id"] == DOTA_V1_0.index("ship") + 1]
    assert len(ships) == 1 and ships[0]["image_id"] == 2 and ships[0]["bbox"] == [186.0, 100.0, 60.0, 50.0]
    assert ships[0]["difficult"] == 1
    assert train.dropped_iof == 1
    # patches are padded to 256 x 256 with zeros
    with Image.open(out / names[0]) as patch:
        assert patch.size == (256, 256)
        arr = np.asarray(patch)
    assert arr[:200, :256].min() > 0 and arr[200:].max() == 0
    COCO(str(out / "train.json"))  # loads in pycocotools
    scenes = json.loads((out / "train_scenes.json").read_text())
    assert [(i["id"], i["width"], i["height"], i["gsd"], i["imagesource"]) for i in scenes["images"]] == [
        (1, 300, 200, 0.5, "GoogleEarth"), (2, 256, 256, 0.5, "GoogleEarth")]
    assert (out / scenes["images"][0]["file_name"]).resolve() == (src / "train/images/A.png").resolve()
    assert len(scenes["annotations"]) == 3
    COCO(str(out / "train_scenes.json"))
    # the test split has no labels: image-only JSON
    test = json.loads((out / "test.json").read_text())
    assert len(test["images"]) == 1 and test["annotations"] == [] and not summary.splits["test"].labelled


def test_prepare_scales_and_crowd(tmp_path):
    src = _tiny_dataset(tmp_path / "src")
    out = tmp_path / "out"
    summary = prepare_dota(src / "train", out, size=256, gap=56, scales=[1.0, 0.5], partial="crowd")
    assert list(summary.splits) == ["train"]
    data = json.loads((out / "train.json").read_text())
    half = [img for img in data["images"] if img["scale"] == 0.5]
    assert [img["file_name"] for img in half] == ["train/images/A__0.5__0___0.png", "train/images/B__0.5__0___0.png"]
    plane = next(a for a in data["annotations"] if a["image_id"] == half[0]["id"] and a["category_id"] == 1)
    assert plane["bbox"] == [5.0, 5.0, 15.0, 15.0]
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [230.0, 100.0, 26.0, 50.0]
    assert summary.splits["train"].crowd == 1 and summary.splits["train"].dropped_iof == 0


def test_every_annotation_inside_its_patch(tmp_path):
    src = _tiny_dataset(tmp_path / "src")
    out = tmp_path / "out"
    prepare_dota(src, out, size=128, gap=32, scales=[1.0, 0.7])
    for split in ("train", "val"):
        data = json.loads((out / f"{split}.json").read_text())
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        assert data["annotations"]
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6


def test_workers_give_identical_output(tmp_path):
    src = _tiny_dataset(tmp_path / "src")
    prepare_dota(src, tmp_path / "one", size=128, gap=32, workers=1)
    prepare_dota(src, tmp_path / "two", size=128, gap=32, workers=2)
    for name in ("train.json", "train_scenes.json", "val.json", "test.json"):
        a = json.loads((tmp_path / "one" / name).read_text())
        b = json.loads((tmp_path / "two" / name).read_text())
        assert a == b, name


def test_failing_run_leaves_no_json(tmp_path):
    src = _tiny_dataset(tmp_path / "src")
    out = tmp_path / "out"
    prepare_dota(src, out, size=256, gap=56)
    assert (out / "train.json").is_file()
    # a corrupt image in the last split: the run fails after patches were written
    (src / "test" / "images" / "D.png").write_bytes(b"not a png")
    with pytest.raises(InputError) as info:
        prepare_dota(src, out, size=256, gap=56)
    assert "D.png" in str(info.value)
    assert sorted(p.name for p in out.glob("*.json")) == []
    assert not list(out.glob(".*.tmp"))


def test_bad_label_fails_before_writing(tmp_path):
    src = _tiny_dataset(tmp_path / "src")
    (src / "val" / "labelTxt" / "C.txt").write_text("1 2 3\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        prepare_dota(src, out, size=256, gap=56)
    assert "C.txt:1:" in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("kwargs", [
    {"size": 256, "gap": 256}, {"scales": [0.0]}, {"iof_thr": 0.0}, {"partial": "keep"}, {"classes": "nope"},
    {"workers": -1},
])
def test_bad_options(tmp_path, kwargs):
    src = _tiny_dataset(tmp_path / "src")
    with pytest.raises(InputError):
        prepare_dota(src, tmp_path / "out", **kwargs)


def test_missing_source_and_missing_label(tmp_path):
    with pytest.raises(InputError, match="not found"):
        prepare_dota(tmp_path / "nowhere", tmp_path / "out")
    src = _tiny_dataset(tmp_path / "src")
    (src / "train" / "labelTxt" / "B.txt").unlink()
    with pytest.raises(InputError, match="no label file for image B.png"):
        prepare_dota(src, tmp_path / "out")


def test_clipping_is_additive_over_random_rotated_boxes():
    # area inside [0,100]^2 == area inside its left half + area inside its right half,
    # and the whole polygon's area when the box contains it
    rng = np.random.default_rng(0)
    for _ in range(200):
        cx, cy = rng.uniform(-20, 120, size=2)
        length, width, theta = rng.uniform(1, 60), rng.uniform(1, 30), rng.uniform(0, np.pi)
        u = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [length / 2, width / 2]
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        poly = u @ rot.T + [cx, cy]
        whole = polygon_area(clip_polygon(poly, (0, 0, 100, 100)))
        split = polygon_area(clip_polygon(poly, (0, 0, 37, 100))) + polygon_area(clip_polygon(poly, (37, 0, 100, 100)))
        assert whole == pytest.approx(split, abs=1e-6)
        assert polygon_area(clip_polygon(poly, (-1e4, -1e4, 1e4, 1e4))) == pytest.approx(length * width)
        assert whole <= length * width + 1e-6
