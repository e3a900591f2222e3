"""Beyond 8-bit RGB, end to end: a 4-band uint16 GeoTIFF dataset (RGB + NIR, UTM) and a 1-band
float32 SAR one, through every stage from the CLI: prepare-data (cut with --split), train-teacher,
train-amplifier, distill, eval --merge-patches, predict on a whole georeferenced scene (GeoJSON in
the scene's CRS), export --verify. A 4-band model refuses 3-band images in eval, predict and export.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from ds2d2_cli.classes import CLASS_SETS
from ds2d2_cli.cli.app import app
from ds2d2_cli.data.raster import write_geotiff

from test_own_data import train_every_stage

runner = CliRunner()
SCENE = (300, 260)  # width, height: larger than the 128 px input
UTM = "EPSG:32633"
CLASSES = ("storage-tank", "small-vehicle")  # names of the `synthetic` set; tanks stand in for trees


def _transform(index: int) -> tuple[float, ...]:
    return (0.5, 0.0, 500_000.0 + 1000.0 * index, 0.0, -0.5, 4_100_000.0)


def _layout(seed: int):
    """{split: [(stem, [(class, x0, y0, x1, y1)])]}"""
    rng = random.Random(seed)
    out = {}
    for split, count in (("train", 2), ("val", 1)):
        out[split] = []
        for i in range(count):
            objects = []
            for _ in range(10):
                name = rng.choice(CLASSES)
                w, h = rng.randint(14, 30), rng.randint(14, 30)
                x0, y0 = rng.randint(0, SCENE[0] - w - 1), rng.randint(0, SCENE[1] - h - 1)
                objects.append((name, x0, y0, x0 + w, y0 + h))
            out[split].append((f"{split}_{i:03d}", objects))
    return out


def write_dataset(root: Path, kind: str) -> None:
    """DOTA layout: `<split>/images/*.tif` and `<split>/labelTxt/*.txt`; rgbn: 4 x uint16 where
    trees and cars share their RGB colour and only NIR tells them apart; sar: float32 backscatter."""
    index = 0
    rng = np.random.default_rng(0)
    for split, items in _layout(1).items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labelTxt").mkdir(parents=True)
        for stem, objects in items:
            w, h = SCENE
            if kind == "rgbn":
                pixels = np.empty((4, h, w), np.uint16)
                pixels[:3], pixels[3] = 900, 1200
                for name, x0, y0, x1, y1 in objects:
                    pixels[:3, y0:y1, x0:x1] = np.array([400, 1500, 500], np.uint16)[:, None, None]
                    pixels[3, y0:y1, x0:x1] = 3500 if name == CLASSES[0] else 300
            else:
                pixels = np.full((1, h, w), 0.05, np.float32)
                for name, x0, y0, x1, y1 in objects:
                    pixels[0, y0:y1, x0:x1] = 0.08 if name == CLASSES[0] else 2.0
                pixels *= rng.gamma(4.0, 0.25, size=pixels.shape).astype(np.float32)
            write_geotiff(root / split / "images" / f"{stem}.tif", pixels, crs=UTM, transform=_transform(index))
            index += 1
            (root / split / "labelTxt" / f"{stem}.txt").write_text("".join(
                f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {name} 0\n" for name, x0, y0, x1, y1 in objects))


def _run(args: list, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.stdout if code == 0 else result.output


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


BANDS = {"rgbn": ["red", "green", "blue", "nir"], "sar": ["vv"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rgbn", "sar"])
def test_bands_every_stage(tmp_path, kind):
    src, data, runs = tmp_path / "src", tmp_path / "data", tmp_path / "runs"
    write_dataset(src, kind)
    naming = ["--band-names", ",".join(BANDS[kind])] + (["--scaling", "db"] if kind == "sar" else [])
    _run(["prepare-data", "dota", src, "--out", data, "--split", "128", "--gap", "32",
          "--classes", "synthetic", *naming])
    prepared = json.loads((data / "train.json").read_text())
    sample = prepared["info"]["sample"]
    assert sample["bands"] == BANDS[kind]
    assert sample["dtype"] == ("uint16" if kind == "rgbn" else "float32")
    assert sample["scaling"] == ("percentile" if kind == "rgbn" else "db")
    first = data / Path(prepared["images"][0]["file_name"])
    assert first.suffix == ".tif"
    with rasterio.open(first) as patch:
        assert patch.count == len(BANDS[kind]) and patch.crs.to_string() == UTM

    teacher, student = train_every_stage(data, runs)
    for model in (teacher, student):
        with safe_open(str(model), framework="pt") as fh:
            meta = fh.metadata()
        assert json.loads(meta["bands"]) == BANDS[kind]
        assert json.loads(meta["input"])["sample"]["bands"] == BANDS[kind]

    metrics = json.loads(_run(["eval", student, "--merge-patches", "--device", "cpu", "--json", "-"]))
    assert metrics["merged_patches"] is True

    scene = src / "val" / "images" / "val_000.tif"
    _run(["predict", student, scene, "--out", runs / "predict", "--slice", "128", "--device", "cpu"])
    geo = json.loads((runs / "predict" / "val_000.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and "32633" in json.dumps(geo["crs"])
    x0, y0 = _transform(2)[2], _transform(2)[5]
    for feature in geo["features"]:
        xs = [p[0] for p in feature["geometry"]["coordinates"][0]]
        assert x0 - 1e-6 <= min(xs) and max(xs) <= x0 + 0.5 * SCENE[0] + 1e-6
        ys = [p[1] for p in feature["geometry"]["coordinates"][0]]
        assert y0 - 0.5 * SCENE[1] - 1e-6 <= min(ys) and max(ys) <= y0 + 1e-6
        assert feature["properties"]["class"] in CLASS_SETS["synthetic"]

    summary = json.loads(_run(["export", student, "--verify", "--json", "-"]))
    assert summary["verify"]

    if kind == "rgbn":  # a 4-band model and 3-band images: one line, in eval, predict and export alike
        rgb = tmp_path / "rgb.png"
        Image.new("RGB", (128, 128), (90, 90, 90)).save(rgb)
        for command in (["predict", student, rgb, "--out", tmp_path / "p3", "--device", "cpu"],
                        ["export", student, "--verify", "--image", rgb, "--out", tmp_path / "x.onnx"]):
            output = _run(command, code=2)
            assert "4 bands" in output and "3" in output and len(output.strip().splitlines()) == 1, output
            assert not (tmp_path / "p3").exists() and not (tmp_path / "x.onnx").exists()
        rgb_src, rgb_data = tmp_path / "rgb-src", tmp_path / "rgb-data"
        for split in ("train", "val"):
            (rgb_src / split / "images").mkdir(parents=True)
            (rgb_src / split / "labelTxt").mkdir(parents=True)
            Image.new("RGB", (128, 128), (90, 90, 90)).save(rgb_src / split / "images" / "a.png")
            (rgb_src / split / "labelTxt" / "a.txt").write_text("10 10 40 10 40 40 10 40 small-vehicle 0\n"
                                                                "50 50 80 50 80 80 50 80 storage-tank 0\n")
        _run(["prepare-data", "dota", rgb_src, "--out", rgb_data, "--classes", "synthetic"])
        output = _run(["eval", student, "--data", rgb_data, "--device", "cpu"], code=2)
        assert "4 bands" in output and "3 bands" in output and len(output.strip().splitlines()) == 1, output
