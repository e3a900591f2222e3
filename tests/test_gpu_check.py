"""`benchmarks/gpu_check.py`: its plan runs end to end on the CPU (--dry-run-cpu), and without
CUDA the GPU check stops before doing anything, in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds2d2_cli.distill.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_without_cuda_one_line_and_nothing_done(tmp_path, monkeypatch, capsys):
    check = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work, out = tmp_path / "work", tmp_path / "check.json"
    assert check.main(["--work", str(work), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here"), captured.err
    assert "--dry-run-cpu" in lines[0] and "Traceback" not in captured.err
    assert not work.exists() and not out.exists()


def test_a_foreign_work_folder_is_refused(tmp_path, capsys):
    check = _module()
    work = tmp_path / "mine"
    work.mkdir()
    (work / "keep.txt").write_text("not the check's")
    assert check.main(["--dry-run-cpu", "--work", str(work)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "was not made by gpu_check" in err[0]
    assert (work / "keep.txt").read_text() == "not the check's"


def test_the_plan_covers_every_method_on_both_families(tmp_path):
    check = _module()
    names = [s.name for s in check.Plan(check.GPU, tmp_path).steps]
    assert len(names) == len(set(names))
    for family in ("retinanet", "faster_rcnn"):
        for stage in ("teacher", "amplifier", "eval", "export", "predict"):
            assert f"{family}/{stage}" in names
        assert {f"{family}/distill/{m}" for m in METHODS} <= set(names)
    for name in ("amp-off/retinanet", "amp-off/faster_rcnn", "torchrun/retinanet", "channels_last/retinanet",
                 "compile/retinanet", "cuda-tests", "distill-step", "obb/distill/ds2d2", "obb/export",
                 "paper-retinanet/distill/ds2d2", "paper-faster_rcnn/distill/ds2d2"):
        assert name in names
    assert names[-1] == "compile/retinanet"  # the least known duration goes last: the budget cuts it first


def test_only_keeps_the_named_steps_and_what_they_need(tmp_path):
    check = _module()
    plan = check.Plan(check.GPU, tmp_path)
    plan.keep_only(["paper-retinanet"])
    assert [s.name for s in plan.steps] == [
        "data/scenes", "data/patches", "paper/weights",
        "paper-retinanet/teacher", "paper-retinanet/amplifier", "paper-retinanet/distill/ds2d2"]
    with pytest.raises(ValueError, match="--only nope: no step's name starts so"):
        check.Plan(check.GPU, tmp_path).keep_only(["nope"])


def test_random_paper_weights_get_measured_batch_norm_statistics():
    """Frozen BN on a fresh module's statistics is the identity and a random ResNet's outputs
    explode (NaN under fp16 AMP on the first GPU run); measured statistics keep them at scale."""
    import torchvision

    check = _module()
    torch.manual_seed(0)
    body = torchvision.models.get_model("resnet101", weights=None)
    features = torch.nn.Sequential(*list(body.children())[:-2])  # C5, what the FPN reads
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = features.eval()(images).abs().max().item()  # about 3.6e4
        check.calibrate_batch_norm(body, batches=2, batch=4, size=64)
        calibrated = features(images).abs().max().item()  # about 10
    assert not body.training
    assert body.bn1.momentum is None and body.bn1.num_batches_tracked.item() == 2
    assert body.bn1.running_var.mean().item() != pytest.approx(1.0, abs=0.05)
    assert calibrated < 100 and raw > 1000


@pytest.mark.slow
def test_dry_run_on_cpu_runs_every_step(tmp_path):
    """The whole plan at 64 px and 2 iterations (5 to 7 minutes on 2 shared slow cores)."""
    work, out = tmp_path / "work", tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--work", str(work), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    record = json.loads(out.read_text())
    steps = {s["name"]: s for s in record["steps"]}
    not_ok = {n: (s["status"], s.get("error") or s.get("reason")) for n, s in steps.items() if s["status"] != "ok"}
    assert result.returncode == 0 and not not_ok and record["ok"], (not_ok, result.stdout[-3000:], result.stderr)
    assert record["mode"] == "cpu-dry-run" and list(steps) == record["plan"]["steps"]
    # a progress line per step, with the elapsed time
    assert sum(line.startswith("[") and " s] " in line for line in result.stdout.splitlines()) == len(steps)

    for family in ("retinanet", "faster_rcnn"):
        for method in METHODS:
            run = steps[f"{family}/distill/{method}"]
            assert run["images_per_s"] > 0 and run["iterations"] == 2 and run["method"] == method
            assert run["peak_cuda_memory_mb"] is None  # CPU: torch keeps no such count
        assert steps[f"{family}/eval"]["images_per_s"] > 0
        assert steps[f"{family}/export"]["verify_status"] in ("passed", "inconclusive")
        assert steps[f"{family}/predict"]["device"] == "cpu"

    def config(name: str) -> dict:
        return json.loads((work / "runs" / name.replace("/", "-") / "config.json").read_text())

    assert config("retinanet/distill/cwd")["input"]["size"] == 64
    assert config("retinanet/distill/cwd")["distill"]["method"] == "cwd"
    assert config("amp-off/faster_rcnn")["train"]["amp"] is False
    assert config("retinanet/distill/ds2d2")["train"]["amp"] is True
    assert config("channels_last/retinanet")["train"]["channels_last"] is True
    assert config("compile/retinanet")["train"]["compile"] is True
    assert steps["compile/retinanet"]["env"] == {"TORCH_COMPILE_DISABLE": "1"}
    assert config("obb/distill/fgd")["student"]["detector"] == "retinanet_obb"
    paper = config("paper-faster_rcnn/distill/ds2d2")
    assert paper["teacher"]["backbone"] == "resnet101" and paper["student"]["fpn_channels"] == 256
    assert paper["student"]["backbone_weights"]  # random local weights stand in for ImageNet's
    assert steps["torchrun/retinanet"]["command"].split()[1:3] == ["-m", "torch.distributed.run"]

    tests = steps["cuda-tests"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    assert all("cuda" in name for name in tests["skipped_tests"])  # on the CPU only the CUDA tests skip
    cases = record["distill_step"]
    assert set(cases) == {"retinanet tiny-synthetic@64", "faster_rcnn tiny-synthetic@64"}
    for case in cases.values():
        assert set(case["ratio_vs_student"]) >= {"ds2d2", "student+teacher", *(m for m in METHODS if m != "none")}
    assert record["failed"] == [] and record["skipped"] == {}
    assert record["images_per_s"]["retinanet/teacher"] > 0
