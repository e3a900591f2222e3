"""Interruptions and numerical faults never lose more than one checkpoint interval.

Ctrl-C / SIGTERM / SIGKILL are sent to a real `python -m ds2d2_cli train-teacher`
subprocess; the resumed run must end with exactly the weights of an uninterrupted run
(CPU, one thread, deterministic). Non-finite losses are injected through a tiny task.
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
from torch import nn

from ds2d2_cli.config import TrainConfig
from ds2d2_cli.data.dataset import DetectionDataset, load_coco_split
from ds2d2_cli.engine import MAX_CONSECUTIVE_SKIPS, RESUME_FILE, train
from ds2d2_cli.errors import Ds2d2Error

from conftest import TINY

ITERS = 10
CHECKPOINT_EVERY = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(data: Path, out: Path, resume: bool = False) -> list[str]:
    sets = [*TINY, "train.eval_every=null", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1"]
    command = [sys.executable, "-m", "ds2d2_cli", "train-teacher", "--preset", "tiny-synthetic",
               "--data", str(data), "--out", str(out), "--max-iters", str(ITERS), "--device", "cpu"]
    for item in sets:
        command += ["--set", item]
    return command + (["--resume"] if resume else [])


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _logged_iterations(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["iter"] for line in path.read_text().splitlines() if '"loss"' in line]


def _interrupt_after(command: list[str], out: Path, iteration: int, sig: int) -> subprocess.CompletedProcess:
    """Start the run, wait until `iteration` is logged, send `sig`, collect the exit."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while max(_logged_iterations(out), default=0) < iteration:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the run did not reach the interruption point in time")
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tiny_data, module_tmp) -> dict[str, torch.Tensor]:
    out = module_tmp("uninterrupted") / "run"
    result = _run(_command(tiny_data, out))
    assert result.returncode == 0, result.stderr
    return load_file(str(out / "model.safetensors"))


def _assert_same_weights(out: Path, reference: dict[str, torch.Tensor]) -> None:
    resumed = load_file(str(out / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    assert _logged_iterations(out) == list(range(1, ITERS + 1))  # the log reads as one run


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_ctrl_c_write_a_checkpoint_and_resume_exactly(sig, code, name, tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    stopped = _interrupt_after(_command(tiny_data, out), out, 4, sig)
    assert stopped.returncode == code, stopped.stderr
    assert "Traceback" not in stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by {name}" in message and "--resume" in message
    state = torch.load(out / RESUME_FILE, weights_only=True)
    assert state["iteration"] >= 4 and f"iteration {state['iteration']}:" in message  # not just the periodic one
    assert not (out / "model.safetensors").exists()

    resumed = _run(_command(tiny_data, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at iteration {state['iteration']}" in resumed.stderr
    _assert_same_weights(out, reference)


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_periodic_checkpoint(tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    killed = _interrupt_after(_command(tiny_data, out), out, 5, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(out / RESUME_FILE, weights_only=True)
    assert state["iteration"] % CHECKPOINT_EVERY == 0 and state["iteration"] >= CHECKPOINT_EVERY
    # What a kill in the middle of a checkpoint write leaves: a temporary file, never `last.pt`.
    (out / "checkpoints" / ".last.pt.x1y2z3.tmp").write_bytes(b"PK\x03\x04 half a zip")

    resumed = _run(_command(tiny_data, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at iteration {state['iteration']}" in resumed.stderr
    _assert_same_weights(out, reference)


# ----------------------------------------------------------------------------- non-finite losses


class _NanTask:
    """A one-weight 'detector' whose loss turns NaN at chosen calls."""

    def __init__(self, bad_calls):
        torch.manual_seed(0)
        self.module = nn.Linear(1, 1)
        self.bad_calls = set(bad_calls)
        self.calls = 0

    def losses(self, images, targets):
        self.calls += 1
        x = torch.stack([image.mean() for image in images])[:, None]
        loss = (self.module(x) - 1.0).pow(2).mean()
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return {"mse": loss, "aux": 0.1 * loss.detach()}

    def train_mode(self):
        self.module.train()


def _schedule(**extra) -> TrainConfig:
    return TrainConfig(max_iters=6, batch_size=2, warmup_iters=0, checkpoint_every=2, log_every=1,
                       num_workers=0, optimizer="sgd", lr=0.1, augment=(), **extra)


def _dataset(tiny_data):
    return DetectionDataset(load_coco_split(tiny_data / "train.json"))


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    with pytest.raises(Ds2d2Error, match=r"loss term mse is nan at iteration 5; stopped \(last good checkpoint.*"
                                         r"--set teacher_train.on_nonfinite=skip skips such steps\)"):
        train(_NanTask({5}), _dataset(tiny_data), _schedule(), tmp_path, stage="teacher", device=torch.device("cpu"),
              schedule_key="teacher_train")
    assert torch.load(tmp_path / RESUME_FILE, weights_only=True)["iteration"] == 4
    assert _logged_iterations(tmp_path) == [1, 2, 3, 4]


def test_nonfinite_loss_can_be_skipped_and_counted(tiny_data, tmp_path):
    task = _NanTask({3})
    seen = []
    original = task.losses

    def spy(images, targets):
        seen.append(task.module.weight.detach().clone())
        return original(images, targets)

    task.losses = spy
    result = train(task, _dataset(tiny_data), _schedule(on_nonfinite="skip"), tmp_path, stage="teacher",
                   device=torch.device("cpu"))
    assert result.skipped_steps == 1 and result.iterations == 6
    assert torch.equal(seen[2], seen[3])  # the NaN step changed nothing
    assert not torch.equal(seen[1], seen[2])  # the good ones did
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped_step" in r]
    assert skipped == [{"iter": 3, "skipped_step": {"term": "loss term mse", "value": "nan"}}]
    assert _logged_iterations(tmp_path) == [1, 2, 4, 5, 6]
    assert torch.isfinite(task.module.weight).all()
    assert torch.load(tmp_path / RESUME_FILE, weights_only=True)["extra"]["skipped_steps"] == 1


def test_a_diverged_run_stops_even_when_skipping(tiny_data, tmp_path):
    schedule = _schedule(on_nonfinite="skip").model_copy(update={"max_iters": MAX_CONSECUTIVE_SKIPS + 5})
    task = _NanTask(range(3, 100))
    with pytest.raises(Ds2d2Error, match=f"the {MAX_CONSECUTIVE_SKIPS}th non-finite step in a row"):
        train(task, _dataset(tiny_data), schedule, tmp_path, stage="teacher", device=torch.device("cpu"))


def test_resume_accepts_a_config_written_before_a_new_option_existed(tmp_path):
    from ds2d2_cli.config import config_to_json, load_config
    from ds2d2_cli.config import config_differences

    current = config_to_json(load_config("tiny-synthetic"))
    older = json.loads(current)
    del older["train"]["cache_images"]  # an option added later, left at its default
    stored = tmp_path / "config.json"
    stored.write_text(json.dumps(older))
    assert not config_differences(stored, current)
    older["train"]["lr"] = 0.5  # a real change is still refused, and named
    older["student"]["fpn_channels"] = 32
    stored.write_text(json.dumps(older))
    assert config_differences(stored, current)
    assert config_differences(stored, current) == ["student.fpn_channels 32 -> 64", "train.lr 0.5 -> 0.001"]
    stored.write_text("{")
    assert config_differences(stored, current)
    assert config_differences(stored, current) == ["(config.json unreadable)"]
