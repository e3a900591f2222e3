"""The CLI shell: version, presets, `--set` overrides and clean config errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ds2d2_cli import __version__
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import available_presets, load_config
from ds2d2_cli.errors import InputError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"ds2d2 {__version__}"


def test_shipped_presets_validate_and_follow_method_md():
    names = available_presets()
    assert {"retina-dior", "frcnn-dior", "retina-dota", "frcnn-dota", "tiny-synthetic"} <= set(names)
    retina = load_config("retina-dior")
    assert (retina.teacher.backbone, retina.student.backbone) == ("resnet101", "resnet18")
    assert (retina.data.classes, retina.input.size, retina.data.train_split, retina.data.eval_split) == (
        "dior", 800, "trainval", "test")
    assert retina.distill.weights.explicit_low == 1e-5 and retina.distill.weights.implicit_full == 1.0
    frcnn = load_config("frcnn-dota")
    assert (frcnn.teacher.detector, frcnn.data.classes, frcnn.input.size) == ("faster_rcnn", "dota-v1.0", 1024)
    assert str(frcnn.data.root) == "data/DOTA-1024"  # where `prepare-data dota --split 1024` writes


# method.md "Loss weights in the authors' configs": explicit low / high, implicit full / high
AUTHORS_WEIGHTS = {
    "retina-dior": (1e-5, 1e-5, 1.0, 1.0),
    "retina-dota": (7e-5, 5e-5, 0.7, 0.5),
    "frcnn-dior": (0.5, 0.5, 1e-5, 1e-5),
    "frcnn-dota": (0.12, 1.2, 1.5e-3, 3e-3),
    # the strong-teacher presets: the same R18 students (tests/test_presets_x101.py)
    "retina-dior-x101": (1e-5, 1e-5, 1.0, 1.0),
    "retina-dota-x101": (7e-5, 5e-5, 0.7, 0.5),
    "frcnn-dior-x101": (0.5, 0.5, 1e-5, 1e-5),
}


@pytest.mark.parametrize("preset", sorted(AUTHORS_WEIGHTS))
def test_paper_presets_use_the_authors_weights_and_recipe(preset):
    config = load_config(preset)
    w = config.distill.weights
    assert (w.explicit_low, w.explicit_high, w.implicit_full, w.implicit_high) == AUTHORS_WEIGHTS[preset]
    train = config.schedule("student")
    # rates written for 16 images per step: 0.0025 (RetinaNet) / 0.01 (Faster R-CNN) at batch 8
    at_batch_8 = train.lr * 8 / train.lr_base_batch
    assert at_batch_8 == pytest.approx(0.0025 if preset.startswith("retina") else 0.01)
    assert train.augment == ("hflip",) and train.grad_clip is None and train.optimizer == "sgd"
    d = config.distill
    assert (d.implicit_input, d.box_kd_anchors, d.kd_normalizer, d.roi_kd_reduction, d.amplifier_rpn) == (
        "raw", "all", "per_image", "sum", "high_frequency")
    shown = runner.invoke(app, ["presets", preset])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["distill"]["weights"]["implicit_high"] == w.implicit_high


def test_set_overrides_and_presets_show():
    config = load_config("tiny-synthetic", ["train.lr=0.02", "distill.streams=[explicit-low]", "student.fpn_channels=32"])
    assert config.train.lr == 0.02 and config.distill.streams == ("explicit-low",) and config.student.fpn_channels == 32
    result = runner.invoke(app, ["presets", "tiny-synthetic", "--set", "train.batch_size=3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["batch_size"] == 3


def test_preset_from_path(tmp_path):
    path = tmp_path / "mine.yaml"
    from ds2d2_cli.config import presets_folder

    path.write_text((presets_folder() / "tiny-synthetic.yaml").read_text().replace(
        "name: tiny-synthetic", "name: mine"))
    assert load_config(str(path)).name == "mine"


@pytest.mark.parametrize("args, message", [
    (["presets", "no-such-preset"], "unknown preset 'no-such-preset'; available: frcnn-dior"),
    (["presets", "tiny-synthetic", "--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["presets", "tiny-synthetic", "--set", "train.nonsense=1"], "train.nonsense: Extra inputs are not permitted"),
    (["presets", "tiny-synthetic", "--set", "train.lr"], "expected KEY=VALUE"),
    (["presets", "tiny-synthetic", "--set", "distill.wavelet=nope"], "unknown discrete wavelet 'nope'"),
])
def test_config_errors_are_clean(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.output


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninput:\n  size: [1\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(str(path))


def test_schedule_key_names_the_stage_schedule_in_use():
    config = load_config("tiny-synthetic")  # sets teacher_train and amplifier_train
    assert [config.schedule_key(s) for s in ("teacher", "amplifier", "student")] == \
        ["teacher_train", "amplifier_train", "train"]
    assert config.schedule("teacher").max_iters == 600 and config.schedule("student").max_iters == 450
    assert config.schedule("teacher").eval_every is None and config.schedule("student").eval_every == 150
    plain = load_config("tiny-synthetic", ["teacher_train=null"])
    assert plain.schedule_key("teacher") == "train" and plain.schedule("teacher").max_iters == 450


def test_global_flags_may_follow_the_command():
    from ds2d2_cli.cli.app import global_flags_first

    assert global_flags_first(["eval", "m.safetensors", "--debug", "-q"]) == ["--debug", "-q", "eval", "m.safetensors"]
    assert global_flags_first(["--quiet", "presets"]) == ["--quiet", "presets"]
    assert global_flags_first(["predict", "m", "--", "--debug"]) == ["predict", "m", "--", "--debug"]
    assert global_flags_first(["distill", "--set", "x=--debug"]) == ["distill", "--set", "x=--debug"]


def test_debug_after_the_command_shows_the_traceback():
    import subprocess
    import sys

    plain = subprocess.run([sys.executable, "-m", "ds2d2_cli", "presets", "no-such-preset"],
                           capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "ds2d2_cli", "presets", "no-such-preset", "--debug"],
                           capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert "unknown preset 'no-such-preset'" in debug.stderr


def test_presets_table_stays_whole_when_piped():
    result = CliRunner().invoke(app, ["presets"])
    assert result.exit_code == 0
    assert "tiny-synthetic-frcnn" in result.output and "R101-FPN256" in result.output
    assert "data/synthetic-128" in result.output


def test_stage_inputs_hold_what_each_stage_depends_on():
    base = load_config("tiny-synthetic")
    student_only = load_config("tiny-synthetic", ["student.fpn_channels=32", "distill.disw=false", "train.lr=0.5"])
    teacher_only = load_config("tiny-synthetic", ["teacher_train.lr=0.5"])
    wavelet = load_config("tiny-synthetic", ["distill.wavelet=db2"])
    moved = load_config("tiny-synthetic", ["data.root=/elsewhere"])
    for stage in ("teacher", "amplifier"):
        assert student_only.stage_inputs(stage) == base.stage_inputs(stage)
    assert student_only.stage_inputs("student") != base.stage_inputs("student")
    assert teacher_only.stage_inputs("teacher") != base.stage_inputs("teacher")
    assert teacher_only.stage_inputs("amplifier") == base.stage_inputs("amplifier")
    assert teacher_only.stage_inputs("student") == base.stage_inputs("student")
    assert wavelet.stage_inputs("teacher") == base.stage_inputs("teacher")
    assert wavelet.stage_inputs("amplifier") != base.stage_inputs("amplifier")
    assert all(moved.stage_inputs(s) == base.stage_inputs(s) for s in ("teacher", "amplifier", "student"))
    assert set(base.stage_inputs("teacher")) == {"data", "input", "teacher", "teacher_train"}


def test_a_run_written_before_the_fidelity_settings_is_read_as_it_behaved(tmp_path):
    """A config.json without the fidelity pass's settings trained the old way: it must not match
    the new defaults (no silent reuse or resume), and amplifier_rpn only matters to Faster R-CNN."""
    from ds2d2_cli.config import config_differences, config_to_json, stored_config

    for preset, rpn in (("tiny-synthetic", None), ("tiny-synthetic-frcnn", "frozen")):
        new = load_config(preset)
        old = json.loads(config_to_json(new))
        for key in ("implicit_input", "box_kd_anchors", "kd_normalizer", "roi_kd_reduction", "amplifier_rpn"):
            old["distill"].pop(key)
        path = tmp_path / f"{preset}.json"
        path.write_text(json.dumps(old))
        d = stored_config(old).distill
        assert (d.implicit_input, d.box_kd_anchors, d.kd_normalizer, d.roi_kd_reduction) == (
            "adapted", "not_ignored", "batch", "mean")
        assert d.amplifier_rpn == (rpn or new.distill.amplifier_rpn)
        differ = config_differences(path, config_to_json(new))
        assert 'distill.implicit_input "adapted" -> "raw"' in differ
        assert any(x.startswith("distill.amplifier_rpn") for x in differ) == (rpn is not None)
        # a config.json that has the settings is read as written
        path.write_text(config_to_json(new))
        assert config_differences(path, config_to_json(new)) == []


def test_a_set_the_stage_does_not_read_is_refused(tmp_path):
    """tiny-synthetic trains its teacher with teacher_train: a train.* override would be dropped."""
    out = tmp_path / "teacher"
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tmp_path),
                                 "--out", str(out), "--set", "train.tensorboard=true"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "error: --set train.tensorboard=true is not read by train-teacher: preset tiny-synthetic trains the teacher "
        "with its own teacher_train section; use --set teacher_train.tensorboard=true"]
    assert not out.exists()


def test_a_set_the_stage_reads_is_kept():
    from ds2d2_cli.cli.stages import resolve_config

    config = resolve_config("tiny-synthetic", ["teacher_train.tensorboard=true"], stage="teacher",
                            command="train-teacher", max_iters=2)
    assert config.schedule_key("teacher") == "teacher_train"
    assert (config.teacher_train.tensorboard, config.teacher_train.max_iters, config.train.tensorboard) == (
        True, 2, False)
    # without its own section the teacher reads train: `--max-iters` copies it, overrides included
    plain = resolve_config("tiny-synthetic", ["teacher_train=null", "train.tensorboard=true"], stage="teacher",
                           command="train-teacher", max_iters=2)
    assert (plain.teacher_train.tensorboard, plain.teacher_train.max_iters) == (True, 2)


@pytest.mark.parametrize("stage, command, overrides, message", [
    ("amplifier", "train-amplifier", ["train.lr=0.5"],
     "--set train.lr=0.5 is not read by train-amplifier: preset tiny-synthetic trains the amplifier with its own "
     "amplifier_train section; use --set amplifier_train.lr=0.5"),
    ("student", "distill", ["teacher_train.eval_every=5"],
     "--set teacher_train.eval_every=5 is not read by distill: the student trains with the train section; use "
     "--set train.eval_every=5"),
    ("teacher", "train-teacher", ["teacher_train=null", "amplifier_train.lr=0.5"],
     "--set amplifier_train.lr=0.5 is not read by train-teacher: the teacher trains with the train section (no "
     "teacher_train section is set); use --set train.lr=0.5"),
    ("teacher", "train-teacher", ["teacher_train=null", "amplifier_train=null", "train.lr=0.5", "distill.disw=false"],
     None),
    ("student", "distill", ["train.augment=[hflip]", "teacher_train={max_iters: 3}"], None),
])
def test_unread_schedule_overrides(stage, command, overrides, message):
    from ds2d2_cli.config import check_overrides_read

    config = load_config("tiny-synthetic", overrides)
    if message is None:
        check_overrides_read(config, stage, overrides, command=command, preset="tiny-synthetic")
        return
    with pytest.raises(InputError) as caught:
        check_overrides_read(config, stage, overrides, command=command, preset="tiny-synthetic")
    assert str(caught.value) == message
