"""`ds2d2 demo` end to end on a tiny budget: every stage, results.json, pictures, ONNX, reuse."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app

from conftest import TINY

runner = CliRunner()
SMALL = [*TINY, "train.max_iters=2", "train.eval_every=null"]


def _demo(out, *extra):
    args = ["demo", "--out", str(out), "--device", "cpu", "--scenes", "6", "--scene-size", "256", *extra]
    for item in SMALL:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out)
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher", "baseline", "ds2d2"):
        row = results[name]
        assert {"mAP", "AP50", "AP75", "APs", "APm", "APl", "params", "images_per_s"} <= row.keys()
        assert all(0.0 <= row[k] <= 1.0 for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl"))
    assert results["teacher"]["params"] > results["ds2d2"]["params"] == results["baseline"]["params"]
    assert results["gain_AP50_points"] == round(100 * (results["ds2d2"]["AP50"] - results["baseline"]["AP50"]), 2)
    assert results["wall_s"] > 0
    for stage in ("teacher", "amplifier", "ds2d2", "baseline"):
        assert (out / stage / "model.safetensors").is_file()
    assert json.loads((out / "baseline" / "config.json").read_text())["distill"]["method"] == "none"
    assert json.loads((out / "ds2d2" / "summary.json").read_text())["amplifier"]  # the high stream was on
    assert results["export"]["verify"]["passed"] and (out / "student.onnx").is_file()
    for picture in ("detections.png", "training_curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 300
    assert "DS2D2 student vs baseline" in first.stdout and "AP50" in first.stdout

    again = _demo(out)
    assert again.output.count("reusing") == 5  # data + four training stages
    assert json.loads((out / "results.json").read_text())["ds2d2"]["AP50"] == results["ds2d2"]["AP50"]
