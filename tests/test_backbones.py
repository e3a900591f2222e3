"""Student backbones people deploy (MobileNetV3, EfficientNet, RegNet, ConvNeXt) behind the same FPN."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.models.backbones import STAGES
from ds2d2_cli.models.detectors import build_detector, count_parameters

from conftest import TINY

runner = CliRunner()
SMALL_ONES = ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn"])
@pytest.mark.parametrize("backbone", sorted(STAGES))
def test_every_backbone_gives_the_teachers_pyramid(preset, backbone):
    """Same level names and sizes as the ResNet teacher: every distillation term applies unchanged."""
    config = load_config(preset, [f"student.backbone={backbone}"])
    student = build_detector(config.student, 5, config.input).eval()
    teacher = build_detector(config.teacher, 5, config.input).eval()
    probe = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        s, t = student.backbone(probe), teacher.backbone(probe)
    assert list(s) == list(t)
    assert all(s[k].shape == t[k].shape for k in s)  # both FPNs are 64 wide in the tiny presets
    if backbone in SMALL_ONES:
        resnet18 = build_detector(config.student.model_copy(update={"backbone": "resnet18"}), 5, config.input)
        assert count_parameters(student) < 0.75 * count_parameters(resnet18)


def test_pretrained_freezing_by_stage(tmp_path):
    """With (local) ImageNet weights: frozen BN, and only the top `trainable_layers` stages train."""
    import torchvision

    weights = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), weights)
    config = load_config("tiny-synthetic", ["student.backbone=mobilenet_v3_large",
                                            f"student.backbone_weights={weights}", "student.trainable_layers=2"])
    body = build_detector(config.student, 5, config.input).backbone.body
    trains = {name: any(p.requires_grad for p in child.parameters()) for name, child in body.named_children()}
    # C2 ends at child 3, C3 at 6, C4 at 12, C5 at 16: stem, C2 and C3 frozen, C4 and C5 train
    assert not any(trains[str(i)] for i in range(0, 7)) and all(trains[str(i)] for i in range(7, 17))
    assert any(isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d) for m in body.modules())
    loaded = torchvision.models.mobilenet_v3_large(weights=None)
    loaded.load_state_dict(torch.load(weights))
    assert torch.equal(body["0"][0].weight, loaded.features[0][0].weight)
    with pytest.raises(Exception, match="do not fit this backbone"):
        bad = load_config("tiny-synthetic", ["student.backbone=efficientnet_b0", f"student.backbone_weights={weights}"])
        build_detector(bad.student, 5, bad.input)


def test_a_mobilenet_student_distills_exports_and_predicts(tiny_data, tmp_path):
    sets = [arg for item in [*TINY, "student.backbone=mobilenet_v3_large"] for arg in ("--set", item)]
    common = ["--preset", "tiny-synthetic", "--data", str(tiny_data), "--max-iters", "2", *sets]

    def run(*args, device=True):
        result = runner.invoke(app, [*args, *(["--device", "cpu"] if device else [])])
        assert result.exit_code == 0, result.output
        return result

    run("train-teacher", *common, "--out", str(tmp_path / "teacher"))
    teacher = tmp_path / "teacher/model.safetensors"
    run("train-amplifier", *common, "--teacher", str(teacher), "--out", str(tmp_path / "amplifier"))
    run("distill", *common, "--teacher", str(teacher), "--amplifier", str(tmp_path / "amplifier/model.safetensors"),
        "--out", str(tmp_path / "student"))
    summary = json.loads((tmp_path / "student/summary.json").read_text())
    assert summary["implicit_input"] == "adapted"  # a 16-wide student FPN (TINY) under a 32-wide teacher
    student = tmp_path / "student/model.safetensors"
    metrics = json.loads(run("eval", str(student), "--data", str(tiny_data), "--json", "-").stdout)
    assert 0.0 <= metrics["AP50"] <= 1.0
    pytest.importorskip("onnxruntime")
    run("export", str(student), "--out", str(tmp_path / "student.onnx"), "--verify", device=False)
    image = next((tiny_data / "val" / "images").glob("*.png")) if (tiny_data / "val" / "images").is_dir() else None
    if image is None:
        image = next(tiny_data.rglob("*.png"))
    found = json.loads(run("predict", str(tmp_path / "student.onnx"), str(image), "--out", str(tmp_path / "pred"),
                           "--slice", "128", "--overlap", "32", "--json", "-", device=False).stdout)
    assert found["images"] == 1
