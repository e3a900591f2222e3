"""Student backbones people deploy (MobileNetV3, EfficientNet, RegNet, ConvNeXt) behind the same FPN, and the
authors' strong teacher (ResNeXt-101 64x4d)."""

from __future__ import annotations

import json
import typing

import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import Backbone, load_config
from ds2d2_cli.models.backbones import BACKBONES, STAGES
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


def test_bn_eval_keeps_imagenet_statistics_and_trains_scale_and_shift_in_trainable_stages(tmp_path):
    """norm bn_eval (the authors' norm_eval=True, requires_grad=True): batch norm normalises with
    the loaded running statistics in training too and never updates them; its weight and bias
    get gradients in the trainable stages only (frozen_bn freezes both)."""
    import torchvision

    from ds2d2_cli.models.backbones import EvalBatchNorm2d

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    for module in reference.modules():  # statistics a forward would visibly use
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), weights)
    config = load_config("tiny-synthetic", [f"student.backbone_weights={weights}", "student.norm=bn_eval",
                                            "student.trainable_layers=3"])
    model = build_detector(config.student, 5, config.input).train()
    body = model.backbone.body
    norms = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, EvalBatchNorm2d) and not m.training for m in norms)
    assert torch.equal(body.layer4[0].bn1.running_var, reference.layer4[0].bn1.running_var)
    before = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    out = model.backbone(torch.rand(2, 3, 64, 64))
    sum(level.sum() for level in out.values()).backward()
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items() if "running" in k)
    assert body.layer4[0].bn1.weight.grad is not None and body.layer2[0].bn1.bias.grad.abs().sum() > 0
    assert not body.layer1[0].bn1.weight.requires_grad and not body.bn1.weight.requires_grad
    with torch.no_grad():  # in training mode it is the eval-mode layer of the loaded weights
        x = torch.rand(1, 64, 8, 8)
        assert torch.allclose(body.layer1[0].bn1(x), reference.layer1[0].bn1.eval()(x))


def test_the_paper_presets_use_the_authors_batch_norm():
    for preset in ("retina-dior", "retina-dota", "frcnn-dior", "frcnn-dota", "retina-obb-dota", "retina-dior-x101"):
        config = load_config(preset)
        assert config.teacher.norm == "bn_eval" and config.student.norm == "bn_eval", preset


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


def test_the_config_offers_exactly_the_backbones_that_build():
    """`ModelConfig.backbone`'s choices (what `--set ROLE.backbone=` accepts and errors list) are
    the bodies `build_resnet_body` knows, ResNeXt-101 64x4d included."""
    assert set(typing.get_args(Backbone)) == set(BACKBONES)
    assert "resnext101_64x4d" in BACKBONES


@pytest.fixture(scope="module")
def resnext101_64x4d():
    """torchvision's ResNeXt-101 64x4d classifier, built from scratch (no download)."""
    import torchvision

    return torchvision.models.resnext101_64x4d(weights=None)


# Levels the teacher's FPN returns at a 64 px input: name -> (stride, channels in from the body).
X101_PYRAMIDS = {
    "retina-dior-x101": ({"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128}, [512, 1024, 2048]),
    "frcnn-dior-x101": ({"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}, [256, 512, 1024, 2048]),
}


@pytest.mark.parametrize("preset", sorted(X101_PYRAMIDS))
def test_the_strong_teacher_is_torchvisions_resnext101_64x4d_under_the_usual_fpn(preset, resnext101_64x4d):
    """The X101 presets' teacher: torchvision's body tensor for tensor (so a torchvision state_dict
    loads with --backbone-weights), under the same 256-wide pyramid as the R101 teacher."""
    reference = resnext101_64x4d
    assert round(count_parameters(reference) / 1e6, 1) == 83.5  # torchvision's figure for the classifier
    config = load_config(preset, ["teacher.pretrained=false"])  # from scratch: nothing to download
    assert config.teacher.backbone == "resnext101_64x4d"
    backbone = build_detector(config.teacher, 20, config.input).eval().backbone
    body_shapes = {k: v.shape for k, v in backbone.body.state_dict().items()}
    assert body_shapes == {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert count_parameters(backbone.body) == count_parameters(reference) - count_parameters(reference.fc)
    assert backbone.body.layer1[0].conv2.groups == 64 and backbone.body.layer1[0].conv2.out_channels == 256
    levels, fpn_inputs = X101_PYRAMIDS[preset]
    assert [block[0].in_channels for block in backbone.fpn.inner_blocks] == fpn_inputs
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 64, 64))
    assert {name: tuple(f.shape) for name, f in out.items()} == {
        name: (1, 256, -(-64 // stride), -(-64 // stride)) for name, stride in levels.items()}


def test_the_strong_teachers_imagenet_weights_offline_and_a_resnet_file(tmp_path, monkeypatch):
    """pretrained asks torchvision for ResNeXt101_64X4D_Weights.IMAGENET1K_V1; offline that is the
    usual one-line error naming --backbone-weights, and a ResNet file does not fit the grouped body."""
    import torchvision.models._api as weights_api
    from torchvision.models import ResNeXt101_64X4D_Weights

    from ds2d2_cli.errors import Ds2d2Error, InputError
    from ds2d2_cli.models.backbones import build_resnet_body

    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    config = load_config("retina-dior-x101")
    assert config.teacher.pretrained
    with pytest.raises(Ds2d2Error, match="cannot get ImageNet weights for resnext101_64x4d.*--backbone-weights"):
        build_resnet_body(config.teacher)
    assert asked == [ResNeXt101_64X4D_Weights.IMAGENET1K_V1.url]
    resnet_file = tmp_path / "r18-part.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3)},
               resnet_file)
    local = config.teacher.model_copy(update={"backbone_weights": resnet_file})
    with pytest.raises(InputError, match=r"do not fit this backbone \(.*layer1\.0\.conv2\.weight"):
        build_resnet_body(local)
