"""`torchrun` on CPU: two gloo processes train, evaluate and distill like one process does.

The runs use the README's command (`python -m torch.distributed.run --standalone
--nproc_per_node 2 -m ds2d2_cli ...`). With frozen batch norm (per-process batch
statistics would differ from one big batch; SyncBatchNorm is CUDA-only) and SGD, k steps
of 2 processes x batch b equal k steps of 1 process x batch 2b up to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
if Path("/sys/class/net/lo").exists():  # gloo on loopback: containers whose hostname does not resolve still work
    ENV.setdefault("GLOO_SOCKET_IFNAME", "lo")
SETS = [*TINY, "teacher.norm=frozen_bn", "train.optimizer=sgd", "train.lr=0.01", "train.eval_every=null",
        "train.augment=[]", "train.checkpoint_every=2"]
pytestmark = pytest.mark.slow


def _torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "ds2d2_cli", *args]


def _single(*args: str) -> list[str]:
    return [sys.executable, "-m", "ds2d2_cli", *args]


def _sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _run(command: list[str], code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stdout + result.stderr
    return result


def _teacher_args(data: Path, out: Path, batch: int, iters: int = 3) -> list[str]:
    return ["train-teacher", "--preset", "tiny-synthetic", "--data", str(data), "--out", str(out),
            "--max-iters", str(iters), "--device", "cpu", *_sets([*SETS, f"train.batch_size={batch}"])]


@pytest.fixture(scope="module")
def runs(tiny_data, module_tmp):
    root = module_tmp("ddp")
    two = _run(_torchrun(*_teacher_args(tiny_data, root / "two", batch=1)))
    _run(_single(*_teacher_args(tiny_data, root / "one", batch=2)))
    return root, two


def test_two_processes_equal_one_process_with_the_double_batch(runs):
    root, two = runs
    one_w = load_file(str(root / "one/model.safetensors"))
    two_w = load_file(str(root / "two/model.safetensors"))
    assert one_w.keys() == two_w.keys()
    for key in one_w:
        torch.testing.assert_close(two_w[key], one_w[key], rtol=1e-5, atol=1e-6, msg=key)
    # Only rank 0 wrote: one log line per step (losses averaged over both processes), one summary.
    lines = [json.loads(x) for x in (root / "two/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["iter"] for r in lines] == [1, 2, 3]
    single = [json.loads(x) for x in (root / "one/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert lines[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)  # the first step's weights are equal
    summary = json.loads((root / "two/summary.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 3
    assert two.stdout.count("teacher run:") == 1  # one table, from rank 0
    assert "2 processes (gloo), 1 images per process, 2 per step" in two.stderr


def test_distributed_eval_equals_single_process_eval(runs, tmp_path):
    root, _ = runs
    checkpoint = str(root / "one/model.safetensors")
    _run(_single("eval", checkpoint, "--device", "cpu", "--batch-size", "1", "--json", str(tmp_path / "one.json")))
    _run(_torchrun("eval", checkpoint, "--device", "cpu", "--batch-size", "1", "--json", str(tmp_path / "two.json")))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "per_class", "detections", "images"):
        assert two[key] == one[key], key


def test_two_process_distill_and_resume(runs, tmp_path, tiny_data):
    root, _ = runs
    teacher = str(root / "one/model.safetensors")
    common = ["--preset", "tiny-synthetic", "--data", str(tiny_data), "--device", "cpu",
              *_sets([*SETS, "train.batch_size=1"])]
    _run(_single("train-amplifier", "--teacher", teacher, "--out", str(tmp_path / "amp"), "--max-iters", "1",
                 *common))
    distill = ["distill", "--teacher", teacher, "--amplifier", str(tmp_path / "amp/model.safetensors"), *common]
    whole = _run(_torchrun(*distill, "--out", str(tmp_path / "whole"), "--max-iters", "4"))
    assert "distill" in whole.stdout or "student run" in whole.stdout
    terms = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert {"explicit_low", "explicit_high", "implicit_full_cls", "implicit_high_cls"} <= terms.keys()

    # SIGTERM to torchrun reaches both workers; they stop at the same step boundary with a checkpoint.
    out = tmp_path / "split"
    process = subprocess.Popen(_torchrun(*distill, "--out", str(out), "--max-iters", "4"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 240
    while not (log.is_file() and log.read_text().count('"loss"') >= 1):
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode != 0 and not (out / "model.safetensors").exists()
    stopped_at = torch.load(out / "checkpoints/last.pt", weights_only=True)["iteration"]
    assert 1 <= stopped_at < 4
    resumed = _run(_torchrun(*distill, "--out", str(out), "--max-iters", "4", "--resume"))
    assert f"resuming at iteration {stopped_at}" in resumed.stderr
    a, b = load_file(str(tmp_path / "whole/model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
