"""The study's baselines: CWD, PKD, MGD, FGD (hand-computed values, gradients, CLI runs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import ds2d2_cli
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import _preset_mapping, load_config, presets_folder
from ds2d2_cli.distill.fgd import fgd_attention, fgd_context_blocks, fgd_losses, fgd_masks
from ds2d2_cli.distill.mgd import MGDGenerator, mgd_generators, mgd_loss, random_mask
from ds2d2_cli.distill.registry import METHODS, REFERENCE_SETTINGS
from ds2d2_cli.errors import Ds2d2Error

from conftest import TINY

runner = CliRunner()
BASELINES = ("cwd", "pkd", "mgd", "fgd")


# ----------------------------------------------------------------------------- CWD


def test_cwd_hand_value_and_temperature():
    # one channel, two locations: p_T = softmax(ln 3, 0) = (3/4, 1/4), p_S = (1/2, 1/2)
    s, t = torch.zeros(1, 1, 1, 2), torch.tensor([[[[math.log(3.0), 0.0]]]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ds2d2_cli.cwd_loss([s], [t]).item() == pytest.approx(kl, rel=1e-6)
    # tau = 2: p_T = (sqrt 3, 1) / (sqrt 3 + 1), times tau^2
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert ds2d2_cli.cwd_loss([s], [t], tau=2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    # divided by N * C: the same channel twice in the batch and twice over channels gives the same
    assert ds2d2_cli.cwd_loss([s.expand(2, 2, 1, 2)], [t.expand(2, 2, 1, 2)]).item() == pytest.approx(kl, rel=1e-6)
    # summed over levels, unweighted
    assert ds2d2_cli.cwd_loss([s, s], [t, t]).item() == pytest.approx(2 * kl, rel=1e-6)
    assert ds2d2_cli.cwd_loss([t], [t]).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- PKD


def test_pkd_hand_value_and_scale_invariance():
    s = torch.tensor([0.0, 1, 2, 3]).reshape(1, 1, 2, 2)
    # norm(s) = (s - 1.5) / sqrt(5/3) (Bessel); t reversed -> norm(t) = -norm(s):
    # mean((2 norm s)^2) / 2 = 2 * mean(norm s^2) = 2 * 1.25 / (5/3) = 1.5
    assert ds2d2_cli.pkd_loss([s], [s.flip(-1).flip(-2)]).item() == pytest.approx(1.5, rel=1e-5)
    # Pearson: an affine copy of the student (positive scale) is a perfect imitation
    assert ds2d2_cli.pkd_loss([s], [10 * s + 5]).item() == pytest.approx(0.0, abs=1e-6)
    assert ds2d2_cli.pkd_loss({"a": s, "b": s}, {"a": -s, "b": 3 * s}).item() == pytest.approx(1.5, rel=1e-5)
    # a student level of another size is resized to the teacher's (MMRazor's resize_stu)
    small = torch.rand(2, 3, 4, 4)
    big = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert ds2d2_cli.pkd_loss([small], [big]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(Ds2d2Error, match="channels need an Adapter"):
        ds2d2_cli.pkd_loss([torch.rand(1, 2, 4, 4)], [torch.rand(1, 3, 4, 4)])


# ----------------------------------------------------------------------------- MGD


def _identity_generator(channels: int = 1) -> MGDGenerator:
    block = MGDGenerator(channels)
    with torch.no_grad():
        for conv in (block.generation[0], block.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(channels):
                conv.weight[c, c, 1, 1] = 1.0
    return block


def test_mgd_hand_value_with_a_given_mask():
    s = torch.tensor([[1.0, 2], [3, 4]]).reshape(1, 1, 2, 2)
    mask = torch.tensor([[1.0, 0], [1, 1]]).reshape(1, 1, 2, 2)
    t = torch.ones(1, 1, 2, 2)
    block = _identity_generator()
    # generated = s * mask = [[1, 0], [3, 4]]: squared errors 0 + 1 + 4 + 9, summed, / N
    assert mgd_loss([s], [t], [block], masks=[mask]).item() == pytest.approx(14.0)
    assert mgd_loss([s.repeat(2, 1, 1, 1)], [t.repeat(2, 1, 1, 1)], [block],
                    masks=[mask.repeat(2, 1, 1, 1)]).item() == pytest.approx(14.0)


def test_mgd_mask_draws_the_reference_share_and_is_shared_by_channels():
    feature = torch.zeros(4, 8, 100, 100)
    mask = random_mask(feature, 0.65, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 100, 100)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (1 - mask.mean().item()) == pytest.approx(0.65, abs=0.01)
    assert random_mask(feature, 0.0).min().item() == 1.0
    with pytest.raises(ValueError, match="mask ratio"):
        mgd_loss([feature], [feature], mgd_generators(8, ["p3"]), mask_ratio=1.0)


# ----------------------------------------------------------------------------- FGD


def test_fgd_masks_by_hand():
    box = torch.tensor([[0.0, 0, 4, 4]])  # 16 px image, 4x4 map: cells 0..ceil(1) -> 2x2, 1/4 each
    fg, bg = fgd_masks([box], [(16, 16)], (4, 4))
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 0.25
    assert torch.equal(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 12)
    # an overlapping larger box: 3x3 cells at 1/9; the shared cell keeps the larger 1/4
    fg, _ = fgd_masks([torch.tensor([[0.0, 0, 4, 4], [4, 4, 12, 12]])], [(16, 16)], (4, 4))
    assert fg[0, 1, 1].item() == 0.25 and fg[0, 3, 3].item() == pytest.approx(1 / 9) and fg[0, 0, 3] == 0
    # scaled by the image's own size before padding (the FGD authors' img_shape): 8 px -> 3x3 cells
    fg, _ = fgd_masks([box], [(8, 8)], (4, 4))
    assert (fg[0] > 0).sum().item() == 9 and fg[0, 0, 0].item() == pytest.approx(1 / 9)
    # an image without boxes: all background, normalised to sum 1
    fg, bg = fgd_masks([torch.zeros(0, 4)], [(16, 16)], (4, 4))
    assert fg.sum() == 0 and bg.sum().item() == pytest.approx(1.0)


def test_fgd_attention_by_hand():
    x = torch.tensor([0.0, 0.5 * math.log(3)]).reshape(1, 2, 1, 1)
    spatial, channel = fgd_attention(x, temperature=0.5)
    assert spatial.item() == pytest.approx(1.0)  # one location
    assert channel[0].tolist() == pytest.approx([0.5, 1.5])  # 2 * softmax(0, ln 3)


def test_fgd_parts_by_hand():
    # teacher 1 everywhere: uniform attention (1 per cell and channel); student 0
    s, t = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    blocks = fgd_context_blocks(1 * 2, ["p3"])  # two channels for the context transform's C/2
    s, t = s.repeat(1, 2, 1, 1), t.repeat(1, 2, 1, 1)
    parts = fgd_losses([s], [t], [torch.tensor([[0.0, 0, 4, 4]])], [(16, 16)], blocks, temperature=0.5)
    # fg: 2 channels x 4 cells x 1/4 = 2; bg: 2 channels x 12 cells x 1/12 = 2
    assert parts["fg"].item() == pytest.approx(2.0) and parts["bg"].item() == pytest.approx(2.0)
    assert parts["attention"].item() == pytest.approx(0.0, abs=1e-6)  # both uniform
    # the context blocks start as the identity (last conv zero): plain summed MSE / N = 32
    assert parts["global"].item() == pytest.approx(32.0)
    with pytest.raises(Ds2d2Error, match="2 context blocks for 1 FPN levels"):
        fgd_losses([s], [t], [torch.zeros(0, 4)], [(16, 16)], fgd_context_blocks(2, ["a", "b"]))


# ----------------------------------------------------------------------------- gradients


def _grad_case(name: str):
    torch.manual_seed(0)
    s = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 4, 4, 4, requires_grad=True)]
    t = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 4, 4, 4, requires_grad=True)]
    boxes = [torch.tensor([[4.0, 4, 20, 24]]), torch.tensor([[30.0, 2, 60, 40], [0, 0, 8, 8]])]
    parts = None
    if name == "cwd":
        loss = ds2d2_cli.cwd_loss(s, t, tau=1.0)
    elif name == "pkd":
        loss = ds2d2_cli.pkd_loss(s, t)
    elif name == "mgd":
        parts = ds2d2_cli.mgd_generators(4, ["p3", "p4"])
        loss = ds2d2_cli.mgd_loss(s, t, parts, mask_ratio=0.5)
    else:
        parts = ds2d2_cli.fgd_context_blocks(4, ["p3", "p4"])
        loss = sum(ds2d2_cli.fgd_losses(s, t, boxes, [(64, 64), (64, 64)], parts).values())
    return loss, s, t, parts


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_the_student_and_the_methods_parts_never_the_teacher(name):
    loss, s, t, parts = _grad_case(name)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    if parts is not None:
        for level in parts.values():
            sides = [level.student, level.teacher] if name == "fgd" else [level]
            for side in sides:
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())


# ----------------------------------------------------------------------------- config and presets


def test_reference_settings_fill_per_family_and_presets_state_them():
    for preset in sorted(p.stem for p in presets_folder().glob("*.yaml")):
        config = load_config(preset)
        family = config.student.detector
        reference = REFERENCE_SETTINGS[family]
        raw = _preset_mapping(preset)[0]["distill"]  # the preset file, or the base it inherits from, says it
        for section, values in reference.items():
            stated = raw["weights"] if section == "weights" else raw[section]
            target = config.distill.weights if section == "weights" else getattr(config.distill, section)
            for key, value in values.items():
                assert stated[key] == value, (preset, section, key)  # the preset says it, as the reference
                assert getattr(target, key) == value
    frcnn = load_config("tiny-synthetic-frcnn", ["distill.weights.pkd=3", "distill.mgd.levels=2"])
    assert frcnn.distill.weights.pkd == 3 and frcnn.distill.mgd.levels == 2 and frcnn.distill.mgd.mask_ratio == 0.45
    assert set(BASELINES) <= set(METHODS)


# ----------------------------------------------------------------------------- CLI, both families


def _run(args, code=0, device=True):
    result = runner.invoke(app, [*args, *(["--device", "cpu"] if device else [])])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def teachers(tiny_data, module_tmp):
    built: dict[str, tuple] = {}

    def get(preset: str) -> tuple:
        if preset not in built:
            runs = module_tmp(f"baselines-{preset}")
            common = ["--preset", preset, "--data", str(tiny_data), "--max-iters", "2",
                      *[a for item in TINY for a in ("--set", item)]]
            _run(["train-teacher", *common, "--out", str(runs / "teacher")])
            built[preset] = (runs, common)
        return built[preset]

    return get


TERMS = {"cwd": ["cwd"], "pkd": ["pkd"], "mgd": ["mgd"], "fgd": ["fgd_fg", "fgd_bg", "fgd_attention", "fgd_global"]}


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn"])
@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_distills_a_student_of_either_family(teachers, preset, method, tmp_path):
    runs, common = teachers(preset)
    out = tmp_path / method
    _run(["distill", *common, "--teacher", str(runs / "teacher/model.safetensors"), "--method", method,
          "--out", str(out)])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    for term in TERMS[method]:  # every term logged on its own
        assert all(math.isfinite(step[term]) for step in steps) and any(step[term] > 0 for step in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    config = json.loads((out / "config.json").read_text())
    family = "faster_rcnn" if preset.endswith("frcnn") else "retinanet"
    assert config["distill"]["weights"]["pkd"] == REFERENCE_SETTINGS[family]["weights"]["pkd"]
    # the student checkpoint is the detector alone; what trained beside it is saved apart
    student = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("adapter", "parts")) for k in student)
    parts = load_file(str(out / "distill_parts.safetensors"))
    with safe_open(str(out / "distill_parts.safetensors"), framework="pt") as fh:
        assert fh.metadata()["method"] == method
    assert any(k.startswith("adapter.") for k in parts)  # the tiny student is narrower than its teacher
    if method in ("mgd", "fgd"):
        levels = config["distill"][method]["levels"]
        blocks = {k.split(".")[2] for k in parts if k.startswith(f"parts.{method}.")}
        assert len(blocks) == levels


def test_an_mgd_student_exports_and_predicts_as_a_plain_detector(teachers, tmp_path):
    """The generators stay in distill_parts.safetensors: export and eval read the detector alone."""
    pytest.importorskip("onnxruntime")
    runs, common = teachers("tiny-synthetic")
    out = tmp_path / "mgd"
    _run(["distill", *common, "--teacher", str(runs / "teacher/model.safetensors"), "--method", "mgd",
          "--out", str(out)])
    result = _run(["export", str(out / "model.safetensors"), "--out", str(tmp_path / "student.onnx"), "--verify"],
                  device=False)
    assert (tmp_path / "student.onnx").is_file() and "verif" in result.output.lower()


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn"])
@pytest.mark.parametrize("method", ["mgd", "fgd"])
def test_the_distill_step_trains_the_parts_and_leaves_the_teacher_as_it_was(preset, method):
    """A teacher straight from build_detector (train mode): building the method's parts and
    a step leave its weights and batch-norm statistics untouched and give it no gradient."""
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.distill import DistillTask

    config = load_config(preset, [*TINY, f"distill.method={method}"])
    torch.manual_seed(0)
    student = build_detector(config.student, 5, config.input)
    teacher = build_detector(config.teacher, 5, config.input)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = DistillTask(student, teacher, config)
    task.train_mode()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 30, 40]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 80, 50, 120]]), "labels": torch.tensor([2])}]
    terms = task.losses(images, targets)
    sum(terms.values()).backward()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    parts = task.module.parts[method]
    levels = config.distill.mgd.levels if method == "mgd" else config.distill.fgd.levels
    assert len(parts) == levels
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.module.detector.backbone.parameters())
