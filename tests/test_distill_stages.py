"""`train-amplifier` and `distill` end to end (RetinaNet and Faster R-CNN), ablations, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config

from conftest import TINY

runner = CliRunner()


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _run(args, code=0):
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def _steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.fixture(scope="module")
def pipelines(tiny_data, module_tmp):
    """`pipelines(preset)`: teacher -> amplifier for one detector family, 2 iterations each,
    built on first use and shared by this module's tests."""
    built: dict[str, tuple] = {}

    def get(preset: str) -> tuple:
        if preset not in built:
            runs = module_tmp(preset)
            common = ["--preset", preset, "--data", str(tiny_data), "--max-iters", "2", *_sets(TINY)]
            _run(["train-teacher", *common, "--out", str(runs / "teacher")])
            _run(["train-amplifier", *common, "--teacher", str(runs / "teacher/model.safetensors"),
                  "--out", str(runs / "amplifier")])
            built[preset] = (preset, runs, common)
        return built[preset]

    return get


@pytest.fixture(params=["tiny-synthetic", "tiny-synthetic-frcnn"])
def pipeline(request, pipelines):
    return pipelines(request.param)


@pytest.fixture
def retina(pipelines):
    """The flags below are detector-independent: one family is enough."""
    return pipelines("tiny-synthetic")


def _frozen_rpn_amplifier(preset: str, runs: Path, common: list[str], out: Path) -> Path:
    """Faster R-CNN's amplifier with the teacher's RPN kept frozen (distill.amplifier_rpn=frozen)."""
    if preset == "tiny-synthetic":
        return runs / "amplifier"
    _run(["train-amplifier", *common, "--teacher", str(runs / "teacher/model.safetensors"),
          "--set", "distill.amplifier_rpn=frozen", "--out", str(out)])
    return out


def test_amplifier_checkpoint(pipeline, tmp_path):
    preset, runs, common = pipeline
    teacher = runs / "teacher/model.safetensors"
    amplifier_run = _frozen_rpn_amplifier(preset, runs, common, tmp_path / "amplifier")
    amplifier = amplifier_run / "model.safetensors"
    meta = _meta(amplifier)
    from ds2d2_cli.checkpoint import file_sha256

    assert meta["stage"] == "amplifier" and meta["teacher_sha256"] == file_sha256(teacher)
    prefix = "head." if preset == "tiny-synthetic" else "roi_heads."
    head = load_file(str(amplifier))
    assert head and all(k.startswith(prefix) for k in head)
    # initialised from the teacher's head, then trained: same keys and shapes, different values
    teacher_weights = load_file(str(teacher))
    assert all(teacher_weights[k].shape == v.shape for k, v in head.items())
    assert any(not torch.equal(teacher_weights[k], v) for k, v in head.items())
    # the frozen teacher backbone is not part of it
    assert not any(k.startswith("backbone.") for k in head)
    terms = _steps(amplifier_run)[-1]
    assert "loss_objectness" not in terms  # Faster R-CNN's RPN is frozen: its losses are not the amplifier's


def test_faster_rcnn_amplifier_trains_its_rpn_on_high_frequency_features(pipelines, tmp_path):
    """The authors' amplifier (the default): RPN and RoI head both train on HF features."""
    preset, runs, common = pipelines("tiny-synthetic-frcnn")
    teacher = load_file(str(runs / "teacher/model.safetensors"))
    trained = load_file(str(runs / "amplifier/model.safetensors"))
    assert {k.split(".")[0] for k in trained} == {"rpn", "roi_heads"}
    assert all(teacher[k].shape == v.shape for k, v in trained.items())
    assert any(not torch.equal(teacher[k], v) for k, v in trained.items() if k.startswith("rpn."))
    terms = _steps(runs / "amplifier")[-1]
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier"} <= terms.keys()
    summary = json.loads((runs / "amplifier/summary.json").read_text())
    assert summary["trained"] == ["roi_heads", "rpn"]
    # and distillation still reads only its RoI head
    out = tmp_path / "student"
    result = _run(["distill", *common, "--teacher", str(runs / "teacher/model.safetensors"),
                   "--amplifier", str(runs / "amplifier/model.safetensors"), "--out", str(out)])
    assert "implicit_high_cls" in _steps(out)[-1]
    # the tiny student FPN (16) is narrower than the teacher's (32): the run says the adapter bridges it
    assert "implicit streams read the adapter's output" in " ".join(result.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["implicit_input"] == "adapted" and "16 channels" in summary["implicit_input_note"]


def test_ds2d2_all_streams(pipeline, tmp_path):
    preset, runs, common = pipeline
    out = tmp_path / "student"
    result = _run(["distill", *common, "--teacher", str(runs / "teacher/model.safetensors"),
                   "--amplifier", str(runs / "amplifier/model.safetensors"), "--out", str(out), "--json", "-"])
    summary = json.loads(result.stdout)
    assert summary["method"] == "ds2d2" and summary["streams"] == sorted(
        ["explicit-low", "explicit-high", "implicit-full", "implicit-high"])
    step = _steps(out)[-1]
    for name in ("explicit_low", "explicit_high", "implicit_full_cls", "implicit_full_box",
                 "implicit_high_cls", "implicit_high_box"):
        assert name in step and step[name] >= 0.0
    assert step["explicit_low"] > 0 and step["explicit_high"] > 0
    meta = _meta(out / "model.safetensors")
    assert meta["stage"] == "student" and meta["method"] == "ds2d2" and meta["fpn_channels"] == "16"
    assert meta["teacher_sha256"] == _meta(runs / "amplifier/model.safetensors")["teacher_sha256"]
    assert not any(k.startswith("adapter") for k in load_file(str(out / "model.safetensors")))
    evaluated = _run(["eval", str(out / "model.safetensors"), "--json", "-"])
    assert 0.0 <= json.loads(evaluated.stdout)["mAP"] <= 1.0


def test_baselines_and_ablations(retina, tmp_path):
    preset, runs, common = retina
    teacher = str(runs / "teacher/model.safetensors")
    _run(["distill", *common, "--method", "none", "--out", str(tmp_path / "none")])
    assert set(_steps(tmp_path / "none")[-1]) == {"iter", "epoch", "lr", "loss", "classification",
                                                  "bbox_regression", "images_per_s"}
    assert _meta(tmp_path / "none/model.safetensors")["method"] == "none"
    _run(["distill", *common, "--method", "fitnet", "--teacher", teacher, "--out", str(tmp_path / "fitnet")])
    assert "fitnet" in _steps(tmp_path / "fitnet")[-1]
    _run(["distill", *common, "--teacher", teacher, "--out", str(tmp_path / "ablation"),
                   "--streams", "explicit-low,implicit-full", "--no-disw", "--wavelet", "db2"])
    step = _steps(tmp_path / "ablation")[-1]
    assert {"explicit_low", "implicit_full_cls", "implicit_full_box"} <= step.keys()
    assert not {"explicit_high", "implicit_high_cls"} & step.keys()
    config = json.loads((tmp_path / "ablation/config.json").read_text())["distill"]
    assert config["disw"] is False and config["wavelet"] == "db2" and config["streams"] == ["explicit-low", "implicit-full"]
    no_amp = _run(["distill", *common, "--teacher", teacher, "--out", str(tmp_path / "noamp")])
    assert "implicit high-frequency stream is off" in no_amp.output
    assert "implicit_high_cls" not in _steps(tmp_path / "noamp")[-1]


def test_same_seed_same_start(retina, tmp_path):
    """The baseline and the distilled student start from the same weights and batches."""
    preset, runs, common = retina
    args = [*common[:-2 * len(TINY)], *_sets([*TINY, "train.max_iters=1"])]
    _run(["distill", *args, "--method", "none", "--out", str(tmp_path / "a")])
    _run(["distill", *args, "--teacher", str(runs / "teacher/model.safetensors"), "--out", str(tmp_path / "b")])
    a, b = _steps(tmp_path / "a")[0], _steps(tmp_path / "b")[0]
    assert a["classification"] == b["classification"] and a["bbox_regression"] == b["bbox_regression"]


@pytest.mark.parametrize("case", ["student-as-teacher", "other-teacher-amplifier", "bad-stream", "no-teacher",
                                  "other-family", "other-input", "no-stream-left"])
def test_refusals(case, retina, pipelines, tiny_data, tmp_path):
    preset, runs, common = retina
    teacher = str(runs / "teacher/model.safetensors")
    if case == "other-family":  # a Faster R-CNN teacher cannot teach a RetinaNet student
        _, frcnn_runs, _ = pipelines("tiny-synthetic-frcnn")
        args = ["--teacher", str(frcnn_runs / "teacher/model.safetensors")]
        message = "the teacher is a faster_rcnn, the preset's student a retinanet"
    elif case == "other-input":
        args, message = ["--teacher", teacher, "--set", "input.size=96"], "the teacher was trained at input 128 px"
    elif case == "student-as-teacher":
        _run(["distill", *common, "--method", "none", "--out", str(tmp_path / "s")])
        args, message = ["--teacher", str(tmp_path / "s/model.safetensors")], "this is a student checkpoint; expected a teacher"
    elif case == "other-teacher-amplifier":
        _run(["train-teacher", *common, "--out", str(tmp_path / "t2"), "--set", "train.seed=7"])
        args = ["--teacher", str(tmp_path / "t2/model.safetensors"), "--amplifier", str(runs / "amplifier/model.safetensors")]
        message = "this amplifier was trained for another teacher"
    elif case == "bad-stream":
        args, message = ["--teacher", teacher, "--streams", "explicit-low,everything"], "--streams takes a comma list"
    elif case == "no-stream-left":  # the high-frequency stream alone, without the amplifier it needs
        args, message = ["--teacher", teacher, "--streams", "implicit-high"], "--streams implicit-high needs --amplifier"
    else:
        args, message = [], "--method ds2d2 needs --teacher"
    result = _run(["distill", *common, *args, "--out", str(tmp_path / "out")], code=2)
    assert message in result.output
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_teacher_is_frozen_and_adapter_learns(pipeline, tiny_data):
    from ds2d2_cli.checkpoint import load_checkpoint
    from ds2d2_cli.data.dataset import DetectionDataset, collate
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.models.detectors import model_from_checkpoint
    from ds2d2_cli.stages.common import load_split
    from ds2d2_cli.stages.distill import DistillTask

    preset, runs, _ = pipeline
    config = load_config(preset, TINY)
    teacher = model_from_checkpoint(load_checkpoint(runs / "teacher/model.safetensors"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_detector(config.student, 5, config.input)
    task = DistillTask(student, teacher, config)
    task.train_mode()
    images, targets = collate([DetectionDataset(load_split(tiny_data, "train"))[i] for i in range(2)])
    terms = task.losses(images, targets)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.module.adapter.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included


def test_half_precision_teacher_channels_last_student(retina, tmp_path):
    """distill.teacher_dtype runs the frozen teacher backbone in bf16 (CPU has bf16 kernels
    too); train.channels_last trains the student in NHWC. Losses stay finite and close to
    the float32 run's: the teacher features only lose bf16 rounding."""
    preset, runs, common = retina
    args = ["distill", *common, "--teacher", str(runs / "teacher/model.safetensors"),
            "--amplifier", str(runs / "amplifier/model.safetensors"), "--max-iters", "1"]
    _run([*args, "--out", str(tmp_path / "fp32")])
    _run([*args, "--out", str(tmp_path / "bf16"), "--set", "distill.teacher_dtype=bfloat16",
          "--set", "train.channels_last=true"])
    full, half = _steps(tmp_path / "fp32")[-1], _steps(tmp_path / "bf16")[-1]
    assert json.loads((tmp_path / "bf16/config.json").read_text())["distill"]["teacher_dtype"] == "bfloat16"
    for name in ("classification", "explicit_low", "explicit_high", "implicit_full_cls", "implicit_high_box"):
        assert half[name] == pytest.approx(full[name], rel=0.1), name
    assert half["explicit_low"] != full["explicit_low"]  # the teacher really ran in bf16


def test_compile_option_reaches_the_backbones():
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    from ds2d2_cli.engine import _compile_backbones
    from ds2d2_cli.models.detectors import build_detector

    config = load_config("tiny-synthetic")
    model = build_detector(config.student, 5, config.input)
    keys = list(model.state_dict())
    _compile_backbones(model)  # lazy: nothing compiles until the first forward
    bodies = [m.body for m in model.modules() if isinstance(m, BackboneWithFPN)]
    assert bodies and all(body._compiled_call_impl is not None for body in bodies)
    assert list(model.state_dict()) == keys  # checkpoints keep their keys


def tiny_batch():
    """Two 128 px images with three boxes: the batch the step-in-isolation tests share."""
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 30, 40], [60, 60, 70, 72]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 80, 50, 120]]), "labels": torch.tensor([2])}]
    return images, targets


def _wiring_task(*overrides: str):
    """A DistillTask on tiny RetinaNets, and one batch: the step in isolation."""
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.distill import DistillTask

    config = load_config("tiny-synthetic", [*TINY, *overrides])
    torch.manual_seed(0)
    student = build_detector(config.student, 5, config.input)
    teacher = build_detector(config.teacher, 5, config.input)
    images, targets = tiny_batch()
    task = DistillTask(student, teacher, config)
    task.train_mode()
    return task, images, targets


def test_implicit_streams_read_raw_student_features_so_the_adapter_learns_from_explicit_only():
    same_width = "student.fpn_channels=32"
    grads = {}
    for wiring in ("raw", "adapted"):
        task, images, targets = _wiring_task(same_width, f"distill.implicit_input={wiring}")
        assert task.implicit_input == wiring and task.implicit_input_note is None
        terms = task.losses(images, targets)
        assert {"explicit_low", "explicit_high", "implicit_full_cls", "implicit_full_box"} <= terms.keys()
        adapter = list(task.module.adapter.parameters())
        explicit = torch.autograd.grad(terms["explicit_low"] + terms["explicit_high"], adapter, retain_graph=True)
        implicit = terms["implicit_full_cls"] + terms["implicit_full_box"]
        total = torch.autograd.grad(sum(terms.values()), adapter, retain_graph=True)
        same = all(torch.allclose(a, b) for a, b in zip(explicit, total))
        assert same == (wiring == "raw")  # raw: the implicit terms never reach the adapter
        fpn = [p for p in task.module.detector.backbone.fpn.parameters()]
        grads[wiring] = torch.autograd.grad(implicit, fpn)
        assert all(g.abs().sum() > 0 for g in grads[wiring])
    assert not all(torch.allclose(a, b) for a, b in zip(grads["raw"], grads["adapted"]))


def test_implicit_only_raw_run_has_no_adapter_and_other_widths_fall_back_to_adapted():
    task, images, targets = _wiring_task("student.fpn_channels=32", "distill.streams=[implicit-full]")
    assert task.module.adapter is None  # nothing would train it (and DDP would find it unused)
    assert {"implicit_full_cls", "implicit_full_box"} <= task.losses(images, targets).keys()
    narrow, images, targets = _wiring_task("distill.streams=[implicit-full]")  # student 16 vs teacher 32
    assert narrow.implicit_input == "adapted" and narrow.module.adapter is not None
    assert "16 channels" in narrow.implicit_input_note and "adapter" in narrow.implicit_input_note
    assert {"implicit_full_cls", "implicit_full_box"} <= narrow.losses(images, targets).keys()


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-obb"])
def test_both_amplifiers_share_one_anchor_match_and_the_losses_do_not_move(preset, monkeypatch):
    """The anchors are matched once per step for both implicit streams; each stream's loss equals the
    loss function computing its own match (the behaviour before the match was shared)."""
    import importlib

    from ds2d2_cli.distill import implicit as implicit_module
    from ds2d2_cli.models.amplifier import amplifier_head
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.distill import DistillTask

    config = load_config(preset, [*TINY, "student.fpn_channels=32"])  # raw student features reach the heads
    torch.manual_seed(0)
    student = build_detector(config.student, 5, config.input)
    teacher = build_detector(config.teacher, 5, config.input)
    task = DistillTask(student, teacher, config, amplifier_head(teacher))
    assert task.implicit_input == "raw"
    task.train_mode()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    corners = [torch.tensor([[10.0, 12, 30, 40], [60, 60, 70, 72]]), torch.tensor([[5.0, 80, 50, 120]])]
    targets = []
    for boxes, labels in zip(corners, (torch.tensor([1, 3]), torch.tensor([2]))):
        target = {"boxes": boxes, "labels": labels}
        if task.oriented:  # the envelope's rotated box turned a little: a rotated match
            centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
            target["rboxes"] = torch.cat([centre, size.max(1, keepdim=True).values,
                                          size.min(1, keepdim=True).values, torch.full((len(boxes), 1), 0.3)], 1)
        targets.append(target)

    name = "oriented_matches" if task.oriented else "retinanet_matches"
    family_module = importlib.import_module(type(task.family).__module__)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return getattr(implicit_module, name)(*args, **kwargs)

    monkeypatch.setattr(family_module, name, counted)
    terms = task.losses(images, targets)
    assert len(calls) == 1 and {"implicit_full_cls", "implicit_high_cls"} <= terms.keys()

    # Each stream again, its loss function matching on its own.
    loss = implicit_module.oriented_retinanet_implicit_loss if task.oriented else implicit_module.retinanet_implicit_loss
    assign = {"assigner": teacher.assigner} if task.oriented else {"matcher": teacher.proposal_matcher}
    student_model = task.module.detector
    batch, batch_targets = student_model.transform(images, targets)
    with torch.no_grad():
        features = student_model.backbone(batch.tensors)
        teacher_features = task.teacher.backbone(batch.tensors)
        levels = list(teacher_features.values())
        anchors = (teacher.anchors(batch, levels) if task.oriented else teacher.anchor_generator(batch, levels))
        weights = config.distill.weights
        for high, prefix, weight in ((False, "implicit_full", weights.implicit_full),
                                     (True, "implicit_high", weights.implicit_high)):
            s, t = task._inputs(high, features, teacher_features)
            head = task.amplifier_head if high else task.family.head(task.teacher)
            alone = loss(head, list(s.values()), list(t.values()), anchors, batch_targets, box_coder=teacher.box_coder,
                         beta=config.distill.qfl_beta, box_anchors=config.distill.box_kd_anchors,
                         normalizer=config.distill.kd_normalizer, **assign)
            for part in ("cls", "box"):
                assert torch.equal(terms[f"{prefix}_{part}"].detach(), weight * alone[part]), (prefix, part)


def test_implicit_every_k_thins_the_implicit_streams_and_keeps_their_average_weight():
    """distill.implicit_every=2: iterations 1, 3, ... carry the implicit terms at twice their
    weight, iterations 2, 4, ... none (zeros in the log, no head pass), the other terms as ever."""
    paper, images, targets = _wiring_task("student.fpn_channels=32")
    reference = {k: v.detach() for k, v in paper.losses(images, targets).items()}
    implicit = {"implicit_full_cls", "implicit_full_box"}
    assert implicit <= reference.keys() and all(reference[k] != 0 for k in implicit)
    thinned, images, targets = _wiring_task("student.fpn_channels=32", "distill.implicit_every=2")
    calls = []
    head_forward = thinned.family.implicit_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return head_forward(*args, **kwargs)

    thinned.family.implicit_loss = counted
    for iteration, scale in ((1, 2.0), (2, 0.0), (3, 2.0), (8, 0.0)):
        thinned.begin_iteration(iteration)
        before = len(calls)
        terms = thinned.losses(images, targets)
        assert terms.keys() == reference.keys()
        for name, value in terms.items():
            expected = reference[name] * scale if name in implicit else reference[name]
            assert torch.allclose(value.detach(), expected, rtol=1e-6, atol=0), (iteration, name)
        assert len(calls) - before == (1 if scale else 0)
        sum(terms.values()).backward()  # a thinned step still trains on the rest


@pytest.mark.parametrize("setting, method, message", [
    ("distill.implicit_every=2", "fitnet",
     "distill.implicit_every=2 thins the implicit streams, and this run has none (method fitnet"),
    ("distill.implicit_rois=128", "ds2d2",
     "distill.implicit_rois=128 thins the RoIs of Faster R-CNN's implicit streams, and this run has none "
     "(student retinanet"),
])
def test_approximations_are_refused_where_they_have_nothing_to_thin(setting, method, message, retina, tmp_path):
    preset, runs, common = retina
    args = ["--teacher", str(runs / "teacher/model.safetensors"), "--method", method, "--set", setting]
    result = _run(["distill", *common, *args, "--out", str(tmp_path / "out")], code=2)
    assert message in result.output
    assert not (tmp_path / "out").exists()
