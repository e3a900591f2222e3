"""`base:` in a preset: inherit a shipped preset or another file, override only what differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds2d2_cli.config import available_presets, deep_merge, load_config
from ds2d2_cli.errors import InputError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2], "g": {"h": 4}}
    over = {"a": {"c": {"d": 5}}, "f": [9], "g": None, "i": 6}
    assert deep_merge(base, over) == {"a": {"b": 1, "c": {"d": 5, "e": 3}}, "f": [9], "g": None, "i": 6}
    assert base == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2], "g": {"h": 4}}  # untouched


def test_three_lines_on_a_shipped_preset(tmp_path):
    path = _write(tmp_path / "my-trees.yaml", "base: retina-dior\nname: my-trees\n"
                                              "data: {classes: auto, root: data/trees}\n")
    config, base = load_config(str(path)), load_config("retina-dior")
    assert (config.name, config.data.classes, str(config.data.root)) == ("my-trees", "auto", "data/trees")
    assert (config.data.train_split, config.data.eval_split) == ("trainval", "test")  # merged, not replaced
    assert config.model_dump(exclude={"name", "description", "data"}) == base.model_dump(
        exclude={"name", "description", "data"})
    assert config.description == f"based on retina-dior: {base.description}"


def test_overrides_replace_lists_and_null_and_set_comes_last(tmp_path):
    path = _write(tmp_path / "mine.yaml", "base: tiny-synthetic\nteacher_train: null\n"
                                          "train: {lr: 0.5, augment: [hflip]}\n")
    config = load_config(str(path), ["train.batch_size=3"])
    assert config.name == "mine"  # the file's own name, not its base's
    assert config.teacher_train is None and config.amplifier_train.max_iters == 150
    assert (config.train.lr, config.train.augment, config.train.batch_size, config.train.max_iters) == (
        0.5, ("hflip",), 3, 450)


def test_a_chain_resolves_relative_bases_from_each_file(tmp_path):
    _write(tmp_path / "shared" / "common.yaml", "base: tiny-synthetic\ndescription: ours\ninput: {size: 96}\n")
    _write(tmp_path / "shared" / "small.yaml", "base: common.yaml\nstudent: {fpn_channels: 16}\n")
    path = _write(tmp_path / "runs" / "leaf.yaml", "base: ../shared/small.yaml\ntrain: {lr: 0.25}\n")
    config = load_config(str(path))
    shared = tmp_path / "shared"
    assert (config.name, config.description) == ("leaf", f"based on {shared / 'small.yaml'}: based on "
                                                 f"{shared / 'common.yaml'}: ours")
    assert (config.input.size, config.student.fpn_channels, config.train.lr, config.teacher.fpn_channels) == (
        96, 16, 0.25, 64)


def test_a_cycle_is_refused_naming_the_files(tmp_path):
    first = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(InputError) as caught:
        load_config(str(first))
    assert str(caught.value) == f"preset bases form a cycle: {first} -> {tmp_path / 'b.yaml'} -> {first}"
    itself = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(InputError) as caught:
        load_config(str(itself))
    assert str(caught.value) == f"preset bases form a cycle: {itself} -> {itself}"


def test_an_unknown_or_missing_base_is_refused(tmp_path):
    path = _write(tmp_path / "mine.yaml", "base: retina-diorr\n")
    with pytest.raises(InputError) as caught:
        load_config(str(path))
    assert str(caught.value) == (f"{path}: base: unknown preset 'retina-diorr'; available: "
                                 f"{', '.join(available_presets())} (or a path to a .yaml file)")
    _write(path, "base: missing.yaml\n")
    with pytest.raises(InputError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{tmp_path / 'missing.yaml'}: preset file not found"
    _write(path, "base: [retina-dior]\n")
    with pytest.raises(InputError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: base: expected a preset name or a path to a .yaml file (got ['retina-dior'])"
