"""`ds2d2 compare`: two tiny runs -> table with deltas, compare.json, per-class chart, curves."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.checkpoint import load_checkpoint
from ds2d2_cli.cli.app import app
from ds2d2_cli.compare import compare_runs
from ds2d2_cli.models.detectors import model_from_checkpoint

from conftest import TINY

runner = CliRunner()


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def two_runs(tiny_data, module_tmp):
    runs = module_tmp("compare-runs")
    for name, seed in (("a", 0), ("b", 1)):
        result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                     "--max-iters", "2", "--device", "cpu", "--out", str(runs / name),
                                     *_sets([*TINY, f"train.seed={seed}"])])
        assert result.exit_code == 0, result.output
    return runs / "a", runs / "b"


def _fake_run(folder, ap50, per_class, split="val", method="none"):
    folder.mkdir(parents=True)
    metrics = {"mAP": ap50 / 2, "AP50": ap50, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0,
               "per_class": {c: {"AP50": v, "AP": v / 2} for c, v in per_class.items()}, "images_per_s": 10.0}
    (folder / "summary.json").write_text(json.dumps({"stage": "student", "method": method, "metrics": metrics,
                                                     "eval_split": split, "iterations": 5, "seconds": 1.0}))
    return folder


def test_deltas_are_points_against_the_first_run(tmp_path):
    a = _fake_run(tmp_path / "x" / "run", 0.25, {"ship": 0.5, "plane": 0.0})
    b = _fake_run(tmp_path / "y" / "run", 0.30, {"ship": 0.25, "plane": 0.125}, method="ds2d2")
    comparison = compare_runs([a, b])
    assert [r["name"] for r in comparison["runs"]] == ["x/run", "y/run"]  # clashing names get their parent
    second = comparison["runs"][1]
    assert second["metrics"]["AP50"] == 30.0 and second["deltas"]["AP50"] == 5.0
    assert second["deltas"]["mAP"] == 2.5
    assert second["per_class_delta"] == {"ship": -25.0, "plane": 12.5}
    assert "deltas" not in comparison["runs"][0]
    assert comparison["warnings"] == []


def test_mismatched_splits_and_classes_warn(tmp_path):
    a = _fake_run(tmp_path / "a", 0.2, {"ship": 0.2, "plane": 0.1})
    b = _fake_run(tmp_path / "b", 0.2, {"ship": 0.3}, split="test")
    comparison = compare_runs([a, b])
    assert comparison["classes"] == ["ship"]
    assert len(comparison["warnings"]) == 2


def _fake_eval(path, ap50, merged, split="val"):
    """What `ds2d2 eval CKPT --json FILE` writes (no checkpoint on disk: no params)."""
    path.write_text(json.dumps({"mAP": ap50 / 2, "AP50": ap50, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0,
                                "per_class": {"ship": {"AP50": ap50, "AP": ap50 / 2}}, "images_per_s": 10.0,
                                "stage": "student", "split": split, "merged_patches": merged}))
    return path


def test_merged_scene_and_patch_level_scores_warn(tmp_path):
    run = _fake_run(tmp_path / "run", 0.2, {"ship": 0.2})
    merged = _fake_eval(tmp_path / "merged.json", 0.3, True)
    patches = _fake_eval(tmp_path / "patches.json", 0.25, False)
    assert compare_runs([run, patches])["warnings"] == []  # a run folder is scored per patch too
    assert compare_runs([run, merged])["warnings"] == [
        "the runs mix merged-scene scores (merged) with patch-level scores (run)"]
    assert compare_runs([merged, run, patches])["warnings"] == [
        "the runs mix merged-scene scores (merged) with patch-level scores (run, patches)"]
    assert compare_runs([merged, _fake_eval(tmp_path / "merged2.json", 0.1, True)])["warnings"] == []
    [row] = [r for r in compare_runs([run, merged])["runs"] if r["name"] == "merged"]
    assert row["info"]["merged_patches"] is True

    result = runner.invoke(app, ["compare", str(run), str(merged), "--no-charts"])
    assert result.exit_code == 0, result.output
    assert "note: the runs mix merged-scene scores (merged) with patch-level scores (run)" in result.stderr


def test_compare_cli_on_two_tiny_runs(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--name", "first",
                                 "--name", "second"])
    assert result.exit_code == 0, result.output
    assert "deltas vs first" in result.output and "per-class AP50" in result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["reference"] == "first" and [r["name"] for r in data["runs"]] == ["first", "second"]
    summary_a = json.loads((a / "summary.json").read_text())["metrics"]
    summary_b = json.loads((b / "summary.json").read_text())["metrics"]
    assert data["runs"][1]["deltas"]["AP50"] == round(round(100 * summary_b["AP50"], 2)
                                                      - round(100 * summary_a["AP50"], 2), 2)
    # parameters of the built model, as `ds2d2 demo` counts them (BatchNorm buffers are not parameters)
    model = model_from_checkpoint(load_checkpoint(a / "model.safetensors"))
    assert data["runs"][0]["info"]["params"] == sum(p.numel() for p in model.parameters())
    assert data["runs"][0]["info"]["params"] < sum(t.numel() for t in model.state_dict().values())
    for picture in ("per_class_ap50_delta.png", "training_curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 300


def test_compare_accepts_eval_json(two_runs, tmp_path):
    a, b = two_runs
    metrics = tmp_path / "b-eval.json"
    result = runner.invoke(app, ["eval", str(b / "model.safetensors"), "--device", "cpu", "--json", str(metrics)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", str(a), str(metrics), "--no-charts", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["runs"][1]["name"] == "b-eval"
    assert data["runs"][1]["info"]["merged_patches"] is False and data["warnings"] == []
    assert data["runs"][1]["info"]["params"] == compare_runs([b, a])["runs"][0]["info"]["params"]  # same checkpoint
    assert data["runs"][1]["metrics"]["AP50"] == round(100 * json.loads(metrics.read_text())["AP50"], 2)

    merged = tmp_path / "b-merged.json"
    result = runner.invoke(app, ["eval", str(b / "model.safetensors"), "--device", "cpu", "--merge-patches",
                                 "--json", str(merged)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", str(a), str(merged), "--no-charts", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == [
        "the runs mix merged-scene scores (b-merged) with patch-level scores (a)"]


@pytest.mark.parametrize("case", ["one-run", "missing", "no-metrics", "not-json", "names"])
def test_compare_refuses_bad_runs(case, tmp_path):
    good = _fake_run(tmp_path / "good", 0.2, {"ship": 0.2})
    if case == "one-run":
        args, needle = [str(good)], "at least two runs"
    elif case == "missing":
        args, needle = [str(good), str(tmp_path / "nope")], "nope"
    elif case == "no-metrics":
        folder = tmp_path / "amp"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({"stage": "amplifier", "metrics": {}}))
        args, needle = [str(good), str(folder)], "no evaluation metrics"
    elif case == "not-json":
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        args, needle = [str(good), str(bad)], "bad.json"
    else:
        args, needle = [str(good), str(good), "--name", "only-one"], "--name"
    result = runner.invoke(app, ["compare", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_damaged_training_log_is_one_line_and_leaves_no_charts(tmp_path):
    a = _fake_run(tmp_path / "a", 0.2, {"ship": 0.2})
    b = _fake_run(tmp_path / "b", 0.3, {"ship": 0.3})
    (b / "metrics.jsonl").write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss":\n')
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "metrics.jsonl:2: not a JSON line" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "out").glob("*")) == []  # the per-class chart made before the failure is gone
