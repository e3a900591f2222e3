"""`ds2d2 demo` end to end on a tiny budget: every stage, results.json, pictures, ONNX, reuse;
the shipped teacher and what keeps it from standing in where it does not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.compare import compare_runs
from ds2d2_cli.config import config_to_json, load_config
from ds2d2_cli.errors import InputError
from ds2d2_cli.demo import (DEMO_PRESET, STUDENTS, TEACHER_RECIPE, _check_stage, run_demo, shipped_teacher,
                            shipped_teacher_record)

from conftest import TINY

runner = CliRunner()
SMALL = [*TINY, "train.max_iters=2", "train.eval_every=null"]


def _demo(out, *extra, exit_code=0):
    # TINY shrinks the teacher too, so these runs train it (--train-teacher)
    args = ["demo", "--out", str(out), "--device", "cpu", "--scenes", "6", "--scene-size", "256", "--train-teacher"]
    for item in SMALL:
        args += ["--set", item]
    result = runner.invoke(app, [*args, *extra])  # `extra` last: its --scenes / --set win
    assert result.exit_code == exit_code, result.output
    return result


def _refusal(where, what, differences):
    return (f"error: {where}: {what} was made with other settings ({differences}); pass --fresh to start over "
            "(deletes this demo's data, runs and results) or choose another --out")


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out)
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher", *STUDENTS):
        row = results[name]
        assert {"mAP", "AP50", "AP75", "APs", "APm", "APl", "params", "images_per_s"} <= row.keys()
        assert all(0.0 <= row[k] <= 1.0 for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl"))
    assert results["teacher"]["params"] > results["ds2d2"]["params"] == results["baseline"]["params"]
    assert results["gain_AP50_points"] == round(100 * (results["ds2d2"]["AP50"] - results["baseline"]["AP50"]), 2)
    for name in ("fitnet", "cwd", "ds2d2"):
        assert results["gains"][name]["AP50_points"] == round(100 * (results[name]["AP50"] - results["baseline"]["AP50"]), 2)
    assert results["wall_s"] > 0 and results["teacher_source"] == "trained"
    for stage in ("teacher", "amplifier", *STUDENTS):
        assert (out / stage / "model.safetensors").is_file()
    for name, method in STUDENTS.items():
        assert json.loads((out / name / "config.json").read_text())["distill"]["method"] == method
        assert results[name]["method"] == method
    assert json.loads((out / "ds2d2" / "summary.json").read_text())["amplifier"]  # the high stream was on
    assert results["export"]["verify"]["passed"] and (out / "student.onnx").is_file()
    for picture in ("detections.png", "training_curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 300
    counts = results["picture_counts"]
    assert counts["score_thresh"] == 0.2 and counts["iou"] == 0.5
    for model in ("teacher", "baseline", "DS2D2"):  # every panel's counts add up to the scene's objects
        assert counts[model]["hits"] + counts[model]["misses"] == counts["objects"]
    assert "DS2D2 student vs baseline" in first.stdout and "FitNet student vs baseline" in first.stdout
    assert "CWD student vs baseline" in first.stdout and "teacher (trained)" in first.stdout

    again = _demo(out)
    assert again.output.count("reusing") == 7  # data, teacher, amplifier, four students
    assert json.loads((out / "results.json").read_text())["ds2d2"]["AP50"] == results["ds2d2"]["AP50"]

    # compare counts parameters as the demo does (model.parameters(), not BatchNorm buffers)
    compared = compare_runs([out / "baseline", out / "ds2d2"])
    assert [r["info"]["params"] for r in compared["runs"]] == [results["baseline"]["params"],
                                                                results["ds2d2"]["params"]]


def test_demo_reuses_only_what_was_made_with_the_same_settings(tmp_path):
    out = tmp_path / "demo"
    _demo(out)
    record = json.loads((out / "data" / "demo_data.json").read_text())
    assert record == {"scenes": 6, "scene_size": 256, "seed": 0, "classes": "synthetic", "input_size": 128,
                      "gap": 32}
    before = {p: p.read_bytes() for p in (out / "results.json", out / "data" / "demo_data.json",
                                          out / "teacher" / "config.json", out / "ds2d2" / "model.safetensors")}

    other_data = _demo(out, "--scenes", "7", exit_code=2)
    assert other_data.stderr.strip() == _refusal(out / "data", "the data", "scenes 6 -> 7")
    other_model = _demo(out, "--set", "student.fpn_channels=32", "--set", "train.max_iters=3", exit_code=2)
    # the teacher trains on `train` here (no teacher_train): its schedule changed, its model did not
    assert other_model.stderr.strip() == _refusal(out / "teacher", "teacher", "train.max_iters 2 -> 3")
    other_student = _demo(out, "--set", "student.fpn_channels=32", exit_code=2)  # teacher and amplifier still fit
    assert other_student.stderr.strip() == _refusal(out / "baseline", "student (baseline, no teacher)",
                                                    "student.fpn_channels 16 -> 32")
    assert {p: p.read_bytes() for p in before} == before  # a refused re-run touches nothing
    shutil.rmtree(out / "teacher")  # a teacher trained again is another teacher: nothing made from the old one is kept
    retrained = _demo(out, exit_code=2)
    assert retrained.stderr.strip() == (f"error: {out / 'amplifier'}: amplifier was trained from another teacher; "
                                        "pass --fresh to start over or choose another --out")

    fresh = _demo(out, "--fresh", "--scenes", "7", "--set", "student.fpn_channels=32")
    assert "reusing" not in fresh.output
    assert json.loads((out / "data" / "demo_data.json").read_text())["scenes"] == 7
    assert len(list((out / "data" / "synthetic").rglob("*.png"))) == 7
    for stage in ("teacher", "amplifier", *STUDENTS):
        assert json.loads((out / stage / "config.json").read_text())["student"]["fpn_channels"] == 32

    shipped = runner.invoke(app, ["demo", "--out", str(out), "--device", "cpu", "--quick", "--scenes", "7"])
    assert shipped.exit_code == 2  # a trained teacher is there; the shipped one never replaces it
    assert shipped.stderr.strip() == (f"error: {out / 'teacher'}: holds another teacher than the shipped "
                                      "one (trained with --train-teacher?); pass --fresh to start over or "
                                      "choose another --out")


def _tiny_config(*extra):
    return load_config(DEMO_PRESET, [*SMALL, *extra])


def test_an_interrupted_stage_with_other_settings_is_refused_before_any_work(tmp_path):
    out = tmp_path / "demo"
    (out / "teacher" / "checkpoints").mkdir(parents=True)
    (out / "teacher" / "checkpoints" / "last.pt").write_bytes(b"")
    stored = _tiny_config()
    stored = stored.model_copy(update={"data": stored.data.model_copy(
        update={"root": (out / "data" / "synthetic-128").resolve()})})
    (out / "teacher" / "config.json").write_text(config_to_json(stored))
    with pytest.raises(InputError) as error:
        run_demo(out, overrides=[*SMALL, "train.lr=0.01"], scenes=6, scene_size=256, train_teacher=True)
    assert str(error.value) == (f"{out / 'teacher'}: teacher was made with other settings "
                                f"(train.lr {json.dumps(stored.train.lr)} -> 0.01); "
                                "pass --fresh to start over (deletes this demo's data, runs and results) or "
                                "choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["teacher"]  # no data was generated


def test_a_finished_stage_is_reused_from_a_moved_folder_an_interrupted_one_is_not(tmp_path):
    stage = tmp_path / "teacher"
    stage.mkdir()
    config = _tiny_config()
    made = config.model_copy(update={"data": config.data.model_copy(update={"root": tmp_path / "old" / "data"})})
    wanted = config.model_copy(update={"data": config.data.model_copy(update={"root": tmp_path / "new" / "data"})})
    (stage / "config.json").write_text(config_to_json(made))
    (stage / "model.safetensors").write_bytes(b"")
    _check_stage(stage, wanted, "teacher", "teacher")  # the data is checked on its own (demo_data.json)
    (stage / "model.safetensors").unlink()
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"teacher was made with other settings \(data\.root "):
        _check_stage(stage, wanted, "teacher", "teacher")  # the stage's own --resume compares the data path too
    _check_stage(stage, made, "teacher", "teacher")


def test_data_without_a_settings_record_is_refused(tmp_path):
    out = tmp_path / "demo"
    (out / "data" / "synthetic-128").mkdir(parents=True)
    (out / "data" / "synthetic-128" / "train.json").write_text("{}")
    with pytest.raises(InputError) as error:
        run_demo(out, overrides=SMALL, scenes=6, scene_size=256, train_teacher=True)
    assert str(error.value) == (f"{out / 'data'}: holds data without a record of its settings (an older ds2d2 "
                                "demo); pass --fresh to start over or choose another --out")


def test_picture_counts_hits_misses_and_false_alarms_by_hand():
    from ds2d2_cli.evaluation import match_detections

    truth = [{"bbox": [0, 0, 10, 10], "category_id": 1}, {"bbox": [20, 20, 10, 10], "category_id": 1},
             {"bbox": [50, 50, 10, 10], "category_id": 2}]
    found = [{"bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.9},   # hit
             {"bbox": [1, 1, 10, 10], "category_id": 1, "score": 0.8},   # IoU 0.68 with a taken object: false alarm
             {"bbox": [20, 20, 10, 10], "category_id": 1, "score": 0.2},  # below the threshold: not shown
             {"bbox": [52, 50, 10, 10], "category_id": 2, "score": 0.7},  # IoU 80/120: hit
             {"bbox": [50, 50, 10, 10], "category_id": 1, "score": 0.6}]  # right place, wrong class: false alarm
    result = match_detections(truth, found, iou_thresh=0.5, score_thresh=0.3)
    assert (result["hits"], result["misses"], result["false_alarms"]) == (2, 1, 2)
    assert [d["hit"] for d in result["detections"]] == [True, False, True, False]
    assert match_detections(truth, [], score_thresh=0.3) | {"detections": []} == {
        "hits": 0, "misses": 3, "false_alarms": 0, "detections": []}


def test_quick_demo_distills_from_the_shipped_teacher_and_says_how_long_it_will_take(tmp_path):
    from ds2d2_cli.checkpoint import file_sha256
    from ds2d2_cli.stages.runner import teacher_of

    out = tmp_path / "quick"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "of training and evaluation on this machine" in result.output
    assert "amplifier took" in result.output and "left" in result.output
    assert "the shipped demo teacher" in result.output and "teacher (shipped)" in result.output
    assert "smoke run" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["estimated_s"] > 0 and results["teacher_source"] == "shipped"
    assert file_sha256(out / "teacher" / "model.safetensors") == file_sha256(shipped_teacher())
    for name in STUDENTS:  # every student ran its quick schedule; the distilled ones name the shipped teacher
        meta = json.loads((out / name / "summary.json").read_text())
        assert meta["iterations"] == 10
        assert teacher_of(out / name / "model.safetensors") == (None if name == "baseline"
                                                                 else file_sha256(shipped_teacher()))
    assert results["teacher"]["AP50"] > results["baseline"]["AP50"]  # 20-iteration students vs a trained teacher
    assert json.loads((out / "data" / "demo_data.json").read_text())["scenes"] == 6
    again = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 0 and "reusing the shipped teacher" in again.output


def test_quick_demo_trains_its_teacher_with_train_teacher(tmp_path):
    out = tmp_path / "quick"
    result = runner.invoke(app, ["demo", "--quick", "--train-teacher", "--out", str(out), "--device", "cpu",
                                 "--set", "student.fpn_channels=16", "--set", "teacher.fpn_channels=32"])
    assert result.exit_code == 0, result.output
    assert "teacher took" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_source"] == "trained"
    assert json.loads((out / "teacher" / "summary.json").read_text())["iterations"] == 20


@pytest.mark.parametrize("extra, message", [
    (["--set", "teacher.fpn_channels=32"], "--set teacher.fpn_channels=32 changes the teacher, and the demo uses "
                                           "its shipped teacher"),
    (["--set", "teacher_train.max_iters=100"], "--set teacher_train.max_iters=100 changes the teacher"),
    (["--preset", "tiny-synthetic-frcnn"], "the shipped teacher was trained with other settings (teacher.detector "
                                           '"retinanet" -> "faster_rcnn"'),
    (["--scenes", "12"], "the shipped teacher was trained on the demo's default scenes (scenes 24 -> 12); its "
                         "training scenes could be among these held-out ones"),
])
def test_the_shipped_teacher_stands_in_only_where_it_fits(tmp_path, extra, message):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--device", "cpu", *extra])
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith(f"error: {shipped_teacher()}: {message}"), error
    assert error.endswith("; add --train-teacher to train a teacher with these settings")
    assert not out.exists()  # refused before any work


def test_the_shipped_teacher_is_the_recipe_on_the_demo_scenes():
    """The file in the package, its record and the recipe in the code describe one teacher."""
    from ds2d2_cli.checkpoint import file_sha256, load_checkpoint
    from ds2d2_cli.demo import SCENE_SIZE, SCENES, TEACHER_GAP, _data_settings

    path = shipped_teacher()
    record = shipped_teacher_record()
    config = load_config(DEMO_PRESET, TEACHER_RECIPE)
    assert record["sha256"] == file_sha256(path) and record["recipe"] == TEACHER_RECIPE
    assert record["data"] == _data_settings(config, SCENES, SCENE_SIZE, gap=TEACHER_GAP)
    checkpoint = load_checkpoint(path, "teacher")
    assert checkpoint.run_config().stage_inputs("teacher") == config.stage_inputs("teacher")
    assert {t.dtype for t in checkpoint.tensors.values() if t.is_floating_point()} == {torch.float16}
    assert record["iterations"] == config.teacher_train.max_iters and path.stat().st_size < 50e6


def test_the_forecast_is_not_swung_by_one_short_stage():
    from ds2d2_cli.demo import _Clock
    from ds2d2_cli.progress import NullReporter

    clock = _Clock({"amplifier": 15.0, "baseline": 85.0, "ds2d2": 400.0}, NullReporter())  # 500 s, prior 100 s
    clock.finished("amplifier", 19.0)
    assert clock.pace() == pytest.approx((19 + 100) / (15 + 100))  # 1.035, not 19 / 15 = 1.27
    clock.finished("baseline", 170.0)  # twice as slow as estimated: the forecast follows
    assert clock.pace() == pytest.approx((189 + 100) / (100 + 100))


@pytest.mark.slow
def test_demo_jobs_train_side_by_side_with_the_weights_of_one_at_a_time(tmp_path):
    """`--jobs 2`: the teacher, then the amplifier and students, two processes at a time, each
    run with its --threads; every model equals, bit for bit, the one `--jobs 1` trains."""
    from safetensors.torch import load_file

    _demo(tmp_path / "one", "--threads", "1")
    side_by_side = _demo(tmp_path / "two", "--jobs", "2", "--threads", "1")
    assert "2 runs at a time" in " ".join(side_by_side.output.split())
    for name in ("teacher", "amplifier", *STUDENTS):
        ours, theirs = (load_file(tmp_path / where / name / "model.safetensors") for where in ("two", "one"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert "ds2d2: distill" in side_by_side.output.replace("note: ", "")  # a worker's note, forwarded
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["jobs"] == 2 and results["torch_threads_per_run"] == 1
    with pytest.raises(InputError, match="--jobs and --threads must be at least 1"):
        run_demo(tmp_path / "none", jobs=0)
