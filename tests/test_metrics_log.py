"""`metrics.jsonl` through `MetricsLog`: trimming on resume, reading, and the optional TensorBoard sink."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.errors import InputError
from ds2d2_cli.metrics_log import LOG_FILE, TENSORBOARD_DIR, MetricsLog

from conftest import TINY

runner = CliRunner()


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def _scalars(out: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _flat(prefix: str, values: dict) -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def _expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """What the TensorBoard sink must hold for these log records (float32, as TensorBoard stores them)."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        if "skipped_step" in record:
            continue
        if "eval" in record:
            flat = _flat("eval", record["eval"])
        else:
            flat = _flat("train", {k: v for k, v in record.items() if k not in ("iter", "epoch")})
        for tag, value in flat.items():
            expected.setdefault(tag, {})[record["iter"]] = float(np.float32(value))
    return expected


def test_tensorboard_holds_the_numbers_of_metrics_jsonl(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(out), "--max-iters", "4", "--device", "cpu",
                                 *_sets([*TINY, "train.tensorboard=true"])])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert [r["iter"] for r in records if "eval" in r] == [2, 4]  # during training, and the final one
    scalars = _scalars(out)
    assert scalars == _expected(records)
    assert {"train/loss", "train/classification", "train/bbox_regression", "train/lr", "train/images_per_s",
            "eval/mAP", "eval/AP50", "eval/per_class/plane/AP50"} <= scalars.keys()
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]


def test_tensorboard_reads_as_one_run_after_a_resume(tmp_path):
    """A resumed run trims metrics.jsonl; TensorBoard hides the events after the checkpoint too."""
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, tensorboard=True, writes=True) as log:
        for iteration in range(1, 5):
            log.step({"iter": iteration, "epoch": 0, "lr": 0.1, "loss": float(iteration), "images_per_s": 1.0})
        log.evaluation(2, {"mAP": 0.25})
        log.evaluation(4, {"mAP": 0.5})
    with MetricsLog(tmp_path, tensorboard=True, writes=True) as log:  # resumed from iteration 2
        log.trim(2)
        assert [r["iter"] for r in _records(tmp_path)] == [1, 2, 2]
        for iteration in range(3, 5):
            log.step({"iter": iteration, "epoch": 0, "lr": 0.1, "loss": 10.0 + iteration, "images_per_s": 1.0})
        log.evaluation(4, {"mAP": 0.75})
    records = _records(tmp_path)
    assert [r.get("loss") for r in records if "loss" in r] == [1.0, 2.0, 13.0, 14.0]
    assert _scalars(tmp_path) == _expected(records)


def test_a_log_that_writes_nothing_on_other_processes(tmp_path):
    with MetricsLog(tmp_path, writes=False) as log:
        log.open()
        log.step({"iter": 1, "epoch": 0, "lr": 0.1, "loss": 1.0, "images_per_s": 1.0})
        log.evaluation(1, {"mAP": 0.5})
        log.trim(0)
    assert not (tmp_path / LOG_FILE).exists()


def test_trim_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / LOG_FILE
    lines = ['{"iter": 1, "loss": 1.0}', '{"iter": 2, "eval": {"mAP": 0.5}}', '{"iter": 3, "loss": 3.0}',
             '{"iter": 3, "skipped_step": {"term": "x", "value": "nan"}}']
    path.write_text("\n".join(lines) + "\n")
    MetricsLog(tmp_path, writes=True).trim(2)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])  # kept lines byte for byte
    MetricsLog(tmp_path, writes=False).trim(0)  # only rank 0 touches the file
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])


def test_reading_a_log(tmp_path):
    path = tmp_path / LOG_FILE
    path.write_text('{"iter": 1, "loss": 1.0}\n\n{"iter": 2, "skipped_step": {"term": "x", "value": "nan"}}\n'
                    '{"iter": 2, "eval": {"mAP": 0.5}}\n')
    steps, evals = MetricsLog.read(path)
    assert steps == [{"iter": 1, "loss": 1.0}] and evals == [{"iter": 2, "eval": {"mAP": 0.5}}]
    path.write_text('{"iter": 1, "loss": 1.0}\n{"loss": 2.0}\n')
    with pytest.raises(InputError, match="no iter"):
        MetricsLog.read(path)
    path.write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss":\n')
    with pytest.raises(InputError) as error:
        MetricsLog.read(path)
    assert f"{path}:2: not a JSON line" in str(error.value)


@pytest.fixture
def without_tensorboard(monkeypatch):
    """Import as if the tensorboard package were not installed."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_tensorboard_without_the_package_is_a_clear_error(tiny_data, tmp_path, without_tensorboard):
    with pytest.raises(InputError, match=r"^teacher_train.tensorboard=true needs the tensorboard package: "
                                         r"pip install 'ds2d2\[tensorboard\]'$"):
        MetricsLog(tmp_path, tensorboard=True, setting="teacher_train.tensorboard")
    out = tmp_path / "run"  # no --max-iters: the teacher trains on the `train` schedule itself
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(out), "--device", "cpu",
                                 *_sets([*TINY, "train.max_iters=4", "train.tensorboard=true"])])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train.tensorboard=true needs the tensorboard package: "
                      "pip install 'ds2d2[tensorboard]'"], result.output
    assert not (out / LOG_FILE).exists() and not (out / "checkpoints").exists()  # nothing was trained
