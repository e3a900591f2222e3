"""Oriented boxes in prepared data (`--boxes obb`): the devkit's outlines for cut objects, the `rbox`
field (le90), every converter that has oriented boxes, the refusals, and the dataset's rboxes.

The cut-object cases are worked by hand from the rules of the DOTA devkit's ImgSplit
(`splitbase.savepatches`); the real-sample cases are lines the devkit itself wrote for the
sample (ImgSplit.py run on it with subsize 512, gap 128).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import _invoke, _nothing_written, _one_line
from test_hrsc_ucas import _hrsc, _ucas
from test_prepare_cli import _sample
from test_yolo import make_yolo
from torchvision import tv_tensors

from ds2d2_cli.data.coco_writer import rbox_field
from ds2d2_cli.data.dataset import DetectionDataset, augment_rboxes, load_coco_split
from ds2d2_cli.data.dota import prepare_dota
from ds2d2_cli.data.polygons import polygon_area
from ds2d2_cli.data.tiling import SplitStats, devkit_outline, four_from_five, window_annotations
from ds2d2_cli.errors import InputError
from ds2d2_cli.rotated import poly_to_rbox, rbox_envelope, rbox_to_poly

HALF_PI = round(math.pi / 2, 6)  # 1.570796
QUARTER_PI = round(math.pi / 4, 6)  # 0.785398


def _cut(poly, window=(0, 0, 100, 100), thr=0.7, boxes="obb", size=100):
    stats = SplitStats()
    anns = window_annotations([np.array(poly, dtype=np.float64)], [1], [0], window, thr, "drop", stats,
                              boxes=boxes, patch_size=size)
    return anns, stats


def _corners(rbox) -> np.ndarray:
    return rbox_to_poly(torch.tensor(rbox, dtype=torch.float64)).numpy()


def _same_corners(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    """The same 4 points, in any order."""
    return all(np.abs(b - p).max(axis=1).min() <= atol for p in a) and len(a) == len(b)


# --------------------------------------------------------------------------- the devkit's rules, by hand


def test_five_corner_piece_loses_its_shortest_edge():
    # A(60,20) B(104,30) C(96,80) D(50,70); x <= 100 cuts off B: A->B meets x=100 at y = 20 + 10*40/44, B->C at
    # y = 55. Edges: A-P 41.0, P-Q 25.9, Q-C 25.3 (shortest), C-D 47.1, D-A 51.0 -> Q, C become (98, 67.5).
    anns, stats = _cut([(60, 20), (104, 30), (96, 80), (50, 70)])
    (ann,) = anns
    p_y = round(20 + 10 * 40 / 44, 2)
    assert ann["segmentation"] == [[60.0, 20.0, 100.0, p_y, 98.0, 67.5, 50.0, 70.0]]
    assert ann["bbox"] == [50.0, 20.0, 50.0, 50.0]
    # the outline's own area: (-254.55 + 3899.09 + 3485 - 3200) / 2 with P's y unrounded (29.0909...)
    assert ann["area"] == 1964.77
    assert ann["rbox"] == rbox_field(ann["segmentation"][0])
    assert stats.annotations == 1 and stats.dropped_shape == 0
    # the rule alone: the first of equal shortest edges, the closing edge (4 -> 0) included
    square5 = np.array([[0, 0], [1, 0], [1, 1], [0.5, 1.5], [0, 1]], dtype=np.float64)  # edges 1, 1, .71, .71, 1
    assert four_from_five(square5).tolist() == [[0, 0], [1, 0], [0.75, 1.25], [0, 1]]
    closing = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 1]], dtype=np.float64)  # edge 4: (0,1) -> (0,0)
    assert four_from_five(closing).tolist() == [[4, 0], [4, 4], [0, 4], [0, 0.5]]


def test_triangle_and_six_corner_pieces_are_left_out_in_obb_only():
    diamond = [(80, 50), (100, 30), (120, 50), (100, 70)]  # x <= 100 leaves the triangle (80,50) (100,30) (100,70)
    anns, stats = _cut(diamond, thr=0.4)
    assert anns == [] and stats.dropped_shape == 1
    assert len(_cut(diamond, thr=0.4, boxes="hbb")[0]) == 1  # horizontal boxes keep the piece, as before
    wide = [(-5, 50), (50, 30), (105, 50), (50, 70)]  # both tips cut off: a hexagon, iof 0.98
    anns, stats = _cut(wide)
    assert anns == [] and stats.dropped_shape == 1 and stats.dropped_iof == 0
    assert len(_cut(wide, boxes="hbb")[0]) == 1


def test_cut_outline_is_clamped_to_one_whole_objects_are_not():
    # a 50 x 40 box reaching 10 px left of the window: cut at x = 0, clamped to x = 1 (iof 0.8)
    (ann,), _ = _cut([(-10, 20), (40, 20), (40, 60), (-10, 60)])
    assert ann["segmentation"] == [[1.0, 20.0, 40.0, 20.0, 40.0, 60.0, 1.0, 60.0]]
    assert ann["bbox"] == [1.0, 20.0, 39.0, 40.0] and ann["area"] == 1560.0
    # 39 wide, 40 high: w is the vertical side, theta -pi/2
    assert ann["rbox"] == [20.5, 40.0, 40.0, 39.0, -HALF_PI]
    # the same in a window at (200, 300): patch pixels
    (moved,), _ = _cut([(190, 320), (240, 320), (240, 360), (190, 360)], window=(200, 300, 300, 400))
    assert moved["segmentation"] == ann["segmentation"] and moved["rbox"] == ann["rbox"]
    # wholly inside, touching the window's edge: the devkit writes it as it is
    (whole,), _ = _cut([(0, 10), (20, 10), (20, 30), (0, 30)])
    assert whole["segmentation"] == [[0.0, 10.0, 20.0, 10.0, 20.0, 30.0, 0.0, 30.0]]
    assert whole["rbox"] == [10.0, 20.0, 20.0, 20.0, 0.0]


def test_outline_starts_where_it_best_fits_the_object_and_turns_positive():
    # the object listed counter-clockwise on screen (negative shoelace): the piece is turned, then started
    # at the corner nearest the object's first corner
    poly = np.array([(-10, 60), (40, 60), (40, 20), (-10, 20)], dtype=np.float64)
    piece = np.array([(0, 60), (40, 60), (40, 20), (0, 20)], dtype=np.float64)
    out = devkit_outline(piece, poly, np.array([0.0, 0.0]), 100)
    # turned positive: (0,60) (0,20) (40,20) (40,60). Summed squared distances to the object's corners of
    # the rotations starting at (0,60): 7400, (0,20): 1700+1600+1600+1700 = 6600, (40,20): 7400, (40,60): 8200
    assert out.tolist() == [[1, 20], [40, 20], [40, 60], [1, 60]]


def test_rbox_of_known_rectangles():
    assert rbox_field([30, 25, 50, 25, 50, 35, 30, 35]) == [40.0, 30.0, 20.0, 10.0, 0.0]
    assert rbox_field([21, 18, 21, 22, 19, 22, 19, 18]) == [20.0, 20.0, 4.0, 2.0, -HALF_PI]  # upright: -pi/2
    # a square turned 45 degrees: a square takes theta in [-pi/4, pi/4); at the very edge of that range the
    # float sums decide between the two forms of the same square (here pi/4 less an ulp, rounded)
    assert rbox_field([60, 18, 62, 20, 60, 22, 58, 20]) in ([60.0, 20.0, 2.83, 2.83, -QUARTER_PI],
                                                            [60.0, 20.0, 2.83, 2.83, QUARTER_PI])
    # a 10 x 4 box turned by atan(3/4) clockwise on screen: w along (0.8, 0.6)
    c = np.array([50.0, 40.0])
    u, v = 5 * np.array([0.8, 0.6]), 2 * np.array([-0.6, 0.8])
    corners = np.stack([c - u - v, c + u - v, c + u + v, c - u + v])
    assert rbox_field(corners.reshape(-1)) == [50.0, 40.0, 10.0, 4.0, round(math.atan2(3, 4), 6)]


# --------------------------------------------------------------------------- the real DOTA sample


def _by_patch(data: dict) -> dict[str, list[dict]]:
    names = {i["id"]: Path(i["file_name"]).stem for i in data["images"]}
    out: dict[str, list[dict]] = {n: [] for n in names.values()}
    for a in data["annotations"]:
        out[names[a["image_id"]]].append(a)
    return out


# train.json of `prepare-data dota SAMPLE/train --split 512 --gap 128` before oriented boxes existed (main, 287345d),
# with the problem report's file paths made relative to the sample and the keys sorted (CI lays the sample elsewhere)
HBB_SAMPLE_SHA256 = "f9cd5fbc44feed3a3c49d77c16593d78aaec34e919a7140bd7b680a141f6f012"


def _location_free_sha256(data: dict, sample: Path) -> str:
    data = json.loads(json.dumps(data))
    for row in data["info"]["repaired"] + data["info"]["skipped"]:
        row["file"] = Path(row["file"]).resolve().relative_to(sample.resolve()).as_posix()
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_real_sample_obb(tmp_path):
    from pycocotools.coco import COCO

    sample = _sample() / "train"
    prepare_dota(sample, tmp_path / "hbb", size=512, gap=128)
    summary = prepare_dota(sample, tmp_path / "obb", size=512, gap=128, boxes="obb")
    hbb = json.loads((tmp_path / "hbb" / "train.json").read_text())
    assert _location_free_sha256(hbb, sample.parent) == HBB_SAMPLE_SHA256  # horizontal boxes: the same content
    assert "boxes" not in hbb["info"]["ds2d2"] and all("rbox" not in a for a in hbb["annotations"])

    data = json.loads((tmp_path / "obb" / "train.json").read_text())
    COCO(str(tmp_path / "obb" / "train.json"))
    COCO(str(tmp_path / "obb" / "train_scenes.json"))
    assert data["info"]["ds2d2"]["boxes"] == "obb" and data["info"]["ds2d2"]["angle_convention"] == "le90"
    assert data["images"] == hbb["images"]
    train = summary.splits["train"]
    # the sample's cut pieces with more than 5 or fewer than 4 corners that reach the iof threshold
    assert summary.boxes == "obb" and train.dropped_shape == 2
    assert len(data["annotations"]) == len(hbb["annotations"]) - 2
    rectangles = 0
    for a in data["annotations"]:
        seg = np.array(a["segmentation"][0]).reshape(-1, 2)
        cx, cy, w, h, theta = a["rbox"]
        assert len(seg) == 4 and w >= h > 0 and -math.pi / 2 <= theta < math.pi / 2
        assert a["rbox"] == rbox_field(seg.reshape(-1))  # the written polygon's minimum-area rectangle
        x0, y0 = seg.min(0)
        assert a["bbox"] == [x0, y0, round(seg[:, 0].max() - x0, 2), round(seg[:, 1].max() - y0, 2)]
        assert seg.min() >= 0 and seg.max() <= 512
        if polygon_area(seg) > 0.9999 * w * h:  # a rectangle: the rbox's corners are its corners
            rectangles += 1
            assert _same_corners(_corners(a["rbox"]), seg, atol=0.01)
    assert rectangles >= 5

    ours = _by_patch(data)
    # lines ImgSplit wrote (its coordinates truncated to whole pixels), from objects the window cuts:
    # "53 509 42 521 3 482 13 471": cut at y 512 into 5 corners, the short edge (53,509)-(50.25,512) halved
    # "425 142 413 152 375 115 386 103" in window x 384: 5 corners, the left side clamped to x 1
    for patch, devkit in (("P0706__1__0___0", [51, 510, 33, 512, 3, 482, 13, 471]),
                          ("P0706__1__384___0", [41, 142, 29, 152, 1, 123, 1, 104])):
        found = [a["segmentation"][0] for a in ours[patch]
                 if np.abs(np.array(a["segmentation"][0]) - devkit).max() < 1]
        assert len(found) == 1, (patch, devkit)
    assert [51.62, 510.5, 33.0, 512.0, 3.0, 482.0, 13.0, 471.0] in [a["segmentation"][0] for a in
                                                                    ours["P0706__1__0___0"]]
    # "507 478 515 487 487 516 478 507" crosses the corner (512, 512) of window (0, 0): 6 corners, left out
    corner_ship = [a for a in _by_patch(hbb)["P0706__1__0___0"] if a["bbox"][:2] == [478.0, 478.0]]
    assert len(corner_ship) == 1
    assert not [a for a in ours["P0706__1__0___0"] if a["bbox"][:2] == [478.0, 478.0]]

    scenes = json.loads((tmp_path / "obb" / "train_scenes.json").read_text())
    assert all(a["rbox"] == rbox_field(a["segmentation"][0]) for a in scenes["annotations"])


# --------------------------------------------------------------------------- the other converters


def test_hrsc_obb_whole_and_tiled(tmp_path):
    root = _hrsc(tmp_path / "HRSC2016")
    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "whole", "--boxes", "obb"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "whole" / "trainval.json").read_text())
    assert data["info"]["ds2d2"]["boxes"] == "obb"
    # the mboxes (40, 30, 20, 10, 0), (20, 20, 4, 2, pi/2), (60, 20, 2*sqrt 2, 2*sqrt 2, pi/4) in le90 form
    a, b, c = (ann["rbox"] for ann in data["annotations"])
    assert a == [40.0, 30.0, 20.0, 10.0, 0.0] and b == [20.0, 20.0, 4.0, 2.0, -HALF_PI]
    assert c[:4] == [60.0, 20.0, 2.83, 2.83] and abs(c[4]) == QUARTER_PI  # a square at 45 degrees: either form
    # the corners are those of horizontal boxes, byte for byte
    assert _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "hbb"]).exit_code == 0
    hbb = json.loads((tmp_path / "hbb" / "trainval.json").read_text())
    assert [{k: v for k, v in a.items() if k != "rbox"} for a in data["annotations"]] == hbb["annotations"]

    result = _invoke(["prepare-data", "hrsc2016", root, "--out", tmp_path / "tiled", "--boxes", "obb",
                      "--split", "32", "--gap", "8"])
    assert result.exit_code == 0, result.output
    tiled = json.loads((tmp_path / "tiled" / "trainval.json").read_text())
    assert tiled["annotations"] and all(a["rbox"] == rbox_field(a["segmentation"][0]) for a in tiled["annotations"])
    # box A (30..50 x 25..35) in window (24, 24): wholly inside, at (6..26, 1..11)
    window = next(i["id"] for i in tiled["images"] if i["scene"] == "100000001" and i["window"] == [24, 24])
    assert [16.0, 6.0, 20.0, 10.0, 0.0] in [a["rbox"] for a in tiled["annotations"] if a["image_id"] == window]


def test_ucas_obb(tmp_path):
    root = _ucas(tmp_path / "UCAS_AOD")
    result = _invoke(["prepare-data", "ucas-aod", root, "--out", tmp_path / "out", "--boxes", "obb",
                      "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    anns = [a for split in ("train", "val")
            for a in json.loads((tmp_path / "out" / f"{split}.json").read_text())["annotations"]]
    # cars (10, 20)-(20, 24): 10 x 4; planes (30, 10)-(50, 40): 20 wide, 30 high, so w upright
    assert sorted(map(tuple, (a["rbox"] for a in anns))) == [(15.0, 22.0, 10.0, 4.0, 0.0)] * 2 + [
        (40.0, 25.0, 30.0, 20.0, -HALF_PI)] * 2


def test_yolo_obb_and_box_lines_refused(tmp_path):
    obb = "0 0.25 0.1 0.4 0.5 0.25 0.9 0.1 0.5\n"  # (50,10) (80,50) (50,90) (20,50) on 200 x 100
    data = make_yolo(tmp_path / "ds", {"train/a": obb, "val/b": ""})
    result = _invoke(["prepare-data", "yolo", data, "--out", tmp_path / "out", "--boxes", "obb"])
    assert result.exit_code == 0, result.output
    (ann,) = json.loads((tmp_path / "out" / "train.json").read_text())["annotations"]
    # a rhombus with diagonals 60 (x) and 80 (y), area 2400: its minimum rectangle lies along a side,
    # d = (0.6, 0.8): the corners project to 38, 88, 102, 52 along it (64) and 2400 / 50 = 48 across; the
    # other side, (-0.6, 0.8), gives the mirror rectangle of the same area
    assert ann["rbox"] == rbox_field(ann["segmentation"][0])
    assert ann["rbox"][:4] == [50.0, 50.0, 64.0, 48.0] and abs(ann["rbox"][4]) == round(math.atan2(0.8, 0.6), 6)
    boxes = make_yolo(tmp_path / "boxes", {"train/a": "0 0.5 0.5 0.2 0.4\n", "val/b": ""})
    line = _one_line(_invoke(["prepare-data", "yolo", boxes, "--out", tmp_path / "no", "--boxes", "obb"]),
                     "a.txt:1", "horizontal box", "--boxes obb")
    assert "Traceback" not in line
    _nothing_written(tmp_path / "no")
    seg = make_yolo(tmp_path / "seg", {"train/a": "0 0.5 0.2 0.7 0.2 0.8 0.5 0.6 0.8 0.5 0.5\n", "val/b": ""})
    _one_line(_invoke(["prepare-data", "yolo", seg, "--out", tmp_path / "no", "--boxes", "obb"]),
              "a.txt:1", "polygon of 5 corners")


@pytest.mark.parametrize("command", ["voc", "coco", "dior"])
def test_formats_without_oriented_boxes_refuse_obb(tmp_path, command):
    args = {"voc": ["voc", tmp_path], "coco": ["coco", tmp_path / "a.json", "--images", tmp_path],
            "dior": ["dior", tmp_path]}[command]
    result = _invoke(["prepare-data", *args, "--out", tmp_path / "out", "--boxes", "obb"])
    _one_line(result, f"prepare-data {command} cannot write --boxes obb", "dota, hrsc2016, ucas-aod, yolo")
    _nothing_written(tmp_path / "out")


def test_bad_boxes_value(tmp_path):
    _one_line(_invoke(["prepare-data", "dota", tmp_path, "--out", tmp_path / "out", "--boxes", "rotated"]),
              "--boxes must be one of hbb, obb")


# --------------------------------------------------------------------------- the dataset


def _dataset_json(tmp_path: Path, rboxes: list[list[float]] | None, size=(60, 80)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(tmp_path / "a.png")
    anns = []
    for i, r in enumerate(rboxes or [[30.0, 20.0, 16.0, 6.0, 0.3]]):
        corners = _corners(r).round(2)
        x0, y0 = corners.min(0)
        x1, y1 = corners.max(0)
        ann = {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
               "area": 1.0, "iscrowd": 0, "segmentation": [corners.reshape(-1).tolist()]}
        if rboxes is not None:
            ann["rbox"] = r
        anns.append(ann)
    info = {"ds2d2": {"source": "test", "boxes": "obb", "angle_convention": "le90"} if rboxes is not None else {}}
    doc = {"info": info, "images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}],
           "annotations": anns, "categories": [{"id": 1, "name": "ship"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc))
    return path


RBOXES = [[30.0, 20.0, 16.0, 6.0, 0.3], [45.0, 50.0, 10.0, 10.0, -0.5], [12.0, 60.0, 8.0, 2.0, -math.pi / 2]]


def test_dataset_yields_rboxes_and_their_envelopes(tmp_path):
    dataset = DetectionDataset(load_coco_split(_dataset_json(tmp_path, RBOXES)), rboxes=True)
    image, target = dataset[0]
    assert image.shape == (3, 80, 60)
    assert target["rboxes"].dtype == torch.float32 and target["rboxes"].tolist() == torch.tensor(RBOXES).tolist()
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
    assert torch.allclose(target["boxes"], rbox_envelope(torch.tensor(RBOXES, dtype=torch.float64)).float())
    plain = DetectionDataset(load_coco_split(_dataset_json(tmp_path, RBOXES)))[0][1]
    assert "rboxes" not in plain


def test_dataset_refuses_rboxes_from_horizontal_data(tmp_path):
    path = _dataset_json(tmp_path, None)
    with pytest.raises(InputError, match="train.json holds no rotated boxes") as info:
        DetectionDataset(load_coco_split(path), rboxes=True)
    assert "--boxes obb" in str(info.value) and str(path) in str(info.value)
    data = json.loads(_dataset_json(tmp_path, RBOXES).read_text())
    del data["annotations"][1]["rbox"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="annotation 2 has no rbox"):
        DetectionDataset(load_coco_split(path), rboxes=True)[0]


def _turn_points(points: np.ndarray, canvas: tuple[int, int], hflip: bool, vflip: bool, turns: int) -> np.ndarray:
    """Points moved as the image's pixels move: mirrored, then turned counter-clockwise (torch.rot90)."""
    height, width = canvas
    p = points.copy()
    if hflip:
        p[:, 0] = width - p[:, 0]
    if vflip:
        p[:, 1] = height - p[:, 1]
    for _ in range(turns):
        p = np.stack([p[:, 1], width - p[:, 0]], axis=1)
        width, height = height, width
    return p


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("vflip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_augmented_rboxes_are_the_moved_corners(hflip, vflip, turns):
    canvas = (80, 60)
    rboxes = torch.tensor(RBOXES, dtype=torch.float64)
    moved = augment_rboxes(rboxes, canvas, hflip, vflip, turns)
    for before, after in zip(rboxes, moved):
        cx, cy, w, h, theta = after.tolist()
        assert -math.pi / 2 <= theta < math.pi / 2 and w >= h
        if w == h:
            assert -math.pi / 4 <= theta < math.pi / 4
        expected = _turn_points(_corners(before.tolist()), canvas, hflip, vflip, turns)
        assert _same_corners(_corners(after.tolist()), expected, atol=1e-9)


def test_dataset_augments_image_and_rboxes_together(tmp_path):
    """A bright 16 x 6 rbox painted into the image: after augmentation it is still under its rbox."""
    from PIL import Image, ImageDraw

    path = _dataset_json(tmp_path, RBOXES[:1])
    image = Image.new("RGB", (60, 80))
    ImageDraw.Draw(image).polygon([tuple(p) for p in _corners(RBOXES[0])], fill=(255, 255, 255))
    image.save(tmp_path / "a.png")
    dataset = DetectionDataset(load_coco_split(path), augment=("hflip", "vflip", "rot90"), seed=3, rboxes=True)
    seen = set()
    for epoch in range(12):
        pixels, target = dataset[(0, epoch)]
        (rbox,) = target["rboxes"].tolist()
        seen.add((round(rbox[0]), round(rbox[1]), tuple(pixels.shape)))
        mask = pixels[0] > 0.5
        ys, xs = torch.nonzero(mask, as_tuple=True)
        centre = (xs.float().mean().item() + 0.5, ys.float().mean().item() + 0.5)  # pixel centres
        assert abs(centre[0] - rbox[0]) < 0.6 and abs(centre[1] - rbox[1]) < 0.6
        assert torch.allclose(target["boxes"], rbox_envelope(target["rboxes"].double()).float())
        assert target["boxes"].canvas_size == tuple(pixels.shape[-2:])
        assert poly_to_rbox(_corners(rbox))[2:4].round(3).tolist() == [16.0, 6.0]
    assert len(seen) > 3  # the draws moved it
