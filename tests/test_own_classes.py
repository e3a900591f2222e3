"""`data.classes`: a shipped set, your own list, or `auto` (the training split's categories),
resolved once per stage into the list a run records; a dataset of the user's own two classes
trained and scored end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from ds2d2_cli.classes import DIOR, SYNTHETIC
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import config_differences, config_to_json, load_config
from ds2d2_cli.data.dataset import load_coco_split
from ds2d2_cli.errors import InputError
from ds2d2_cli.stages.common import load_stage_data, resolve_classes, stage_classes, with_data_root

from conftest import TINY

runner = CliRunner()
OWN = ["tree", "car"]  # the custom data's categories, in id order
# synthetic category id -> own id: the vehicles are cars (2), everything else a tree (1)
REMAP = {1: 2, 2: 2, 3: 1, 4: 1, 5: 1}


@pytest.mark.parametrize("value, stored, names", [
    ("dior", "dior", DIOR),
    ("[car,truck]", ["car", "truck"], ("car", "truck")),
    ("car, truck", ["car", "truck"], ("car", "truck")),
    ("[1, 2]", ["1", "2"], ("1", "2")),
    ("auto", "auto", None),
])
def test_data_classes_takes_a_set_a_list_or_auto(value, stored, names):
    data = load_config("tiny-synthetic", [f"data.classes={value}"]).data
    assert data.classes == stored and data.class_names == names


def test_a_yaml_list_in_a_preset_file(tmp_path):
    from ds2d2_cli.config import presets_folder

    path = tmp_path / "mine.yaml"
    path.write_text((presets_folder() / "tiny-synthetic.yaml").read_text().replace(
        "classes: synthetic", "classes: [tree, car]"))
    assert load_config(str(path)).data.classes == ["tree", "car"]


@pytest.mark.parametrize("value, message", [
    ("trees", "data.classes: Value error, unknown class set 'trees'; available: dota-v1.0, dota-v1.5, dota-v2.0, "
              "dior, synthetic; or your own list, e.g. [trees,other]; or auto (the training split's own classes)"),
    ("[car,Car]", "data.classes: Value error, data.classes names a class twice: Car, car"),
    ("[car,'']", "data.classes: Value error, data.classes has an empty class name (got ['car', ''])"),
    ("{a: 1}", "data.classes: Value error, expected a class set name, a list of class names or auto (got {'a': 1})"),
])
def test_bad_data_classes_are_one_clear_line(value, message):
    with pytest.raises(InputError) as caught:
        load_config("tiny-synthetic", [f"data.classes={value}"])
    assert str(caught.value) == f"tiny-synthetic: invalid config: {message}"


def test_a_set_or_list_must_be_the_split_classes_in_order(tiny_data):
    train = load_coco_split(tiny_data / "train.json")
    auto = load_config("tiny-synthetic", ["data.classes=auto"])
    assert stage_classes(auto, train) == list(SYNTHETIC)
    listed = load_config("tiny-synthetic", [f"data.classes=[{','.join(SYNTHETIC)}]"])
    assert stage_classes(listed, train) == list(SYNTHETIC)
    fix = "; to train on the data's own classes use --set data.classes=auto"
    with pytest.raises(InputError) as caught:
        stage_classes(load_config("tiny-synthetic", ["data.classes=[ship,plane]"]), train)
    assert str(caught.value) == (f"{tiny_data / 'train.json'}: the split's classes ({', '.join(SYNTHETIC)}) "
                                 f"are not data.classes [ship, plane]{fix}")
    with pytest.raises(InputError) as caught:
        stage_classes(load_config("tiny-synthetic", ["data.classes=dior"]), train)
    assert str(caught.value) == (f"{tiny_data / 'train.json'}: the split's classes ({', '.join(SYNTHETIC)}) "
                                 f"are not data.classes dior ({', '.join(DIOR)}){fix}")
    reordered = [*SYNTHETIC[1:], SYNTHETIC[0]]
    with pytest.raises(InputError, match="are not data.classes"):
        stage_classes(load_config("tiny-synthetic", [f"data.classes=[{','.join(reordered)}]"]), train)


def test_auto_refuses_categories_a_class_list_could_not_hold(tmp_path):
    from ds2d2_cli.data.dataset import CocoSplit

    split = CocoSplit(tmp_path / "train.json", [], {}, [{"id": 1, "name": "Car"}, {"id": 2, "name": "car"}], {})
    with pytest.raises(InputError) as caught:
        stage_classes(load_config("tiny-synthetic", ["data.classes=auto"]), split)
    assert str(caught.value) == f"{tmp_path / 'train.json'}: the split names a class twice: Car, car"


def test_a_stage_resolves_auto_into_the_list_it_records(tiny_data):
    config = load_config("tiny-synthetic", ["data.classes=auto"])
    data = load_stage_data(config, tiny_data)
    assert data.classes == list(SYNTHETIC)
    assert data.config.data.classes == list(SYNTHETIC) and data.config.data.root == tiny_data.resolve()
    # resolution without the checks (run reuse): auto reads the split, a set is spelt out
    assert resolve_classes(with_data_root(config, tiny_data)).data.classes == list(SYNTHETIC)
    assert resolve_classes(load_config("tiny-synthetic")).data.classes == list(SYNTHETIC)


def test_a_run_that_recorded_the_list_matches_its_set(tmp_path):
    """Runs written before (or with) a set name compare with the list a stage now records."""
    named = load_config("tiny-synthetic")
    path = tmp_path / "config.json"
    path.write_text(config_to_json(named))
    listed = named.with_classes(SYNTHETIC)
    assert config_differences(path, config_to_json(listed)) == []
    assert listed.stage_inputs("teacher") == named.stage_inputs("teacher")
    other = named.with_classes(["ship", "plane"])
    assert config_differences(path, config_to_json(other)) == [  # long values are cut at 40 characters
        'data.classes ["small-vehicle", "large-vehicle", "p... -> ["ship", "plane"]']


# ----------------------------------------------------------------------------- end to end


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _train(data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(data), "--out", str(out),
                               "--max-iters", "1", "--device", "cpu", *_sets([*TINY, *extra])])


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def own_data(tiny_data, module_tmp) -> Path:
    """The tiny data relabelled as the user's own two classes, `tree` and `car`."""
    root = module_tmp("own") / "trees"
    shutil.copytree(tiny_data, root)
    for split in ("train", "val"):
        path = root / f"{split}.json"
        coco = json.loads(path.read_text())
        coco["categories"] = [{"id": i, "name": name} for i, name in enumerate(OWN, 1)]
        for annotation in coco["annotations"]:
            annotation["category_id"] = REMAP[annotation["category_id"]]
        path.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def own_teacher(own_data, module_tmp) -> Path:
    out = module_tmp("own-runs") / "teacher"
    result = _train(own_data, out, "data.classes=auto")
    assert result.exit_code == 0, result.output
    return out


def test_own_classes_train_with_auto(own_teacher, own_data):
    with safe_open(str(own_teacher / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["classes"]) == OWN
    assert json.loads(meta["config"])["data"]["classes"] == OWN
    recorded = json.loads((own_teacher / "config.json").read_text())
    assert recorded["data"]["classes"] == OWN and recorded["data"]["root"] == str(own_data.resolve())
    with open(own_data / "train.json") as fh:
        assert sum(a["category_id"] == 2 for a in json.load(fh)["annotations"]) > 0  # cars as well as trees


def test_own_classes_checkpoint_evaluates(own_teacher):
    result = runner.invoke(app, ["eval", str(own_teacher / "model.safetensors"), "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert list(metrics["per_class"]) == OWN and metrics["split"] == "val" and metrics["images"] == 2


def test_auto_run_is_reused_and_resumed_as_the_same_run(own_teacher, own_data, tmp_path):
    """A re-invocation with `auto` resolves before comparing with the recorded list."""
    from ds2d2_cli.cli.stages import resolve_config
    from ds2d2_cli.engine import RESUME_FILE, prepare_run_dir
    from ds2d2_cli.stages.runner import prior_run

    config = with_data_root(resolve_config("tiny-synthetic", [*TINY, "data.classes=auto"], stage="teacher",
                                           command="train-teacher", max_iters=1), own_data)
    reordered = 'data.classes ["tree", "car"] -> ["car", "tree"]'
    assert prior_run("teacher", own_teacher, config).differences == []
    assert prior_run("teacher", own_teacher, config.with_classes(["car", "tree"])).differences == [reordered]
    unfinished = tmp_path / "unfinished"  # compared on the whole config, as --resume is
    (unfinished / RESUME_FILE).parent.mkdir(parents=True)
    (unfinished / RESUME_FILE).write_bytes(b"")
    shutil.copy(own_teacher / "config.json", unfinished / "config.json")
    assert prior_run("teacher", unfinished, config).differences == []
    assert prior_run("teacher", unfinished, config.with_classes(["car", "tree"])).differences == [reordered]
    # --resume compares the config the stage resolved
    prepare_run_dir(unfinished, config_to_json(load_stage_data(config).config), resume=True)
    with pytest.raises(InputError, match=r"--resume: the resolved config differs from the run's config.json "
                                         r"\(data.classes \["):
        prepare_run_dir(unfinished, config_to_json(config.with_classes(["car", "tree"])), resume=True)


def test_own_data_under_a_set_names_the_fix(own_data, tmp_path):
    out = tmp_path / "refused"
    line = _error_line(_train(own_data, out))
    assert line == (f"error: {own_data / 'train.json'}: the split's classes (tree, car) are not data.classes "
                    f"synthetic ({', '.join(SYNTHETIC)}); to train on the data's own classes use "
                    "--set data.classes=auto")
    assert not out.exists()


def test_own_list_in_another_order_is_refused(own_data, tmp_path):
    line = _error_line(_train(own_data, tmp_path / "refused", "data.classes=[car,tree]"))
    assert line.endswith("the split's classes (tree, car) are not data.classes [car, tree]; to train on the "
                         "data's own classes use --set data.classes=auto")
