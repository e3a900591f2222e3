"""`metrics.jsonl` through `MetricsLog`: writing on rank 0 only, reading with clear errors."""

from __future__ import annotations

import pytest

from ds2d2_cli.errors import InputError
from ds2d2_cli.metrics_log import LOG_FILE, MetricsLog


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
