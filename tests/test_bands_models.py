"""Detectors over any number of bands: the first convolution, its RGB-filter inflation, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from ds2d2_cli.checkpoint import meta_for, save_checkpoint
from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import InputConfig, ModelConfig, load_config
from ds2d2_cli.errors import InputError
from ds2d2_cli.models.backbones import build_resnet_body, inflate_first_conv
from ds2d2_cli.models.detectors import build_detector
from ds2d2_cli.sample import RGB, SampleSpec

runner = CliRunner()
SIZE = 64
RGBN = ("red", "green", "blue", "nir")
SENTINEL2 = ("coastal", "blue", "green", "red", "re1", "re2", "re3", "nir", "nir08", "vapour", "cirrus", "swir1",
             "swir2")


def _spec(bands: tuple[str, ...]) -> SampleSpec:
    n = len(bands)
    return SampleSpec(bands=bands, dtype="uint16", scaling="percentile", low=(100.0,) * n, high=(3000.0,) * n,
                      mean=tuple(0.3 + 0.02 * i for i in range(n)), std=(0.15,) * n)


def _input(bands: tuple[str, ...]) -> InputConfig:
    return InputConfig(size=SIZE).resolve(_spec(bands))


def _tiny(detector: str, backbone: str = "resnet18", **update) -> ModelConfig:
    return ModelConfig(detector=detector, backbone=backbone, fpn_channels=32, **update)


# ----------------------------------------------------------------------------- inflate_first_conv


def test_inflation_by_hand():
    """W = (red 1, green 2, blue 6): mean filter m = 3; N = 4 gives every extra band m x 3/4 = 2.25."""
    weight = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)
    assert inflate_first_conv(weight, RGBN, "mean").flatten().tolist() == [2.25, 2.25, 2.25, 2.25]
    assert inflate_first_conv(weight, ("grey",), "mean").flatten().tolist() == [9.0]  # the sum of the filters
    # rgb: nir 2.25, each RGB filter gives up 2.25 / 3 = 0.75
    torch.testing.assert_close(inflate_first_conv(weight, RGBN, "rgb").flatten(),
                               torch.tensor([0.25, 1.25, 5.25, 2.25]))
    torch.testing.assert_close(inflate_first_conv(weight, ("nir", "blue", "red", "green"), "rgb").flatten(),
                               torch.tensor([2.25, 5.25, 0.25, 1.25]))
    # no red/green/blue among the bands: rgb is mean
    assert inflate_first_conv(weight, ("vv", "vh"), "rgb").flatten().tolist() == [4.5, 4.5]
    with pytest.raises(ValueError, match="expected RGB filters"):
        inflate_first_conv(torch.zeros(1, 4, 1, 1), RGBN)


@pytest.mark.parametrize("bands", [RGBN, SENTINEL2], ids=["4 bands", "13 bands"])
def test_rgb_inflation_keeps_the_rgb_output_when_extra_bands_are_the_rgb_mean(bands):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    rgb = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)  # normalised bands
    grey = rgb.mean(dim=1)
    image = torch.stack([rgb[:, RGB.index(b)] if b in RGB else grey for b in bands], dim=1)
    inflated = inflate_first_conv(weight, bands, "rgb")
    assert inflated.shape == (8, len(bands), 3, 3)
    torch.testing.assert_close(F.conv2d(image, inflated, padding=1), F.conv2d(rgb, weight, padding=1),
                               atol=1e-6, rtol=0)


def test_one_band_mean_is_the_rgb_conv_on_a_grey_image():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 3, 7, 7, generator=gen, dtype=torch.float64)
    grey = torch.randn(1, 1, 20, 20, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(grey, inflate_first_conv(weight, ("pan",), "mean")),
                               F.conv2d(grey.repeat(1, 3, 1, 1), weight), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- detectors


@pytest.mark.parametrize("bands", [RGBN, ("vv",)], ids=["4 bands", "1 band"])
@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_n_band_detectors_train_and_detect(detector, bands):
    torch.manual_seed(0)
    model = build_detector(_tiny(detector), 3, _input(bands))
    conv1 = model.backbone.body.conv1
    assert conv1.in_channels == len(bands) and conv1.weight.shape == (64, len(bands), 7, 7)
    assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2) and conv1.padding == (3, 3) and conv1.bias is None
    assert conv1.weight.requires_grad  # from scratch every layer trains
    expected_mean = [0.485, 0.456, 0.406, 0.36] if len(bands) == 4 else [0.3]
    assert model.transform.image_mean == pytest.approx(expected_mean)
    images = [torch.rand(len(bands), SIZE, SIZE), torch.rand(len(bands), SIZE, SIZE)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and conv1.weight.grad is not None
    with torch.no_grad():
        found = model.eval()(images)
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4


def test_four_band_mobilenet_student_from_scratch():
    """A new stem convolution with torchvision's other settings and its Kaiming (fan out) init."""
    torch.manual_seed(0)
    model = build_detector(_tiny("retinanet", "mobilenet_v3_large"), 3, _input(RGBN))
    conv = model.backbone.body["0"][0]
    reference = torchvision.models.mobilenet_v3_large().features[0][0]
    assert type(conv) is nn.Conv2d and conv.in_channels == 4
    for setting in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(conv, setting) == getattr(reference, setting)
    assert (conv.bias is None) == (reference.bias is None)
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    with torch.no_grad():
        model.eval()([torch.rand(4, SIZE, SIZE)])


def test_convnext_stem_is_truncated_normal_with_zero_bias():
    torch.manual_seed(0)
    body = build_resnet_body(_tiny("retinanet", "convnext_tiny"), ("vv", "vh"))
    conv = body.features[0][0]
    assert conv.in_channels == 2 and conv.out_channels == 96 and conv.kernel_size == (4, 4) and conv.stride == (4, 4)
    assert torch.equal(conv.bias, torch.zeros(96))
    assert conv.weight.abs().max().item() <= 2.0  # trunc_normal_ cuts at +-2
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_rgb_bodies_are_torchvisions_own(backbone):
    """Red, green, blue: the very module torchvision built, the same random draws (bit-identical runs)."""
    cfg = _tiny("retinanet", backbone)
    torch.manual_seed(0)
    body = build_resnet_body(cfg, RGB)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    reference = torchvision.models.get_model(backbone, weights=None, norm_layer=nn.BatchNorm2d)
    assert torch.equal(after, torch.get_rng_state())
    ours, theirs = body.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    first = body.conv1 if backbone == "resnet18" else body.features[0][0]
    assert type(first) is nn.Conv2d and first.in_channels == 3
    # three bands of other names from scratch: the same model again
    torch.manual_seed(0)
    other = build_resnet_body(cfg, ("vv", "vh", "ratio")).state_dict()
    assert all(torch.equal(other[k], theirs[k]) for k in theirs)


def test_rgb_detector_is_unchanged_by_bands():
    """An RGB preset's input (unresolved, `auto`) builds the same detector as one resolved on 8-bit RGB data."""
    config = load_config("tiny-synthetic", ["input.size=64", "student.backbone=resnet18"])
    torch.manual_seed(0)
    plain = build_detector(config.student, 3, config.input).state_dict()
    torch.manual_seed(0)
    resolved = build_detector(config.student, 3, config.input.resolve(SampleSpec()))
    assert all(torch.equal(plain[k], v) for k, v in resolved.state_dict().items())
    assert resolved.transform.image_mean == [0.485, 0.456, 0.406]
    assert resolved.transform.image_std == [0.229, 0.224, 0.225]


def test_four_band_distillation_step():
    """MGD's parts probe the teacher's pyramid with a blank image of the teacher's bands."""
    from ds2d2_cli.stages.distill import DistillTask

    config = load_config("tiny-synthetic", [f"input.size={SIZE}", "teacher.backbone=resnet18",
                                            "teacher.fpn_channels=32", "student.backbone=resnet18",
                                            "student.fpn_channels=16", "distill.method=mgd"])
    config = config.model_copy(update={"input": config.input.resolve(_spec(RGBN))})
    torch.manual_seed(0)
    task = DistillTask(build_detector(config.student, 3, config.input), build_detector(config.teacher, 3, config.input),
                       config, None)
    task.train_mode()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = task.losses([torch.rand(4, SIZE, SIZE)], targets)
    assert "mgd" in losses and all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------- pretrained weights


def test_local_rgb_weights_are_inflated(tmp_path):
    reference = torchvision.models.resnet18()
    weights = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), weights)
    rgb_filters = reference.conv1.weight.detach()
    for bands, band_init in ((RGBN, "rgb"), (("pan",), "mean"), (SENTINEL2, "mean")):
        cfg = _tiny("retinanet", backbone_weights=weights, band_init=band_init)
        body = build_detector(cfg, 3, _input(bands)).backbone.body
        torch.testing.assert_close(body.conv1.weight, inflate_first_conv(rgb_filters, bands, band_init), atol=0, rtol=0)
        assert torch.equal(body.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    # red, green, blue in another order: the filters follow their bands
    body = build_resnet_body(_tiny("retinanet", backbone_weights=weights), ("blue", "green", "red"))
    assert torch.equal(body.conv1.weight, rgb_filters[:, [2, 1, 0]])
    # a file made for these bands already is taken as it is
    four = reference.state_dict() | {"conv1.weight": torch.randn(64, 4, 7, 7)}
    torch.save(four, tmp_path / "r18-4.pth")
    body = build_resnet_body(_tiny("retinanet", backbone_weights=tmp_path / "r18-4.pth"), RGBN)
    assert torch.equal(body.conv1.weight, four["conv1.weight"])


def test_imagenet_weights_are_inflated(monkeypatch):
    """`pretrained`: the downloaded RGB filters spread over the bands (download replaced by a seeded model)."""
    real = torchvision.models.get_model

    def seeded(name, weights=None, **kwargs):
        assert weights == "DEFAULT"
        torch.manual_seed(7)
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", seeded)
    cfg = _tiny("faster_rcnn", "efficientnet_b0", pretrained=True, band_init="mean")
    frozen_bn = torchvision.ops.misc.FrozenBatchNorm2d
    rgb_filters = seeded("efficientnet_b0", "DEFAULT", norm_layer=frozen_bn).features[0][0].weight
    body = build_resnet_body(cfg, ("vv", "vh"))
    torch.testing.assert_close(body.features[0][0].weight, inflate_first_conv(rgb_filters, ("vv", "vh"), "mean"),
                               atol=0, rtol=0)


# ----------------------------------------------------------------------------- export


def _band_checkpoint(path: Path, bands: tuple[str, ...], preset: str = "tiny-synthetic") -> Path:
    config = load_config(preset, [f"input.size={SIZE}", "student.backbone=resnet18", "student.fpn_channels=16"])
    config = config.model_copy(update={"input": config.input.resolve(_spec(bands))})
    torch.manual_seed(0)
    model = build_detector(config.student, len(SYNTHETIC), config.input).eval()
    for module in model.head.modules():  # spread scores, as tests/test_export.py does
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.1)
    nn.init.constant_(model.head.classification_head.cls_logits.bias, -2.0)
    return save_checkpoint(path, model.state_dict(), meta_for("student", config, "student", SYNTHETIC, preset))


@pytest.mark.parametrize("bands", [RGBN, ("vv",)], ids=["4 bands", "1 band"])
def test_onnx_export_of_band_checkpoints_verifies(bands, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    ckpt = _band_checkpoint(tmp_path / "model.safetensors", bands)
    result = runner.invoke(app, ["export", str(ckpt), "--verify", "--json", "-"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    verify = figures["verify"]
    assert verify["status"] == "passed" and verify["matched"] > 0 and verify["mismatched"] == 0
    assert figures["input"].startswith(f"image float32 [{len(bands)}, {SIZE}, {SIZE}], ")
    model = onnx.load(figures["file"])
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [len(bands), SIZE, SIZE]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["bands"]) == list(bands)
    assert SampleSpec.model_validate_json(props["sample"]) == _spec(bands)
    assert len(json.loads(props["normalisation"])["mean"]) == len(bands)
    assert ", ".join(bands) in model.doc_string and "percentile scaling" in model.doc_string


def test_verification_images_have_the_models_bands():
    from ds2d2_cli.export import synthetic_image, verification_images

    spec = _spec(RGBN)
    (image,) = verification_images(None, SIZE, spec)
    assert image.shape == (4, SIZE, SIZE)
    assert torch.equal(verification_images(None, SIZE)[0], synthetic_image(SIZE))  # RGB: the scene as before
    (resized,) = verification_images([torch.full((4, 32, 40), 1.5)], SIZE, spec)
    assert resized.shape == (4, SIZE, SIZE) and torch.all(resized == 1.5)  # scaled values are not clipped
    with pytest.raises(InputError) as caught:
        verification_images([torch.rand(3, SIZE, SIZE)], SIZE, spec)
    assert str(caught.value) == "the model reads 4 bands (red, green, blue, nir); the image has 3"
    with pytest.raises(InputError, match=r"^the model reads 1 band \(vv\); the image has 4$"):
        verification_images([torch.rand(4, SIZE, SIZE)], SIZE, _spec(("vv",)))
