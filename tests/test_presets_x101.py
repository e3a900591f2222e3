"""The authors' strong-teacher presets (X101-64x4d teacher, R18 student): their configs' values.

PolarAid/DS2D2 configs/retinanet/retinanet_x101-64x4d_fpn_2x_{dior,dota}.py,
faster_rcnn/faster-rcnn_x101-64x4d_fpn_2x_dior.py and distillation/ds2d2_*-amplifier_x101-64x4d_*
differ from the R101 configs only in the backbone, so each preset is its R101 preset with
another teacher backbone.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import available_presets, load_config
from ds2d2_cli.models.backbones import resolved_norm, stage_channels

runner = CliRunner()

# preset: (R101 preset, classes, input size, lr for 16 images, explicit low / high, implicit full / high)
X101 = {
    "retina-dior-x101": ("retina-dior", "dior", 800, 0.005, (1e-5, 1e-5, 1.0, 1.0)),
    "retina-dota-x101": ("retina-dota", "dota-v1.0", 1024, 0.005, (7e-5, 5e-5, 0.7, 0.5)),
    "frcnn-dior-x101": ("frcnn-dior", "dior", 800, 0.02, (0.5, 0.5, 1e-5, 1e-5)),
}


@pytest.mark.parametrize("preset", sorted(X101))
def test_x101_presets_carry_the_authors_values(preset):
    r101, classes, size, lr, weights = X101[preset]
    config = load_config(preset)
    t = config.teacher
    # ResNeXt depth 101, groups 64, base_width 4, ImageNet weights, frozen_stages=1, norm_eval=True with trainable BN scale and shift (bn_eval)
    assert (t.backbone, t.fpn_channels, t.pretrained, t.trainable_layers, resolved_norm(t)) == (
        "resnext101_64x4d", 256, True, 3, "bn_eval")
    s = config.student
    assert (s.backbone, s.fpn_channels, s.pretrained) == ("resnet18", 256, True)
    assert (config.data.classes, config.input.size) == (classes, size)
    train = config.schedule("teacher")
    assert config.schedule_key("teacher") == config.schedule_key("amplifier") == config.schedule_key("student")
    assert (train.lr, train.lr_base_batch, train.epochs, train.warmup_iters) == (lr, 16, 24, 500)
    assert [round(f * train.epochs) for f in train.lr_steps] == [16, 22]  # schedule_2x milestones
    assert (train.optimizer, train.momentum, train.weight_decay, train.augment) == ("sgd", 0.9, 1e-4, ("hflip",))
    w = config.distill.weights
    assert (w.explicit_low, w.explicit_high, w.implicit_full, w.implicit_high) == weights
    if t.detector == "faster_rcnn":
        assert (t.rpn_post_nms_top_n_train, t.roi_sampling_ratio, t.roi_aligned) == (1000, 0, True)
    # everything but the teacher's backbone (and the preset's name) is its R101 preset's
    mine, base = config.model_dump(exclude={"name", "description"}), load_config(r101).model_dump(
        exclude={"name", "description"})
    assert mine["teacher"].pop("backbone") == "resnext101_64x4d" and base["teacher"].pop("backbone") == "resnet101"
    assert mine == base


def test_presets_lists_and_shows_the_x101_presets():
    assert set(X101) <= set(available_presets())
    listed = runner.invoke(app, ["presets"])
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if "-x101" in line]
    assert len(rows) == 3 and all("X101-64x4d-FPN256" in row and "R18-FPN256" in row for row in rows)
    for preset, (_, _, size, lr, weights) in X101.items():
        shown = runner.invoke(app, ["presets", preset])
        assert shown.exit_code == 0, shown.output
        resolved = json.loads(shown.stdout)
        assert resolved["name"] == preset and resolved["teacher"]["backbone"] == "resnext101_64x4d"
        assert (resolved["input"]["size"], resolved["train"]["lr"]) == (size, lr)
        assert resolved["distill"]["weights"]["implicit_high"] == weights[3]


@pytest.mark.parametrize("preset", ["retina-dota-x101", "frcnn-dior-x101"])
@pytest.mark.parametrize("student", ["resnet34", "resnet50"])
def test_a_resnet34_or_50_student_is_one_set_away(preset, student):
    """The authors' R34 / R50 student configs (ds2d2_retinanet_r{34,50}_fpn_2x_dota.py,
    ds2d2_faster-rcnn_r{34,50}_fpn_2x_dior.py) differ from the R18 ones only in depth and the
    FPN's input channels, which follow the backbone here."""
    from ds2d2_cli.models.detectors import build_detector

    config = load_config(preset, [f"student.backbone={student}", "student.pretrained=false"])
    fpn = build_detector(config.student, 20, config.input).backbone.fpn
    used = stage_channels(student)[1:] if config.student.detector == "retinanet" else stage_channels(student)
    assert [block[0].in_channels for block in fpn.inner_blocks] == list(used)
    assert used[-1] == (512 if student == "resnet34" else 2048)  # [64..512] or [256..2048] in their configs
