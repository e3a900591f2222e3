"""`ds2d2 export`: ONNX / TorchScript / fp16 safetensors of untrained tiny detectors (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli.checkpoint import load_checkpoint, meta_for, save_checkpoint
from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.export import _summarise, compare_detections, load_detector_checkpoint, synthetic_image
from ds2d2_cli.models.detectors import build_detector

runner = CliRunner()
SIZE = 64
TINY = [f"input.size={SIZE}", "student.backbone=resnet18", "student.fpn_channels=16"]


def _tiny_checkpoint(path: Path, preset: str, score_thresh: float) -> Path:
    config = load_config(preset, [*TINY, f"student.score_thresh={score_thresh}"])
    torch.manual_seed(0)
    model = build_detector(config.student, len(SYNTHETIC), config.input).eval()
    if config.student.detector == "retinanet":
        # An untrained RetinaNet's head (std 0.01 init, prior-probability bias) gives anchor boxes
        # with tied ~0.01 scores: widen it so verification compares distinct, spread detections.
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=0.1)
        torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, -2.0)
    return save_checkpoint(path, model.state_dict(), meta_for("student", config, "student", SYNTHETIC, preset))


@pytest.fixture(scope="module")
def retina_ckpt(module_tmp) -> Path:
    return _tiny_checkpoint(module_tmp("retina") / "model.safetensors", "tiny-synthetic", 0.05)


@pytest.fixture(scope="module")
def frcnn_ckpt(module_tmp) -> Path:
    return _tiny_checkpoint(module_tmp("frcnn") / "model.safetensors", "tiny-synthetic-frcnn", 0.01)


def _check_onnx_cli(ckpt: Path, detector: str) -> dict:
    result = runner.invoke(app, ["export", str(ckpt), "--verify", "--json", "-"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    out = ckpt.with_name("model.onnx")
    assert figures["file"] == str(out) and out.is_file() and figures["detector"] == detector
    verify = figures["verify"]
    assert verify["passed"] and verify["mismatched"] == 0 and not verify["nothing_compared"]
    assert verify["status"] == "passed"
    assert verify["detections_reference"] > 0 and verify["matched"] > 0  # boxes were really compared
    assert verify["max_box_rel_diff"] <= 1e-3 and verify["max_score_abs_diff"] <= 1e-4
    assert not list(ckpt.parent.glob(".*.tmp"))
    return figures


def test_onnx_retinanet_cli_verify_and_metadata(retina_ckpt):
    import onnx

    figures = _check_onnx_cli(retina_ckpt, "retinanet")
    model = onnx.load(figures["file"], load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == list(SYNTHETIC)
    assert props["input_size"] == str(SIZE) and props["detector"] == "retinanet" and props["backbone"] == "resnet18"
    assert json.loads(props["normalisation"])["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert props["stage"] == "student" and props["source_sha256"] == load_checkpoint(retina_ckpt).sha256
    assert props["ds2d2_version"]
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]


def test_onnx_faster_rcnn_cli_verify_with_image(frcnn_ckpt, tmp_path):
    from PIL import Image

    image = tmp_path / "scene.png"  # a non-square user image: resized to the input size for verify
    array = (synthetic_image(160, seed=4).permute(1, 2, 0).numpy()[:, :96] * 255).astype(np.uint8)
    Image.fromarray(array).save(image)
    out = tmp_path / "frcnn.onnx"
    result = runner.invoke(app, ["export", str(frcnn_ckpt), "--out", str(out), "--verify", "--image", str(image),
                                 "--opset", "18", "--json", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output
    assert "passed" in result.stdout and "frcnn.onnx" in result.stdout
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["detector"] == "faster_rcnn" and figures["opset"] == 18 and out.is_file()
    assert figures["verify"]["passed"] and figures["verify"]["matched"] > 0


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*tuple in scripting:UserWarning")
def test_torchscript_round_trip(retina_ckpt, tmp_path):
    from ds2d2_cli.export import export_torchscript, load_torchscript
    from ds2d2_cli.models.detectors import model_from_checkpoint

    out = tmp_path / "student.torchscript.pt"
    result = export_torchscript(retina_ckpt, out, verify=True)
    assert result["verify"]["passed"] and result["verify"]["matched"] > 0
    module, meta = load_torchscript(out)
    assert json.loads(meta["classes"]) == list(SYNTHETIC)
    image = synthetic_image(SIZE, seed=1)
    with torch.no_grad():
        scripted = torch.jit.load(str(out))([image])[0]
        eager = model_from_checkpoint(load_checkpoint(retina_ckpt))([image])[0]
    assert len(eager["boxes"]) > 0
    torch.testing.assert_close(scripted["boxes"], eager["boxes"])
    torch.testing.assert_close(scripted["labels"], eager["labels"])


def test_fp16_safetensors_loads_back(retina_ckpt):
    from ds2d2_cli.models.detectors import model_from_checkpoint

    result = runner.invoke(app, ["export", str(retina_ckpt), "--format", "safetensors", "--verify", "--json", "-"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    out = retina_ckpt.with_name("model.fp16.safetensors")
    assert figures["file"] == str(out)
    assert 0.45 < out.stat().st_size / retina_ckpt.stat().st_size < 0.55
    half = load_checkpoint(out, stage="student")
    assert half.meta.classes == list(SYNTHETIC)
    assert all(t.dtype == torch.float16 for t in half.tensors.values() if t.is_floating_point())
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata()["dtype"] == "float16"
    # --verify loaded it back through load_checkpoint + model_from_checkpoint and compared detections
    verify = figures["verify"]
    assert verify["strict"] is False and verify["detections_reference"] > 0
    assert verify["matched"] >= 0.8 * verify["detections_reference"]
    assert verify["max_box_rel_diff"] < 1e-2 and verify["max_score_abs_diff"] < 1e-2
    assert next(model_from_checkpoint(half).parameters()).dtype == torch.float32


def test_refuses_amplifier_and_non_checkpoint(tmp_path):
    config = load_config("tiny-synthetic", TINY)
    amplifier = tmp_path / "amplifier.safetensors"
    save_checkpoint(amplifier, {"w": torch.zeros(2)},
                    meta_for("amplifier", config, "teacher", SYNTHETIC, "tiny-synthetic", teacher_sha256="0" * 64))
    teacher = tmp_path / "teacher.safetensors"  # teachers are detectors: accepted
    save_checkpoint(teacher, {"w": torch.zeros(2)}, meta_for("teacher", config, "teacher", SYNTHETIC, "tiny-synthetic"))
    assert load_detector_checkpoint(teacher).meta.stage == "teacher"
    junk = tmp_path / "notes.safetensors"
    junk.write_text("not a checkpoint at all")
    for path, words in ((amplifier, "amplifier checkpoint, not a detector"), (junk, "not a safetensors file")):
        result = runner.invoke(app, ["export", str(path), "--verify"])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amplifier.safetensors", "notes.safetensors", "teacher.safetensors"]


def test_bad_options_are_one_line_errors(retina_ckpt):
    for args, words in ((["--format", "tflite"], "--format must be one of"),
                        (["--format", "torchscript", "--opset", "17"], "--opset only applies"),
                        (["--opset", "11"], "--opset must be between 17 and 20"),
                        (["--out", str(retina_ckpt)], "would overwrite the checkpoint")):
        result = runner.invoke(app, ["export", str(retina_ckpt), *args])
        assert result.exit_code == 2 and words in result.output, (args, result.output)


def test_comparison_flags_real_differences():
    ref = {"boxes": [[10, 10, 50, 50], [60, 60, 90, 90]], "scores": [0.9, 0.5], "labels": [1, 2]}
    same = compare_detections(ref, ref, score_thresh=0.05, detections_per_img=100)
    assert same["matched"] == 2 and same["mismatched"] == 0 and same["max_box_abs_diff"] == 0
    moved = {**ref, "boxes": [[10, 10, 50, 50], [60, 60, 95, 90]]}
    figures = compare_detections(ref, moved, score_thresh=0.05, detections_per_img=100)
    assert figures["mismatched"] == 2 and figures["matched"] == 1
    with pytest.raises(Ds2d2Error, match="verification failed"):
        _summarise([figures], "onnxruntime")
    # a detection only one side has, right at the score threshold, is float noise
    extra = {"boxes": ref["boxes"] + [[0, 0, 5, 5]], "scores": ref["scores"] + [0.05000001], "labels": [1, 2, 3]}
    figures = compare_detections(ref, extra, score_thresh=0.05, detections_per_img=100)
    assert figures["mismatched"] == 0 and figures["unmatched_near_cutoff"] == 1


def test_verify_that_compared_nothing_says_so(tmp_path):
    """A model that detects nothing passes vacuously: the summary must not read as a real check."""
    ckpt = _tiny_checkpoint(tmp_path / "model.safetensors", "tiny-synthetic", 0.999)
    result = runner.invoke(app, ["export", str(ckpt), "--verify", "--json", str(tmp_path / "export.json")])
    assert result.exit_code == 0, result.output
    verify = json.loads((tmp_path / "export.json").read_text())["verify"]
    assert verify["nothing_compared"] and verify["detections_reference"] == verify["detections_exported"] == 0
    assert verify["status"] == "inconclusive"
    assert "inconclusive" in result.stdout and "--image" in result.stdout
