"""`ds2d2 predict` on any bands: the model's bands read by name, TIFF windows read lazily, GeoJSON in map units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.transform
import torch
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.data import raster
from ds2d2_cli.data.raster import RasterInfo
from ds2d2_cli.errors import InputError
from ds2d2_cli.export import synthetic_image
from ds2d2_cli.predict import (OnnxPredictor, crs_member, detections_geojson, image_bands, load_image, map_corners,
                               picture, predict_paths, predict_scene, slice_windows)
from ds2d2_cli.progress import NullReporter
from ds2d2_cli.sample import RGB, SampleSpec

from test_predict import tiny_checkpoint

runner = CliRunner()
RGBN = ("red", "green", "blue", "nir")
UTM33 = "EPSG:32633"
# 0.3 m pixels, upper-left corner at (412345.6 E, 5678901.2 N) in UTM zone 33N
TRANSFORM = (0.3, 0.0, 412345.6, 0.0, -0.3, 5678901.2)
SPEC = SampleSpec(bands=RGBN, dtype="uint16", scaling="percentile", low=(0.0,) * 4, high=(10000.0,) * 4,
                  mean=(0.2,) * 4, std=(0.1,) * 4)
OBJECTS = {  # red value of the object (its nir is 9500) -> true box x1, y1, x2, y2 in scene pixels
    500: (100, 20, 140, 50),  # crosses the right border of window x0=0 (0..128)
    8000: (165, 100, 195, 120),  # inside 4 windows, cut by 2 more
}


class NirBoxes:
    """A stand-in 4-band detector: each rectangle bright in nir (scaled > 0.9) is one detection.

    Its class is told by the scaled red value (1: dark red, 2: bright red), so the test sees
    that the bands arrive in the model's order and scaled by its `SampleSpec`; the score grows
    with the visible area, so a whole object beats its cut pieces in the merge.
    """

    classes = ["dark", "bright"]
    input_size = 128
    score_thresh = 0.0
    description = "nir-box finder"
    bands = RGBN
    sample = SPEC

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            self.shapes.append(tuple(image.shape))
            boxes, scores, labels = [], [], []
            for label, (low, high) in ((1, (0.04, 0.06)), (2, (0.79, 0.81))):
                mask = (image[3] > 0.9) & (image[0] > low) & (image[0] < high)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    scores.append(min(1.0, float(mask.sum()) / 2000))
                    labels.append(label)
            results.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(scores, dtype=torch.float32),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        return results


def _pixels(width: int = 300, height: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1000, 3000, size=(4, height, width)).astype(np.uint16)
    for red, (x1, y1, x2, y2) in OBJECTS.items():
        pixels[0, y1:y2, x1:x2] = red
        pixels[3, y1:y2, x1:x2] = 9500
    return pixels


@pytest.fixture()
def geotiff(tmp_path) -> Path:
    path = tmp_path / "scene.tif"
    raster.write_geotiff(path, _pixels(), crs=UTM33, transform=TRANSFORM, band_names=RGBN)
    return path


def _expected_rings(boxes) -> np.ndarray:
    """The closed ring of each box's pixel-edge corners, in map units, by rasterio (not our arithmetic):
    counter-clockwise on the north-up map (west edge south first, then east, then north)."""
    rings = []
    for x1, y1, x2, y2 in boxes:
        xs, ys = rasterio.transform.xy(Affine(*TRANSFORM), [y1, y2, y2, y1, y1], [x1, x1, x2, x2, x1], offset="ul")
        rings.append(np.stack([xs, ys], axis=1))
    return np.array(rings)


# ----------------------------------------------------------------------------- GeoJSON


def test_georeferenced_tiff_gets_map_polygons(geotiff, tmp_path):
    reporter = NullReporter()
    out = tmp_path / "out"
    result = predict_paths(NirBoxes(), [geotiff], out, slice_size=128, overlap=48, reporter=reporter)
    assert reporter.notes == []
    assert result["detections"] == 2 and result["per_class"] == {"dark": 1, "bright": 1}
    assert result["geojson"] == [str(out / "scene.geojson")] and result["bands"] == list(RGBN)
    collection = json.loads((out / "scene.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    features = collection["features"]
    assert [f["properties"]["class"] for f in features] == ["dark", "bright"]  # best score (larger box) first
    assert [f["properties"]["label"] for f in features] == [1, 2]
    assert [f["properties"]["score"] for f in features] == [0.6, 0.3]  # 40 x 30 / 2000, 30 x 20 / 2000
    assert all(f["properties"]["image"] == "scene.tif" and f["properties"]["image_id"] == 1 for f in features)
    assert all(f["geometry"]["type"] == "Polygon" for f in features)
    rings = np.array([f["geometry"]["coordinates"][0] for f in features])
    assert np.allclose(rings, _expected_rings(OBJECTS.values()), rtol=0, atol=1e-6)
    # by hand: the first box's upper-left corner, pixel edge (100, 20), is 30 m east and 6 m south of the origin
    assert rings[0][0] == pytest.approx([412375.6, 5678895.2], abs=1e-6)
    assert rings[0][2] == pytest.approx([412387.6, 5678886.2], abs=1e-6)  # lower right: pixel edge (140, 50)
    meta = json.loads((out / "images.json").read_text())["images"][0]
    assert meta["crs"] == UTM33 and meta["transform"] == list(TRANSFORM)
    with Image.open(out / "scene.png") as drawn:
        assert drawn.width == 300 and drawn.height > 200
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "predictions.json", "scene.geojson", "scene.png"]


def test_map_corners_follow_a_rotated_transform():
    rotated = (0.25, 0.1, 500000.0, 0.05, -0.25, 4000000.0)
    boxes = np.array([[10.5, 20.25, 30.0, 41.0], [0.0, 0.0, 1.0, 1.0]])
    rings = map_corners(boxes, rotated)
    for ring, (x1, y1, x2, y2) in zip(rings, boxes):
        xs, ys = rasterio.transform.xy(Affine(*rotated), [y1, y2, y2, y1, y1], [x1, x1, x2, x2, x1], offset="ul")
        assert np.allclose(ring, np.stack([xs, ys], axis=1), rtol=0, atol=1e-6)
    # counter-clockwise on the map (RFC 7946's exterior rings): south, east, north, back west
    assert rings[1].tolist() == [[500000.0, 4000000.0], [500000.1, 3999999.75], [500000.35, 3999999.8],
                                 [500000.25, 4000000.05], [500000.0, 4000000.0]]


def test_a_crs_without_an_epsg_code_is_written_as_wkt():
    assert crs_member(UTM33) == {"crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}
    custom = "+proj=tmerc +lat_0=0 +lon_0=15.5 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m +no_defs"
    member = crs_member(custom)
    assert list(member) == ["crs_wkt"] and member["crs_wkt"].startswith("PROJCS[") and "15.5" in member["crs_wkt"]
    det = {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([1])}
    info = RasterInfo(Path("x.tif"), 10, 10, RGB, "uint8", custom, TRANSFORM)
    assert "crs" not in detections_geojson(det, ["a"], info) and "crs_wkt" in detections_geojson(det, ["a"], info)


class Nothing:
    """A detector that finds nothing and names no bands: it reads 8-bit RGB."""

    classes = ["thing"]
    input_size = 64
    score_thresh = 0.0
    description = "nothing"

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert all(image.shape[0] == 3 and image.dtype == torch.float32 for image in images)
        return [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


def test_images_without_georeferencing_get_pixel_coordinates_only(tmp_path):
    png = tmp_path / "plain.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(png)
    reporter = NullReporter()
    result = predict_paths(Nothing(), [png], tmp_path / "png", reporter=reporter)
    assert result["geojson"] == [] and reporter.notes == []  # PNG never carries a CRS: nothing to say
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["images.json", "plain.png", "predictions.json"]
    assert "crs" not in json.loads((tmp_path / "png" / "images.json").read_text())["images"][0]
    plain_tif = tmp_path / "plain4.tif"
    raster.write_geotiff(plain_tif, _pixels(), band_names=RGBN)
    result = predict_paths(NirBoxes(), [plain_tif], tmp_path / "tif", slice_size=128, overlap=48, draw=False,
                           reporter=reporter)
    assert reporter.notes == [f"{plain_tif} has no georeferencing: pixel coordinates only"]
    assert result["detections"] == 2 and result["geojson"] == []
    assert sorted(p.name for p in (tmp_path / "tif").iterdir()) == ["images.json", "predictions.json"]


# ----------------------------------------------------------------------------- large scenes


def test_sliced_tiff_is_read_window_by_window(geotiff, tmp_path, monkeypatch):
    whole = predict_paths(NirBoxes(), [geotiff], tmp_path / "whole", draw=False)
    assert whole["tiles"] == 1
    reads: list[tuple] = []
    real = raster.read_raster

    def recording(path, window=None, out_shape=None):
        reads.append((Path(path).name, window, out_shape))
        return real(path, window=window, out_shape=out_shape)

    monkeypatch.setattr(raster, "read_raster", recording)
    fake = NirBoxes()
    sliced = predict_paths(fake, [geotiff], tmp_path / "sliced", slice_size=128, overlap=48, batch_size=3,
                           draw=False)
    origins = slice_windows(300, 200, 128, 48)
    assert reads == [("scene.tif", (x0, y0, 128, 128), None) for x0, y0 in origins]  # never the whole scene
    assert sliced["tiles"] == len(origins) == 8 and fake.shapes == [(4, 128, 128)] * 8
    # the windows' detections merged in scene pixels are the whole image's, on the map too
    for name in ("predictions.json", "scene.geojson"):
        sliced_file, whole_file = (json.loads((tmp_path / run / name).read_text()) for run in ("sliced", "whole"))
        assert sliced_file == whole_file
    rows = json.loads((tmp_path / "sliced" / "predictions.json").read_text())
    assert [r["bbox"] for r in rows] == [[100, 20, 40, 30], [165, 100, 30, 20]]


def test_picture_of_other_bands_is_stretched(tmp_path):
    # red, green, blue of a 4-band uint16 image: each band half 1000, half 3000 -> 1st/99th percentiles 1000, 3000
    pixels = np.full((4, 10, 20), 1000, np.uint16)
    pixels[:, :, 10:] = 3000
    pixels[1, :, :10] = 2000  # green: half 2000, half 3000 -> 2000 black, 3000 white
    pixels[3] = 7  # nir is not drawn
    path = tmp_path / "rgbn.tif"
    raster.write_geotiff(path, pixels, band_names=RGBN)
    info = raster.probe(path)
    for made in (picture(info, raster.read_raster(path)), picture(info)):  # from memory, from the file in strips
        drawn = np.asarray(made)
        assert drawn.shape == (10, 20, 3)
        assert drawn[0, 0].tolist() == [0, 0, 0] and drawn[0, 19].tolist() == [255, 255, 255]
    # one band (no red/green/blue): grey, from its own percentiles; 16-bit grey PNGs are one band too
    grey = tmp_path / "grey.tif"
    ramp = np.tile(np.arange(0, 101, dtype=np.float32), (3, 1))[None]  # 0..100: percentiles 1 and 99
    raster.write_geotiff(grey, ramp)
    drawn = np.asarray(picture(raster.probe(grey)))
    assert drawn[0, [0, 1, 50, 99, 100]].tolist() == [[0] * 3, [0] * 3, [128] * 3, [255] * 3, [255] * 3]


# ----------------------------------------------------------------------------- bands


def test_image_bands_are_matched_by_name():
    def info(*bands: str) -> RasterInfo:
        return RasterInfo(Path("scene.tif"), 8, 8, bands, "uint16")

    assert image_bands(info("blue", "green", "red", "nir"), RGBN, SPEC) == [2, 1, 0, 3]
    assert image_bands(info("red", "green", "blue", "nir", "swir"), ("nir", "red"), SPEC) == [3, 0]
    # unnamed bands, as many as the training data's: taken in its order
    assert image_bands(info("b1", "b2", "b3", "b4"), ("nir", "red"), SPEC) == [3, 0]
    with pytest.raises(InputError) as caught:
        image_bands(info(*RGB), RGBN, SPEC)
    assert str(caught.value) == "scene.tif: the model reads 4 bands (red, green, blue, nir); this image has 3 (red, " \
                                "green, blue)"
    with pytest.raises(InputError, match="reads 4 bands .* this image has 3 \\(b1, b2, b3\\)"):
        image_bands(info("b1", "b2", "b3"), RGBN, SPEC)


def test_a_model_reads_a_subset_of_the_bands_in_its_order(geotiff, tmp_path):
    class NirRed(NirBoxes):
        bands = ("nir", "red")

        def __call__(self, images):
            return super().__call__([torch.stack([image[1], image[1], image[1], image[0]]) for image in images])

    result = predict_paths(NirRed(), [geotiff], tmp_path / "out", draw=False)
    assert result["per_class"] == {"dark": 1, "bright": 1} and result["bands"] == ["nir", "red"]
    pixels = load_image(geotiff, NirRed())  # the API's way: stored values of the model's bands
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, _pixels()[[3, 0]])
    found = predict_scene(NirRed(), pixels, slice_size=128, overlap=48)
    assert found["boxes"].tolist() == [list(box) for box in OBJECTS.values()] and found["labels"].tolist() == [1, 2]


def _tiny_onnx(path: Path, channels: int, **meta: str) -> Path:
    """An ONNX file with ds2d2's metadata and a graph that finds nothing: enough to load and check bands."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["boxes"], value=helper.make_tensor("b", TensorProto.FLOAT, [0, 4], [])),
             helper.make_node("Constant", [], ["scores"], value=helper.make_tensor("s", TensorProto.FLOAT, [0], [])),
             helper.make_node("Constant", [], ["labels"], value=helper.make_tensor("l", TensorProto.INT64, [0], []))]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [channels, 16, 16])
    graph = helper.make_graph(nodes, "g", [image],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [0, 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [0]),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"classes": '["thing"]', "input_size": "16", "score_thresh": "0.05", **meta}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_onnx_metadata_names_the_bands(geotiff, tmp_path):
    pytest.importorskip("onnxruntime")
    old = OnnxPredictor(_tiny_onnx(tmp_path / "old.onnx", 3))  # an export from before bands: 8-bit RGB
    assert old.bands == RGB and old.sample == SampleSpec()
    four = _tiny_onnx(tmp_path / "four.onnx", 4, bands=json.dumps(list(RGBN)), sample=SPEC.model_dump_json())
    model = OnnxPredictor(four)
    assert model.bands == RGBN and model.sample == SPEC
    result = predict_paths(model, [geotiff], tmp_path / "ok", draw=False)  # runs: 4 bands in, nothing found
    assert result["detections"] == 0 and result["geojson"] == [str(tmp_path / "ok" / "scene.geojson")]
    png = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    cli = runner.invoke(app, ["predict", str(four), str(png), "--out", str(tmp_path / "out")])
    assert cli.exit_code == 2 and not (tmp_path / "out").exists()
    assert cli.stderr.strip() == (f"error: {png}: the model reads 4 bands (red, green, blue, nir); this image has 3 "
                                  "(red, green, blue)")
    with pytest.raises(InputError, match="damaged ds2d2 metadata .*its input has 3 channels, its metadata names 4"):
        OnnxPredictor(_tiny_onnx(tmp_path / "bad.onnx", 3, sample=SPEC.model_dump_json()))
    with pytest.raises(InputError, match="damaged ds2d2 metadata .*bands swir are not in the sample spec"):
        OnnxPredictor(_tiny_onnx(tmp_path / "swir.onnx", 1, bands='["swir"]', sample=SPEC.model_dump_json()))


# ----------------------------------------------------------------------------- real checkpoints, CLI

TINY = ["input.size=64", "student.backbone=resnet18", "student.fpn_channels=16", "student.score_thresh=0.05"]


def _checkpoint(path: Path, sample: SampleSpec) -> Path:
    return tiny_checkpoint(path, sample)


def test_cli_rgb_checkpoint_on_a_geotiff(tmp_path):
    """An 8-bit RGB GeoTIFF predicts exactly as the same pixels in a PNG, and gets map polygons."""
    ckpt = _checkpoint(tmp_path / "rgb.safetensors", SampleSpec())
    pixels = (synthetic_image(200, seed=2)[:, :160].numpy() * 255).astype(np.uint8)
    tif = tmp_path / "scene.tif"
    raster.write_geotiff(tif, pixels, crs=UTM33, transform=TRANSFORM)
    png = tmp_path / "png" / "scene.png"
    png.parent.mkdir()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(png)
    found = {}
    for name, image in (("tif", tif), ("png", png)):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["predict", str(ckpt), str(image), "--out", str(out), "--slice", "128",
                                     "--overlap", "32", "--score-thr", "0.0", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        found[name] = json.loads((out / "predictions.json").read_text())
    assert found["tif"] == found["png"] and len(found["tif"]) > 0
    features = json.loads((tmp_path / "out-tif" / "scene.geojson").read_text())["features"]
    assert len(features) == len(found["tif"])
    assert not (tmp_path / "out-png" / "scene.geojson").exists()


def test_cli_refuses_an_image_without_the_models_bands(geotiff, tmp_path):
    ckpt = _checkpoint(tmp_path / "rgbn.safetensors", SPEC)
    png = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(ckpt), str(geotiff), str(png), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {png}: the model reads 4 bands (red, green, blue, nir); this image "
                                     "has 3 (red, green, blue)")
    assert not out.exists()
