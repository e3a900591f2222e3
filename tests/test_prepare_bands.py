"""`prepare-data` beyond 8-bit RGB: every band, the storage type and the georeferencing are kept,
and the training split's sample spec is recorded in every JSON.

Statistics are worked by hand on 64 x 64 scenes whose left 16 columns hold one value and
the right 48 another: a quarter of the pixels at `lo`, three quarters at `hi`. Scaled by
minmax (or the 1st/99th percentiles, which fall on `lo` and `hi`) the mean is 0.75 and the
std sqrt(0.75 * 0.25) = 0.433013; by the uint16 range (0 .. 65535) the mean is
(0.25 lo + 0.75 hi) / 65535 and the std 0.433013 (hi - lo) / 65535.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_input import _invoke, _nothing_written, _one_line

from ds2d2_cli.data.raster import open_tiff, write_geotiff

CRS = "EPSG:32633"  # UTM 33N
TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 4600000.0)  # 0.5 m pixels
SHIP = "imagesource:GoogleEarth\ngsd:0.5\n10 10 30 10 30 30 10 30 ship 0\n"
HEADER = "imagesource:GoogleEarth\ngsd:0.5\n"
LO = np.array([100, 200, 1000, 0])
HI = np.array([300, 600, 3000, 65535])
SPREAD = math.sqrt(0.75 * 0.25)


def _halves(lo, hi, dtype) -> np.ndarray:
    """[C, 64, 64]: band c is lo[c] in the left 16 columns, hi[c] in the right 48."""
    array = np.empty((len(lo), 64, 64), dtype)
    array[:, :, :16] = np.asarray(lo, dtype)[:, None, None]
    array[:, :, 16:] = np.asarray(hi, dtype)[:, None, None]
    return array


def _dota(root: Path, scenes: dict[str, np.ndarray | Image.Image], labels: dict[str, str] | None = None) -> Path:
    """A DOTA split folder; arrays become georeferenced GeoTIFFs, PIL images PNGs."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    for stem, scene in scenes.items():
        if isinstance(scene, Image.Image):
            scene.save(root / "images" / f"{stem}.png")
        else:
            write_geotiff(root / "images" / f"{stem}.tif", scene, crs=CRS, transform=TRANSFORM)
        (root / "labelTxt" / f"{stem}.txt").write_text((labels or {}).get(stem, SHIP), encoding="utf-8")
    return root


def _prepare(src: Path, out: Path, *extra: str) -> dict:
    result = _invoke(["prepare-data", "dota", src, "--out", out, "--split", "64", "--gap", "16", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "train.json").read_text())


@pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")  # rasterio's window_transform
def test_dota_geotiff_patches_keep_bands_type_and_georeferencing(tmp_path):
    from rasterio.windows import Window

    scene = np.random.default_rng(0).integers(0, 65535, (4, 80, 128), dtype=np.uint16)
    small = np.random.default_rng(1).integers(0, 65535, (4, 50, 40), dtype=np.uint16)
    src = _dota(tmp_path / "train", {"A": scene, "B": small}, {"B": HEADER})
    data = _prepare(src, tmp_path / "out")
    # A: 128 x 80 -> left {0, 48, 64} x top {0, 16}; B: 40 x 50 -> one window, zero-padded
    windows = [(img["scene"], tuple(img["window"])) for img in data["images"]]
    assert windows == [("A", (0, 0)), ("A", (0, 16)), ("A", (48, 0)), ("A", (48, 16)), ("A", (64, 0)),
                       ("A", (64, 16)), ("B", (0, 0))]
    assert [Path(img["file_name"]).suffix for img in data["images"]] == [".tif"] * 7
    with open_tiff(src / "images" / "A.tif") as scene_src:
        for img in data["images"][:6]:
            left, top = img["window"]
            with open_tiff(tmp_path / "out" / img["file_name"]) as patch:
                assert (patch.count, patch.dtypes, patch.width, patch.height) == (4, ("uint16",) * 4, 64, 64)
                assert np.array_equal(patch.read(), scene[:, top:top + 64, left:left + 64])
                assert patch.transform == scene_src.window_transform(Window(left, top, 64, 64))
                assert patch.crs == scene_src.crs and patch.crs.to_string() == CRS
                assert patch.descriptions == ("b1", "b2", "b3", "b4")
    with open_tiff(tmp_path / "out" / data["images"][6]["file_name"]) as patch:
        pixels = patch.read()
    assert np.array_equal(pixels[:, :50, :40], small) and pixels[:, 50:].max() == 0 and pixels[:, :, 40:].max() == 0
    ship = next(a for a in data["annotations"] if a["image_id"] == 1)
    assert ship["bbox"] == [10, 10, 20, 20]
    sample = data["info"]["sample"]
    assert (sample["bands"], sample["dtype"], sample["scaling"]) == (["b1", "b2", "b3", "b4"], "uint16", "percentile")
    scenes = json.loads((tmp_path / "out" / "train_scenes.json").read_text())
    assert scenes["info"]["sample"] == sample
    assert scenes["images"][0]["file_name"].endswith("A.tif")


def test_scaled_geotiff_patch_has_the_scaled_transform(tmp_path):
    scene = np.random.default_rng(0).integers(0, 65535, (4, 80, 128), dtype=np.uint16)
    src = _dota(tmp_path / "train", {"A": scene})
    data = _prepare(src, tmp_path / "out", "--scales", "0.5")
    (img,) = data["images"]  # 64 x 40: one window
    assert img["file_name"] == "train/images/A__0.5__0___0.tif"
    with open_tiff(tmp_path / "out" / img["file_name"]) as patch:
        assert tuple(patch.transform)[:6] == (1.0, 0.0, 500000.0, 0.0, -1.0, 4600000.0)  # pixels twice as large
        pixels = patch.read()
    assert pixels.dtype == np.uint16 and pixels[:, 40:].max() == 0 and pixels[:, :40].min() > 0


@pytest.mark.parametrize("scaling, low, high, mean, std", [
    ("minmax", LO, HI, [0.75] * 4, [SPREAD] * 4),
    ("auto", LO, HI, [0.75] * 4, [SPREAD] * 4),  # uint16: percentile; 1st and 99th fall on lo and hi
    ("range", [0] * 4, [65535] * 4, (0.25 * LO + 0.75 * HI) / 65535, SPREAD * (HI - LO) / 65535),
])
def test_sample_statistics_by_hand(tmp_path, scaling, low, high, mean, std):
    src = _dota(tmp_path / "train", {"A": _halves(LO, HI, np.uint16)})
    sample = _prepare(src, tmp_path / "out", "--scaling", scaling)["info"]["sample"]
    assert sample["scaling"] == ("percentile" if scaling == "auto" else scaling)
    assert sample["low"] == [float(v) for v in low] and sample["high"] == [float(v) for v in high]
    assert sample["mean"] == pytest.approx(list(mean), abs=1e-6)
    assert sample["std"] == pytest.approx(list(std), abs=1e-6)


def test_band_names_rename_bands(tmp_path):
    src = _dota(tmp_path / "train", {"A": _halves(LO, HI, np.uint16)})
    data = _prepare(src, tmp_path / "out", "--band-names", "red, green,blue,nir")
    assert data["info"]["sample"]["bands"] == ["red", "green", "blue", "nir"]
    with open_tiff(tmp_path / "out" / data["images"][0]["file_name"]) as patch:
        assert patch.descriptions == ("red", "green", "blue", "nir")


def test_band_names_must_name_every_band(tmp_path):
    src = _dota(tmp_path / "train", {"A": _halves(LO, HI, np.uint16)})
    out = tmp_path / "out"
    split = ["--split", "64", "--gap", "16"]
    result = _invoke(["prepare-data", "dota", src, "--out", out, *split, "--band-names", "red,green,blue"])
    _one_line(result, "A.tif", "--band-names gives 3 names (red, green, blue) but the images have 4 bands "
                               "(b1, b2, b3, b4) of uint16")
    _nothing_written(out)
    result = _invoke(["prepare-data", "dota", src, "--out", out, *split, "--band-names", "red,red,b,n"])
    _one_line(result, "--band-names names red twice")


def test_mixed_bands_are_a_bad_item(tmp_path):
    src = _dota(tmp_path / "train", {"P0001": _halves(LO, HI, np.uint16), "P0002": Image.new("RGB", (64, 64))})
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "dota", src, "--out", out, "--split", "64", "--gap", "16"])
    _one_line(result, "P0002.png: has 3 bands (red, green, blue) of uint8; the first image (P0001.tif) has "
                      "4 bands (b1, b2, b3, b4) of uint16")
    _nothing_written(out)
    skipped = _prepare(src, out, "--skip-bad")  # --skip-bad leaves it out and lists it
    assert [img["scene"] for img in skipped["images"]] == ["P0001"]
    assert [(Path(e["file"]).name, e["reason"]) for e in skipped["info"]["skipped"]] == [("P0002.png", "other bands")]


def test_sar_decibels(tmp_path):
    src = _dota(tmp_path / "train", {"S": _halves([0.01], [1.0], np.float32)})
    data = _prepare(src, tmp_path / "out", "--scaling", "db")
    sample = data["info"]["sample"]
    assert (sample["bands"], sample["dtype"], sample["scaling"]) == (["b1"], "float32", "db")
    assert sample["low"] == pytest.approx([-20.0], abs=1e-6) and sample["high"] == pytest.approx([0.0], abs=1e-9)
    assert sample["mean"] == pytest.approx([0.75], abs=1e-6) and sample["std"] == pytest.approx([SPREAD], abs=1e-6)
    with open_tiff(tmp_path / "out" / data["images"][0]["file_name"]) as patch:
        assert patch.dtypes == ("float32",) and np.array_equal(patch.read(), _halves([0.01], [1.0], np.float32))
    result = _invoke(["prepare-data", "dota", src, "--out", tmp_path / "range", "--split", "64", "--gap", "16",
                      "--scaling", "range"])
    _one_line(result, "--scaling range needs whole-number pixels, but the images are float32")


def test_yolo_geotiff_images_stay_whole(tmp_path):
    root = tmp_path / "yolo"
    for split, values in (("train", (LO, HI)), ("val", (HI, LO))):
        (root / "images" / split).mkdir(parents=True)
        write_geotiff(root / "images" / split / "a.tif", _halves(*values, np.uint16))
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n", encoding="utf-8")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [car]\n", encoding="utf-8")
    out = tmp_path / "out"
    result = _invoke(["prepare-data", "yolo", root / "data.yaml", "--out", out, "--scaling", "minmax"])
    assert result.exit_code == 0, result.output
    train, val = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "val"))
    assert (out / train["images"][0]["file_name"]).resolve() == (root / "images/train/a.tif").resolve()
    assert train["annotations"][0]["bbox"] == [24, 16, 16, 32]
    # measured on train (lo in a quarter, hi in the rest), recorded in val too
    assert train["info"]["sample"] == val["info"]["sample"]
    assert train["info"]["sample"]["low"] == [float(v) for v in LO] and train["info"]["sample"]["mean"] == [0.75] * 4
