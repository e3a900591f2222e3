"""`ds2d2 predict`: tiling, merging across tiles, checkpoint and ONNX end to end, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.checkpoint import meta_for, save_checkpoint
from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.errors import InputError
from ds2d2_cli.export import synthetic_image
from ds2d2_cli.models.detectors import build_detector
from ds2d2_cli.sample import SampleSpec
from ds2d2_cli.predict import load_predictor, predict_images, predict_paths, predict_scene, slice_windows
from ds2d2_cli.progress import NullReporter

runner = CliRunner()
SIZE = 64
TINY = [f"input.size={SIZE}", "student.backbone=resnet18", "student.fpn_channels=16", "student.score_thresh=0.05"]


# ----------------------------------------------------------------------------- windows


def test_slice_windows_follow_the_devkit():
    # x: 0, 80, 160, then 240 would pass the border (240 + 128 > 300): moved back to 300 - 128 = 172
    # y: 0, then 80 would pass 200: moved back to 200 - 128 = 72
    assert slice_windows(300, 200, 128, 48) == [(0, 0), (80, 0), (160, 0), (172, 0),
                                                (0, 72), (80, 72), (160, 72), (172, 72)]
    assert slice_windows(256, 128, 128, 0) == [(0, 0), (128, 0)]  # exact fit: no extra window
    assert slice_windows(100, 50, 128, 32) == [(0, 0)]  # smaller than one window: one, padded
    assert slice_windows(1111, 1182, 1024, 200) == [(0, 0), (87, 0), (0, 158), (87, 158)]  # DOTA P0706
    assert slice_windows(2048, 1024, 1024, 200) == [(0, 0), (824, 0), (1024, 0)]
    for size, overlap in ((128, 128), (128, 200), (0, 0), (128, -1)):
        with pytest.raises(InputError):
            slice_windows(300, 300, size, overlap)


# ----------------------------------------------------------------------------- merging across tiles

OBJECTS = {  # colour (R, G, B) -> true box x1, y1, x2, y2 in scene pixels
    (1.0, 0.2, 0.0): (100, 20, 140, 50),  # crosses the right border of window x0=0 (0..128)
    (1.0, 0.6, 0.0): (165, 100, 195, 120),  # inside 4 windows, cut by 2 more
}


class BrightBoxes:
    """A stand-in detector: each pure-coloured rectangle it sees (whole or cut) is one detection.

    The score grows with the visible area, so the whole object beats its cut pieces in NMS.
    """

    classes = ["thing"]
    input_size = 128
    score_thresh = 0.0
    description = "bright-box finder"

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, ...]]] = []

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.batches.append([tuple(image.shape) for image in images])
        results = []
        for image in images:
            boxes, scores = [], []
            for colour in OBJECTS:
                mask = (image - torch.tensor(colour)[:, None, None]).abs().amax(0) < 1e-3
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    scores.append(min(1.0, float(mask.sum()) / 2000))
            results.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(scores, dtype=torch.float32),
                            "labels": torch.ones(len(scores), dtype=torch.int64)})
        return results


def _scene(width: int = 300, height: int = 200) -> torch.Tensor:
    """Stored 8-bit pixels, as predict reads them (the colours are exact in 0..255: 0.2 * 255 = 51)."""
    scene = torch.rand((3, height, width), generator=torch.Generator().manual_seed(0)) * 0.4
    for colour, (x1, y1, x2, y2) in OBJECTS.items():
        if x2 <= width and y2 <= height:
            scene[:, y1:y2, x1:x2] = torch.tensor(colour)[:, None, None]
    return (scene * 255).round().to(torch.uint8)


def _check_found(det: dict[str, torch.Tensor], expected: list[tuple[int, ...]]) -> None:
    found = sorted(det["boxes"].tolist())
    assert len(found) == len(expected), found
    for box, truth in zip(found, sorted(expected)):
        assert np.allclose(box, truth, atol=1.0), (box, truth)


def test_object_across_a_tile_border_is_found_once():
    fake = BrightBoxes()
    raw = fake([_scene()[:, 0:128, 0:128] / 255, _scene()[:, 0:128, 80:208] / 255])  # the model's floats
    assert raw[0]["boxes"].tolist() == [[100, 20, 128, 50]]  # window 0 sees the first object cut
    det = predict_scene(fake, _scene(), slice_size=128, overlap=48, batch_size=3, score_thresh=0.0)
    assert [len(b) for b in fake.batches[1:]] == [3, 3, 2]  # 8 windows, 3 at a time
    assert all(shape == (3, 128, 128) for batch in fake.batches[1:] for shape in batch)
    _check_found(det, list(OBJECTS.values()))
    assert det["labels"].tolist() == [1, 1] and det["scores"][0] >= det["scores"][1]
    # without the merge (NMS IoU 1: nothing is suppressed) the cut pieces and repeats remain
    raw_count = len(predict_scene(BrightBoxes(), _scene(), slice_size=128, overlap=48, nms_iou=1.0,
                                  score_thresh=0.0)["boxes"])
    assert raw_count == 8  # object 1: cut in window 0, whole in 2; object 2: whole in 4, cut in 2
    # the whole scene in one pass (no slicing) finds the same boxes
    whole = BrightBoxes()
    _check_found(predict_scene(whole, _scene()), list(OBJECTS.values()))
    assert whole.batches == [[(3, 200, 300)]]


def test_scene_smaller_than_a_window_is_padded():
    fake = BrightBoxes()
    small = _scene()[:, :60, 90:190].numpy()  # a numpy array (what read_raster returns) works too
    det = predict_images(fake, [small], slice_size=128, overlap=32)[0]
    assert fake.batches == [[(3, 128, 128)]]
    _check_found(det, [(10, 20, 50, 50)])


def test_images_are_stored_values_of_the_models_bands():
    with pytest.raises(InputError, match=r"images must be \[3, H, W\]: the model reads 3 bands \(red, green, blue\)"):
        predict_images(BrightBoxes(), [torch.zeros((4, 8, 8), dtype=torch.uint8)])
    # floats already scaled to 0..1 would be scaled again by a model of 8-bit pixels: refused
    with pytest.raises(InputError, match="stored pixel values \\(uint8 for this model"):
        predict_images(BrightBoxes(), [torch.zeros((3, 8, 8))])


def test_predict_paths_with_any_predictor(tmp_path):
    scene = tmp_path / "scene.png"
    Image.fromarray(_scene().permute(1, 2, 0).numpy()).save(scene)
    reporter = NullReporter()
    result = predict_paths(BrightBoxes(), [tmp_path], tmp_path / "out", slice_size=128, overlap=48,
                           reporter=reporter)
    assert result["images"] == 1 and result["tiles"] == 8 and result["per_class"] == {"thing": 2}
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    boxes = sorted(r["bbox"] for r in rows)
    assert np.allclose(boxes, [[100, 20, 40, 30], [165, 100, 30, 20]], atol=1.0)
    assert reporter.notes == []
    # without --slice the 300 px scene is more than 2x the 128 px input: a note, not silence
    predict_paths(BrightBoxes(), [scene], tmp_path / "whole", reporter=reporter, draw=False)
    assert len(reporter.notes) == 1 and "--slice" in reporter.notes[0] and "scene.png" in reporter.notes[0]
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["images.json", "predictions.json"]


# ----------------------------------------------------------------------------- real models, CLI


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    """An untrained tiny RetinaNet student (as tests/test_export.py builds them), head widened for spread scores."""
    return tiny_checkpoint(module_tmp("ckpt") / "model.safetensors")


def tiny_checkpoint(path: Path, sample: SampleSpec | None = None, preset: str = "tiny-synthetic") -> Path:
    """An untrained tiny RetinaNet student (of `preset`: tiny-synthetic-obb for the oriented one)
    reading `sample`'s bands (8-bit RGB by default), its input resolved as stages record it,
    head widened for spread scores."""
    config = load_config(preset, TINY)
    config = config.model_copy(update={"input": config.input.resolve(sample or SampleSpec())})
    torch.manual_seed(0)
    model = build_detector(config.student, len(SYNTHETIC), config.input).eval()
    for module in model.head.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.1)
    torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, -2.0)
    return save_checkpoint(path, model.state_dict(), meta_for("student", config, "student", SYNTHETIC, preset))


@pytest.fixture(scope="module")
def onnx_model(ckpt, module_tmp) -> Path:
    from ds2d2_cli.export import export_onnx

    out = module_tmp("onnx") / "model.onnx"
    export_onnx(ckpt, out)
    return out


@pytest.fixture(scope="module")
def image(module_tmp) -> Path:
    path = module_tmp("images") / "scene.png"  # 200 x 160: 2 x 2 windows of 128 px
    array = (synthetic_image(200, seed=2)[:, :160].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _run_predict(model: Path, image: Path, out: Path, *extra: str) -> tuple[dict, list]:
    from pycocotools.coco import COCO

    result = runner.invoke(app, ["predict", str(model), str(image), "--out", str(out), "--slice", "128",
                                 "--overlap", "32", *extra, "--json", str(out.parent / f"{out.name}.json")])
    assert result.exit_code == 0, result.output
    assert "predict:" in result.stdout and "detections" in result.stdout
    summary = json.loads((out.parent / f"{out.name}.json").read_text())
    assert summary["images"] == 1 and summary["tiles"] == 4 and summary["detections"] > 0
    assert sum(summary["per_class"].values()) == summary["detections"]
    gt = COCO(str(out / "images.json"))
    assert gt.imgs[1]["file_name"] == str(image.resolve()) and (gt.imgs[1]["width"], gt.imgs[1]["height"]) == (200, 160)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(SYNTHETIC)
    rows = json.loads((out / "predictions.json").read_text())
    dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) == len(rows) == summary["detections"]
    boxes = np.array([r["bbox"] for r in rows])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 200.01).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 160.01).all()
    assert (boxes[:, 2:] > 0).all()
    with Image.open(out / "scene.png") as drawn:
        assert drawn.width == 200 and drawn.height > 160  # the scene plus its legend strip
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "predictions.json", "scene.png"]
    return summary, rows


def test_cli_checkpoint_and_onnx_end_to_end(ckpt, onnx_model, image, tmp_path):
    summary, _ = _run_predict(ckpt, image, tmp_path / "ckpt", "--score-thr", "0.0", "--batch-size", "3")
    assert summary["model_format"] == "checkpoint" and summary["score_thr"] == 0.0
    summary, rows = _run_predict(onnx_model, image, tmp_path / "onnx", "--score-thr", "0.0")
    assert summary["model_format"] == "onnx" and summary["input_size"] == SIZE
    # an export keeps only scores above its own cut-off: the summary reports that, not the 0.0 asked for
    floor = float(load_predictor(onnx_model).score_thresh)
    assert summary["score_thr"] == floor > 0 and min(r["score"] for r in rows) >= floor
    # above both models' floors, the checkpoint and its ONNX export find the same boxes
    from ds2d2_cli.export import compare_detections

    found = {}
    for name, model in (("ckpt", ckpt), ("onnx", onnx_model)):
        _, rows = _run_predict(model, image, tmp_path / f"{name}-0.1", "--score-thr", "0.1")
        xywh = np.array([r["bbox"] for r in rows]).reshape(-1, 4)
        found[name] = {"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                       "scores": [r["score"] for r in rows], "labels": [r["category_id"] for r in rows]}
    figures = compare_detections(found["ckpt"], found["onnx"], score_thresh=0.1, detections_per_img=10_000,
                                 tolerance={"box_rel": 1e-2, "score_abs": 1e-3, "cutoff_abs": 1e-3})
    assert figures["matched"] > 0 and figures["mismatched"] == 0, figures


def _dota_sample() -> Path:
    from test_prepare_cli import _sample  # the one locator of the real DOTA sample, or a skip

    return _sample() / "train" / "images"


def test_cli_on_the_real_dota_sample(ckpt, tmp_path):
    images = _dota_sample()
    scenes = sorted(p for p in images.iterdir() if p.suffix.lower() == ".png")
    out = tmp_path / "dota"
    result = runner.invoke(app, ["predict", str(ckpt), str(images), "--out", str(out), "--slice", "512",
                                 "--overlap", "100", "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # `--json -`: nothing else on stdout
    assert summary["images"] == len(scenes) and summary["detections"] > 0 and summary["device"] == "cpu"
    meta = json.loads((out / "images.json").read_text())
    for record, scene in zip(meta["images"], scenes):
        with Image.open(scene) as original, Image.open(out / f"{scene.stem}.png") as drawn:
            assert (record["width"], record["height"]) == original.size
            assert drawn.width == original.width and drawn.height > original.height
    rows = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in rows} <= {m["id"] for m in meta["images"]}


# ----------------------------------------------------------------------------- bad input


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # a progress line may precede it
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def test_bad_input_is_one_line_and_leaves_nothing(ckpt, image, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    corrupt = bad / "corrupt.png"
    corrupt.write_bytes(b"definitely not a PNG file")
    gif = bad / "scene.gif"
    Image.new("RGB", (8, 8)).save(gif)
    amplifier = bad / "amplifier.safetensors"
    config = load_config("tiny-synthetic", TINY)
    save_checkpoint(amplifier, {"w": torch.zeros(2)},
                    meta_for("amplifier", config, "teacher", SYNTHETIC, "tiny-synthetic", teacher_sha256="0" * 64))
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["boxes"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, 4, 4])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [3, 4, 4])])
    foreign = bad / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    out = tmp_path / "out"
    cases = [
        ([str(ckpt), str(tmp_path / "missing.png")], ["missing.png", "no such file"]),
        ([str(ckpt), str(gif)], ["scene.gif", "unsupported image type"]),
        ([str(ckpt), str(corrupt)], ["corrupt.png", "cannot read image"]),
        ([str(ckpt), str(image), "--slice", "128", "--overlap", "128"], ["--overlap must be", "smaller than --slice"]),
        ([str(ckpt), str(image), "--overlap", "32"], ["--overlap only applies with --slice"]),
        ([str(ckpt), str(image), "--score-thr", "1.5"], ["--score-thr"]),
        ([str(amplifier), str(image)], ["amplifier.safetensors", "not a detector"]),
        ([str(foreign), str(image)], ["foreign.onnx", "without ds2d2 metadata"]),
        ([str(tmp_path / "gone.safetensors"), str(image)], ["gone.safetensors", "not found"]),
    ]
    for args, words in cases:
        result = runner.invoke(app, ["predict", *args, "--out", str(out)])
        _one_line_error(result, *words)
        assert not out.exists(), args
    # a damaged image found only while decoding, after a good one: the run leaves nothing behind
    (bad / "a_good.png").write_bytes(image.read_bytes())
    data = image.read_bytes()
    (bad / "b_truncated.png").write_bytes(data[: len(data) // 2])
    for path in (corrupt, gif):
        path.unlink()
    result = runner.invoke(app, ["predict", str(ckpt), str(bad / "a_good.png"), str(bad / "b_truncated.png"),
                                 "--out", str(out)])
    _one_line_error(result, "b_truncated.png", "cannot read image")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    result = runner.invoke(app, ["predict", str(ckpt), str(bad / "a_good.png"), str(bad / "b_truncated.png"),
                                 "--out", str(out)])
    _one_line_error(result, "b_truncated.png")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
