"""Progressive teachers: `distill --init-student` (lineage, start weights, resume, refusals) and
`distill.init_student_from_teacher` (exactly the matching neck and head tensors are copied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ds2d2_cli.checkpoint import file_sha256
from ds2d2_cli.cli.app import app

from conftest import TINY
from test_distill_stages import _run, _sets  # the CLI runner every distill test uses

runner = CliRunner()
PRESET = "tiny-synthetic"




def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.fixture(scope="module")
def chain(tiny_data, module_tmp):
    """A tiny teacher and a first-stage DS2D2 student of it (2 iterations each)."""
    runs = module_tmp("chain")
    common = ["--preset", PRESET, "--data", str(tiny_data), "--max-iters", "2", *_sets(TINY)]
    _run(["train-teacher", *common, "--out", str(runs / "teacher")])
    teacher = runs / "teacher/model.safetensors"
    _run(["distill", *common, "--teacher", str(teacher), "--out", str(runs / "stage1")])
    return runs, common, teacher, runs / "stage1/model.safetensors"


@pytest.fixture
def start_weights(monkeypatch):
    """The student detector's weights as training begins, captured at the call of `train`."""
    import ds2d2_cli.stages.runner as runner_module

    captured: list[dict[str, torch.Tensor]] = []
    original = runner_module.train

    def spy(task, *args, **kwargs):
        detector = getattr(task.module, "detector", task.module)
        captured.append({k: v.detach().clone() for k, v in detector.state_dict().items()})
        return original(task, *args, **kwargs)

    monkeypatch.setattr(runner_module, "train", spy)
    return captured


def test_a_chain_starts_from_the_first_student_and_records_its_lineage(chain, start_weights):
    runs, common, teacher, first = chain
    second_out, third_out = runs / "stage2", runs / "stage3"
    result = _run(["distill", *common, "--teacher", str(teacher), "--init-student", str(first),
                   "--out", str(second_out)])
    assert "starts from" in result.output
    first_weights = load_file(str(first))
    assert start_weights[-1].keys() == first_weights.keys()
    assert all(torch.equal(start_weights[-1][k], v) for k, v in first_weights.items())
    second = second_out / "model.safetensors"
    lineage = json.loads(_meta(second)["init_student"])
    assert lineage["sha256"] == file_sha256(first) and lineage["path"] == str(first.resolve())
    assert lineage["method"] == "ds2d2" and lineage["teacher_sha256"] == file_sha256(teacher)
    assert lineage["init_student"] is None
    assert json.loads((second_out / "summary.json").read_text())["init_student"] == lineage
    # trained on: the second student moved away from its start
    assert any(not torch.equal(v, first_weights[k]) for k, v in load_file(str(second)).items())
    # a third stage (the baseline's loss alone) carries the whole chain back to the first student
    _run(["distill", *common, "--method", "none", "--init-student", str(second), "--out", str(third_out)])
    third = json.loads(_meta(third_out / "model.safetensors")["init_student"])
    assert third["sha256"] == file_sha256(second) and third["init_student"] == lineage
    from ds2d2_cli.checkpoint import load_checkpoint

    assert load_checkpoint(third_out / "model.safetensors").meta.init_student == third
    assert load_checkpoint(first).meta.init_student is None  # and files without it still read


def test_resume_of_an_init_student_run_keeps_its_lineage(chain, monkeypatch):
    runs, common, teacher, first = chain
    from ds2d2_cli.engine import Trainer

    out = runs / "resumed"
    args = ["distill", *[a if a != "2" else "4" for a in common], "--teacher", str(teacher), "--out", str(out)]
    original = Trainer.step

    def interrupted(self, iteration, *rest):
        if iteration == 3:
            raise KeyboardInterrupt
        return original(self, iteration, *rest)

    monkeypatch.setattr(Trainer, "step", interrupted)
    assert runner.invoke(app, [*args, "--init-student", str(first), "--device", "cpu"]).exit_code != 0
    monkeypatch.setattr(Trainer, "step", original)
    # the same start again is accepted; another one is refused, before anything is trained
    from ds2d2_cli.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(first)
    loaded.meta.metrics = {"mAP": 0.5}  # the same weights in another file: another student by its hash
    other = save_checkpoint(runs / "other-student.safetensors", loaded.tensors, loaded.meta)
    refused = _run([*args, "--resume", "--init-student", str(other)], code=2)
    assert "this run started from another student" in " ".join(refused.output.split())
    _run([*args, "--resume", "--init-student", str(first), "--set", "train.seed=1"], code=2)  # config still checked
    result = _run([*args, "--resume"])  # the run folder remembers its start
    assert "resuming at iteration 2" in result.output
    lineage = json.loads(_meta(out / "model.safetensors")["init_student"])
    assert lineage["sha256"] == file_sha256(first)


def test_init_student_refusals_leave_nothing_behind(chain, tmp_path):
    runs, common, teacher, first = chain
    out = tmp_path / "refused"
    base = ["distill", *common, "--teacher", str(teacher), "--out", str(out)]
    cases = [
        (["--init-student", str(teacher)], "this is a teacher checkpoint; expected a student checkpoint for --init-student"),
        (["--init-student", str(first), "--set", "student.backbone=resnet34"], "backbone resnet18 (the run's student: resnet34)"),
        (["--init-student", str(first), "--set", "student.fpn_channels=32"], "fpn_channels 16 (the run's student: 32)"),
        (["--init-student", str(first), "--set", "student.head_norm=none"], "head_norm group"),
        (["--init-student", str(first), "--set", "student.norm=frozen_bn"], "do not fit the run's student"),
        (["--init-student", str(first), "--set", "distill.init_student_from_teacher=true"], "choose one"),
        (["--init-student", str(tmp_path / "missing.safetensors")], "checkpoint not found"),
    ]
    for extra, message in cases:
        result = _run([*base, *extra], code=2)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert not out.exists(), extra
    result = _run(["distill", *common, "--method", "none", "--set", "distill.init_student_from_teacher=true",
                   "--out", str(out)], code=2)
    assert "it needs --teacher" in " ".join(result.output.split()) and not out.exists()


def test_the_baseline_started_from_the_teacher_copies_without_distilling(chain, start_weights):
    """`--method none` with `distill.init_student_from_teacher`: the FGD/MGD recipe's start without
    their loss (the study's `none-recipe` control). The teacher's tensors are copied and recorded,
    the run has no distillation term; without the setting a given --teacher is reported unused."""
    runs, common, teacher, _ = chain
    out = runs / "none-from-teacher"
    sets = ["--set", "student.fpn_channels=32", "--set", "distill.init_student_from_teacher=true"]
    result = _run(["distill", *common, "--method", "none", "--teacher", str(teacher), *sets, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    copied = summary["init_from_teacher"]
    teacher_weights = load_file(str(teacher))
    assert copied and all(torch.equal(start_weights[-1][k], teacher_weights[k]) for k in copied)
    assert summary["method"] == "none" and summary["streams"] == []
    assert _meta(out / "model.safetensors")["teacher_sha256"] == file_sha256(teacher)
    assert "tensors copied from the teacher" in result.output
    plain = _run(["distill", *common, "--method", "none", "--teacher", str(teacher), "--out", str(runs / "plain")])
    assert "--teacher is not used by this run" in " ".join(plain.output.split())
    assert json.loads((runs / "plain" / "summary.json").read_text())["init_from_teacher"] is None


def test_init_student_from_teacher_with_a_narrower_fpn_copies_only_what_fits(chain):
    """The tiny student's FPN (16) is narrower than the teacher's (32): of the neck and heads only
    the final biases (one per anchor and class or box coordinate) have the teacher's shapes."""
    runs, common, teacher, _ = chain
    out = runs / "narrow-from-teacher"
    result = _run(["distill", *common, "--teacher", str(teacher), "--set", "distill.init_student_from_teacher=true",
                   "--out", str(out)])
    copied = json.loads((out / "summary.json").read_text())["init_from_teacher"]
    assert copied == ["head.classification_head.cls_logits.bias", "head.regression_head.bbox_reg.bias"]
    assert "only tensors of that width match" in " ".join(result.output.split())


def test_init_student_from_teacher_copies_exactly_the_matching_tensors(chain, tiny_data, start_weights):
    runs, common, teacher, _ = chain
    out = runs / "from-teacher"
    sets = ["--set", "student.fpn_channels=32", "--set", "distill.init_student_from_teacher=true"]
    result = _run(["distill", *common, "--teacher", str(teacher), *sets, "--out", str(out)])
    teacher_weights = load_file(str(teacher))
    start = start_weights[-1]
    expected = [k for k, v in teacher_weights.items()
                if not k.startswith("backbone.body.") and k in start and start[k].shape == v.shape]
    copied = json.loads((out / "summary.json").read_text())["init_from_teacher"]
    assert copied == expected
    assert any(k.startswith("backbone.fpn.") for k in copied) and any(k.startswith("head.") for k in copied)
    assert "tensors copied from the teacher" in result.output
    assert all(torch.equal(start[k], teacher_weights[k]) for k in copied)
    # the rest is the student as built: the same seed, the same detector without the copy
    from ds2d2_cli.config import load_config
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.common import load_stage_data, seed_everything

    config = load_config(PRESET, [*TINY, "student.fpn_channels=32"])
    data = load_stage_data(config, tiny_data)
    seed_everything(data.config.train.seed)
    fresh = build_detector(data.config.student, len(data.classes), data.config.input).state_dict()
    rest = [k for k in start if k not in copied]
    assert any(k.startswith("backbone.body.") for k in rest)  # same shapes (R18 both), still not copied
    assert all(torch.equal(start[k], fresh[k]) for k in rest)
    assert any(not torch.equal(fresh[k], teacher_weights[k]) for k in copied)  # the copy changed something
