"""`ds2d2 predict` and `ds2d2 export` for oriented detectors (retinanet_obb): rotated merge across
tiles, rotated corners in GeoJSON, DOTA Task 1 submission files, ONNX before NMS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.cli.app import app
from ds2d2_cli.data import raster
from ds2d2_cli.dota_task1 import MERGE_IOU_THRESHOLD, read_task1_submission
from ds2d2_cli.errors import InputError
from ds2d2_cli.export import compare_detections, synthetic_image
from ds2d2_cli.predict import _merge, merge_iou, predict_paths, predict_scene, slice_windows
from ds2d2_cli.progress import NullReporter
from ds2d2_cli.rotated import rbox_envelope, rbox_to_poly, rotated_box_iou

from test_predict import _one_line_error, tiny_checkpoint

runner = CliRunner()


# ----------------------------------------------------------------------------- a stand-in oriented detector

MARKERS = {  # colour (R, G, B) of a 4 x 4 px marker -> (label, w, h, theta) of the rotated box centred on it
    (1.0, 0.2, 0.0): (1, 40.0, 12.0, 0.5),
    (0.0, 0.6, 1.0): (2, 30.0, 10.0, -1.0),
}


class MarkerRBoxes:
    """Each whole marker it sees is one rotated detection centred on it (score 0.9)."""

    classes = ["thing", "other"]
    input_size = 128
    score_thresh = 0.0
    description = "marker finder"
    oriented = True

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            rboxes, labels = [], []
            for colour, (label, w, h, theta) in MARKERS.items():
                mask = (image - torch.tensor(colour)[:, None, None]).abs().amax(0) < 1e-3
                if int(mask.sum()) == 16:
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    rboxes.append([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, w, h, theta])
                    labels.append(label)
            rb = torch.tensor(rboxes, dtype=torch.float32).reshape(-1, 5)
            results.append({"rboxes": rb, "boxes": rbox_envelope(rb), "scores": torch.full((len(rb),), 0.9),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        return results


def _marker_scene(width: int, height: int, centres: dict[tuple[float, ...], tuple[int, int]]) -> torch.Tensor:
    scene = torch.full((3, height, width), 0.3)
    for colour, (cx, cy) in centres.items():
        scene[:, cy - 2:cy + 2, cx - 2:cx + 2] = torch.tensor(colour)[:, None, None]
    return (scene * 255).round().to(torch.uint8)


def test_sliced_prediction_merges_tile_duplicates_by_rotated_nms():
    # 200 x 128 px in 128 px windows with 56 px overlap: windows at x 0 and 72; both markers lie in
    # the overlap (x 72..128), so each window reports both objects whole
    assert slice_windows(200, 128, 128, 56) == [(0, 0), (72, 0)]
    scene = _marker_scene(200, 128, {(1.0, 0.2, 0.0): (100, 64), (0.0, 0.6, 1.0): (106, 70)})
    fake = MarkerRBoxes()
    assert merge_iou(fake) == MERGE_IOU_THRESHOLD == 0.3  # the devkit's ResultMerge, as eval --merge-patches
    det = predict_scene(fake, scene, slice_size=128, overlap=56)
    # one detection per object (the two overlap, but are of different classes: class-wise NMS keeps both)
    assert det["labels"].tolist() == [1, 2]
    torch.testing.assert_close(det["rboxes"], torch.tensor([[100.0, 64, 40, 12, 0.5], [106.0, 70, 30, 10, -1.0]],
                                                           dtype=torch.float64))
    torch.testing.assert_close(det["boxes"], rbox_envelope(det["rboxes"]).float())
    # without the merge (IoU 1: nothing suppressed) each object is there twice
    assert predict_scene(fake, scene, slice_size=128, overlap=56, nms_iou=1.0)["labels"].tolist() == [1, 2, 1, 2]
    # the whole scene in one pass finds the same
    whole = predict_scene(fake, scene)
    torch.testing.assert_close(whole["rboxes"], det["rboxes"])


def test_merge_rule_is_the_devkits_threshold():
    """Two tiles' boxes of one class, 16 px apart along their long side: IoU (40 - 16) / (40 + 16) = 3/7,
    between the devkit's 0.3 (merged) and the horizontal default 0.5 (both kept)."""
    theta = 0.7
    step = 16 * torch.tensor([math.cos(theta), math.sin(theta)])
    first = torch.tensor([[100.0, 64.0, 40.0, 12.0, theta]])
    second = first.clone()
    second[0, :2] += step
    assert float(rotated_box_iou(first, second)) == pytest.approx(3 / 7, abs=1e-5)

    def piece(rboxes: torch.Tensor, score: float) -> dict[str, torch.Tensor]:
        return {"rboxes": rboxes, "boxes": rbox_envelope(rboxes), "scores": torch.full((len(rboxes),), score),
                "labels": torch.ones(len(rboxes), dtype=torch.int64)}

    in_second_window = second.clone()
    in_second_window[0, 0] -= 72
    padding = torch.tensor([[130.0, 64.0, 20.0, 8.0, 0.0]])  # window x 72 + 130 = 202: past the 200 px scene
    pieces = [((0, 0), piece(first, 0.9)), ((72, 0), piece(torch.cat([in_second_window, padding]), 0.8))]
    merged = _merge(pieces, 200, 128, 0.0, MERGE_IOU_THRESHOLD, oriented=True)
    torch.testing.assert_close(merged["rboxes"], first.double())
    assert merged["scores"].tolist() == pytest.approx([0.9])
    kept = _merge(pieces, 200, 128, 0.0, 0.5, oriented=True)
    torch.testing.assert_close(kept["rboxes"], torch.cat([first, second]).double(), atol=1e-5, rtol=0)
    assert _merge(pieces, 200, 128, 0.85, 0.5, oriented=True)["scores"].tolist() == pytest.approx([0.9])


# ----------------------------------------------------------------------------- GeoJSON

UTM33 = "EPSG:32633"
TRANSFORM = (0.3, 0.0, 412345.6, 0.0, -0.3, 5678901.2)  # 0.3 m pixels, north up


class OneRBox:
    """One fixed rotated detection per image, class 2 ("other")."""

    classes = ["thing", "other"]
    input_size = 256
    score_thresh = 0.0
    description = "one rotated box"
    oriented = True
    RBOX = (100.5, 60.25, 40.0, 12.0, 0.5)  # exact in float32

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        rb = torch.tensor([self.RBOX])
        return [{"rboxes": rb, "boxes": rbox_envelope(rb), "scores": torch.tensor([0.75]),
                 "labels": torch.tensor([2])} for _ in images]


def test_geojson_carries_the_rotated_corners_in_map_units(tmp_path):
    path = tmp_path / "scene.tif"
    raster.write_geotiff(path, np.full((3, 150, 200), 90, np.uint8), crs=UTM33, transform=TRANSFORM,
                         band_names=("red", "green", "blue"))
    out = tmp_path / "out"
    result = predict_paths(OneRBox(), [path], out, draw=False, reporter=NullReporter())
    assert result["oriented"] and result["per_class"] == {"thing": 0, "other": 1}
    collection = json.loads((out / "scene.geojson").read_text())
    (feature,) = collection["features"]
    assert feature["properties"]["class"] == "other" and feature["properties"]["label"] == 2
    assert feature["properties"]["rbox"] == [100.5, 60.25, 40.0, 12.0, 0.5]
    # corners by hand: centre -/+ u -/+ v, u = w/2 (cos t, sin t), v = h/2 (-sin t, cos t), image axes
    cx, cy, w, h, t = OneRBox.RBOX
    u = np.array([math.cos(t), math.sin(t)]) * w / 2
    v = np.array([-math.sin(t), math.cos(t)]) * h / 2
    c = np.array([cx, cy])
    # rbox_to_poly's order (positive in image axes) reversed: counter-clockwise on the north-up map
    pixels = np.array([c - u - v, c - u + v, c + u + v, c + u - v, c - u - v])
    expected = np.stack([412345.6 + 0.3 * pixels[:, 0], 5678901.2 - 0.3 * pixels[:, 1]], axis=1)
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert ring.shape == (5, 2)
    np.testing.assert_allclose(ring, expected, rtol=0, atol=1e-6)
    xs, ys = ring[:-1, 0] - ring[0, 0], ring[:-1, 1] - ring[0, 1]
    assert np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys) > 0  # counter-clockwise on the map
    rows = json.loads((out / "predictions.json").read_text())
    assert rows[0]["rbox"] == [100.5, 60.25, 40.0, 12.0, 0.5] and rows[0]["category_id"] == 2


# ----------------------------------------------------------------------------- real oriented checkpoint


@pytest.fixture(scope="module")
def obb_ckpt(module_tmp) -> Path:
    """An untrained tiny oriented RetinaNet student (64 px input), head widened for spread scores."""
    return tiny_checkpoint(module_tmp("obb") / "model.safetensors", preset="tiny-synthetic-obb")


@pytest.fixture(scope="module")
def image(module_tmp) -> Path:
    path = module_tmp("images") / "scene.png"  # 200 x 160: 2 x 2 windows of 128 px
    array = (synthetic_image(200, seed=2)[:, :160].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _predict(model: Path, image: Path, out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["predict", str(model), str(image), "--out", str(out), "--slice", "128",
                                 "--overlap", "32", "--score-thr", "0.3", "--device", "cpu", "--task1", *extra,
                                 "--json", str(out.parent / f"{out.name}.json")])
    assert result.exit_code == 0, result.output
    return json.loads((out.parent / f"{out.name}.json").read_text())


def _task1_matches_predictions(out: Path, summary: dict) -> list[dict]:
    """The Task1 files read back by the devkit reader hold exactly predictions.json's rotated boxes."""
    rows = json.loads((out / "predictions.json").read_text())
    submission = read_task1_submission(out / "task1", SYNTHETIC)
    assert sorted(p.name for p in (out / "task1").iterdir()) == sorted(f"Task1_{c}.txt" for c in SYNTHETIC)
    assert sum(len(d) for d in submission.values()) == len(rows) == summary["detections"] > 0
    for k, name in enumerate(SYNTHETIC):
        dets = submission[name]
        ours = [r for r in rows if r["category_id"] == k + 1]  # labels 1..K: Task1_<classes[label - 1]>
        assert len(dets) == len(ours) == summary["per_class"][name]
        assert set(dets.images) <= {"scene"}  # the scene's file stem, as the devkit names images
        np.testing.assert_allclose(dets.scores, [r["score"] for r in ours], atol=1e-5)
        polys = rbox_to_poly(torch.tensor([r["rbox"] for r in ours], dtype=torch.float64).reshape(-1, 5))
        np.testing.assert_allclose(dets.polys, polys.reshape(-1, 8).numpy(), atol=0.02)
    for row in rows:  # bbox: the rotated box's envelope
        x0, y0, x1, y1 = rbox_envelope(torch.tensor([row["rbox"]], dtype=torch.float64))[0].tolist()
        np.testing.assert_allclose(row["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.02)
    return rows


def test_cli_oriented_checkpoint_writes_task1_files(obb_ckpt, image, tmp_path):
    out = tmp_path / "ckpt"
    summary = _predict(obb_ckpt, image, out)
    assert summary["oriented"] and summary["nms_iou"] == 0.3 and summary["task1"] == str(out / "task1")
    _task1_matches_predictions(out, summary)
    assert json.loads((out / "images.json").read_text())["info"]["angle"] == "le90"
    with Image.open(out / "scene.png") as drawn:
        assert drawn.width == 200 and drawn.height > 160


def test_onnx_export_of_an_oriented_checkpoint(obb_ckpt, image, tmp_path):
    import onnx

    from ds2d2_cli.models.families.retinanet_obb import NMS_THRESH

    onnx_path = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(obb_ckpt), "--out", str(onnx_path), "--verify", "--json", "-"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    verify = figures["verify"]
    assert verify["status"] == "passed" and verify["mismatched"] == 0 and verify["matched"] > 0
    assert verify["max_box_rel_diff"] <= 1e-3 and verify["max_score_abs_diff"] <= 1e-4
    pre = verify["pre_nms"]
    assert pre["passed"] and pre["rows_reference"] == pre["rows_exported"] == pre["rows_matched"] > 0
    assert figures["nms"] == "caller" and figures["nms_iou"] == NMS_THRESH == 0.1
    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["boxes"] == "obb" and props["angle"] == "le90" and props["nms"] == "caller"
    assert float(props["nms_iou"]) == NMS_THRESH and "batched_rotated_nms" in props["postprocess"]
    assert [o.name for o in model.graph.output] == ["rboxes", "scores", "anchors"]
    # predict finishes the export with the same rotated NMS: the checkpoint's detections, Task1 files too
    found = {}
    for name, path in (("ckpt", obb_ckpt), ("onnx", onnx_path)):
        out = tmp_path / name
        summary = _predict(path, image, out, "--no-images")
        assert summary["score_thr"] == 0.3  # an oriented export's cut-off is applied by predict: it can be changed
        rows = _task1_matches_predictions(out, summary)
        found[name] = {"rboxes": [r["rbox"] for r in rows], "scores": [r["score"] for r in rows],
                       "labels": [r["category_id"] for r in rows]}
    figures = compare_detections(found["ckpt"], found["onnx"], score_thresh=0.3, detections_per_img=10_000,
                                 tolerance={"box_rel": 1e-2, "score_abs": 1e-3, "cutoff_abs": 1e-3})
    assert figures["matched"] > 0 and figures["mismatched"] == 0, figures


def test_torchscript_of_an_oriented_checkpoint_is_refused(obb_ckpt, tmp_path):
    out = tmp_path / "model.pt"
    result = runner.invoke(app, ["export", str(obb_ckpt), "--format", "torchscript", "--out", str(out)])
    _one_line_error(result, "TorchScript cannot script the oriented detector retinanet_obb", "--format onnx")
    assert not out.exists()


def test_task1_is_refused_for_horizontal_models_and_ambiguous_names(module_tmp, image, tmp_path):
    horizontal = tiny_checkpoint(module_tmp("hbb") / "model.safetensors")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(horizontal), str(image), "--out", str(out), "--task1"])
    _one_line_error(result, "--task1", "horizontal boxes")
    assert not out.exists()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scene.png").write_bytes(image.read_bytes())
    with pytest.raises(InputError, match="share the name 'scene'.*--task1"):
        predict_paths(MarkerRBoxes(), [tmp_path / "a", tmp_path / "b"], out, draw=False, task1=True)
    spaced = tmp_path / "my scene.png"
    spaced.write_bytes(image.read_bytes())
    with pytest.raises(InputError, match="white space"):
        predict_paths(MarkerRBoxes(), [spaced], out, task1=True)
    assert not out.exists()
