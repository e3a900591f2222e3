"""`ds2d2 prepare-data` end to end: the real DOTA devkit sample, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app

runner = CliRunner()


def _sample() -> Path:
    env = os.environ.get("DS2D2_DOTA_SAMPLE")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/dota-devkit-example"
    if not (path / "train" / "images").is_dir():
        pytest.skip(f"real DOTA sample not found at {path} (set DS2D2_DOTA_SAMPLE)")
    return path


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, last; a non-terminal progress line ("split train: 1/2 in 0.1s") may precede it
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def test_real_sample_end_to_end(tmp_path):
    from pycocotools.coco import COCO

    sample = _sample()
    out = tmp_path / "DOTA-1024"
    started = time.perf_counter()
    result = runner.invoke(app, ["prepare-data", "dota", str(sample), "--out", str(out), "--split", "1024",
                                 "--gap", "200", "--json", str(tmp_path / "summary.json")])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    train = summary["splits"]["train"]
    # P0706 (1111 x 1182): left {0, 87} x top {0, 158} = 4 patches; P1888 (712 x 557): 1 padded patch
    assert train["scenes"] == 2 and train["patches"] == 5
    assert train["objects"] == 600  # 536 - 2 header lines + 66 - 2 header lines
    print(f"\nreal sample: {seconds:.2f} s CLI, {summary['seconds']:.2f} s split; {train['patches']} patches, "
          f"{train['objects']} objects, {train['annotations']} patch boxes, {train['dropped_iof']} dropped (iof)")

    data = json.loads((out / "train.json").read_text())
    windows = sorted((img["scene"], tuple(img["window"])) for img in data["images"])
    assert windows == [("P0706", (0, 0)), ("P0706", (0, 158)), ("P0706", (87, 0)), ("P0706", (87, 158)),
                       ("P1888", (0, 0))]
    assert len(data["annotations"]) == train["annotations"] > 0
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    assert set(sizes.values()) == {(1024, 1024)}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 1024 and y + h <= 1024, ann
        seg = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert seg.min() >= 0 and seg.max() <= 1024
    for img in data["images"]:
        with Image.open(out / img["file_name"]) as patch:
            assert patch.size == (1024, 1024)
    small = next(img for img in data["images"] if img["scene"] == "P1888")
    with Image.open(out / small["file_name"]) as patch:
        arr = np.asarray(patch)
    assert arr[557:].max() == 0 and arr[:, 712:].max() == 0  # zero padding
    with Image.open(sample / "train/images/P1888.png") as scene:
        assert np.array_equal(arr[:557, :712], np.asarray(scene.convert("RGB")))
    coco = COCO(str(out / "train.json"))
    assert len(coco.getImgIds()) == 5

    scenes = json.loads((out / "train_scenes.json").read_text())
    assert [(i["id"], i["width"], i["height"]) for i in scenes["images"]] == [(1, 1111, 1182), (2, 712, 557)]
    assert scenes["images"][1]["gsd"] == pytest.approx(0.266170468393)
    assert scenes["images"][0]["imagesource"] == "GoogleEarth"
    assert (out / scenes["images"][0]["file_name"]).resolve() == (sample / "train/images/P0706.png").resolve()
    assert len(scenes["annotations"]) == 600
    assert {a["difficult"] for a in scenes["annotations"]} == {0, 1}
    COCO(str(out / "train_scenes.json"))


def test_real_sample_workers_and_scales(tmp_path):
    sample = _sample()
    result = runner.invoke(app, ["prepare-data", "dota", str(sample / "train"), "--out", str(tmp_path / "o"),
                                 "--scales", "1.0,0.5", "--workers", "2", "--partial", "crowd", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "train.json").read_text())
    assert sorted({img["scale"] for img in data["images"]}) == [0.5, 1.0]
    assert len(data["images"]) == 7  # 5 at scale 1; P0706 at 0.5 is 556 x 591 and P1888 356 x 278: 1 each
    assert any(a["iscrowd"] for a in data["annotations"])


def test_help_shows_defaults():
    result = runner.invoke(app, ["prepare-data", "dota", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "data/DOTA" in result.output and "DOTA-1024" in result.output and "padded" in result.output
    result = runner.invoke(app, ["prepare-data", "dior", "--help"], env={"COLUMNS": "200"})
    assert "data/DIOR" in result.output and "data/DIOR-coco" in result.output


def test_default_out_is_next_to_source(tmp_path, monkeypatch):
    sample = _sample()
    src = tmp_path / "data" / "DOTA"
    (src / "train").mkdir(parents=True)
    (src / "train" / "images").symlink_to(sample / "train" / "images")
    (src / "train" / "labelTxt").symlink_to(sample / "train" / "labelTxt")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["prepare-data", "dota", "--split", "800", "--gap", "100"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "DOTA-800" / "train.json").is_file()


def _bad_sample(tmp_path: Path, label: str) -> Path:
    src = tmp_path / "bad" / "train"
    (src / "images").mkdir(parents=True)
    (src / "labelTxt").mkdir()
    Image.new("RGB", (64, 64)).save(src / "images" / "P9.png")
    (src / "labelTxt" / "P9.txt").write_text(f"imagesource:x\ngsd:1\n{label}\n", encoding="utf-8")
    return src


def test_bad_label_exit_2_one_line_no_json(tmp_path):
    src = _bad_sample(tmp_path, "1 2 3 4 5 6 7 8 9 ship 0")
    out = tmp_path / "out"
    line = _one_line_error(runner.invoke(app, ["prepare-data", "dota", str(src), "--out", str(out)]))
    assert "P9.txt:3:" in line and "got 11 fields" in line
    assert not list(out.glob("*.json")) if out.exists() else True
    src = _bad_sample(tmp_path / "b2", "1 2 3 4 5 6 7 8 spaceship 0")
    line = _one_line_error(runner.invoke(app, ["prepare-data", "dota", str(src), "--out", str(out)]))
    assert "P9.txt:3:" in line and "spaceship" in line


def test_failing_run_leaves_no_json(tmp_path):
    src = _bad_sample(tmp_path, "1 1 9 1 9 9 1 9 ship 0")
    out = tmp_path / "out"
    assert runner.invoke(app, ["prepare-data", "dota", str(src), "--out", str(out), "--split", "32",
                               "--gap", "8"]).exit_code == 0
    assert (out / "train.json").is_file()
    (src / "images" / "P9.png").write_bytes(b"\x89PNG broken")
    line = _one_line_error(runner.invoke(app, ["prepare-data", "dota", str(src), "--out", str(out), "--split", "32",
                                               "--gap", "8"]))
    assert "P9.png" in line
    assert list(out.glob("*.json")) == [] and list(out.glob(".*.tmp")) == []


@pytest.mark.parametrize("args, needle", [
    (["dota", "/no/such/dota"], "DOTA source folder not found"),
    (["dota", "--scales", "1.0", "0.5"], "--scales 1.0,0.5"),
    (["dota", "SAMPLE", "--scales", "big"], "--scales takes numbers"),
    (["dota", "SAMPLE", "--split", "256", "--gap", "300"], "--gap"),
    (["dota", "SAMPLE", "--partial", "keep"], "--partial"),
    (["dota", "SAMPLE", "--classes", "dota-v9"], "unknown class set"),
    (["dior", "/no/such/dior"], "DIOR folder not found"),
    (["coco", "/no/such.json", "--images", "/", "--out", "OUT"], "annotation file not found"),
])
def test_bad_inputs_exit_2(tmp_path, args, needle):
    args = ["prepare-data"] + [str(_sample()) if a == "SAMPLE" else str(tmp_path / "o") if a == "OUT" else a
                               for a in args]
    if args[1] == "dota":
        args += ["--out", str(tmp_path / "o")]
    line = _one_line_error(runner.invoke(app, args))
    assert needle in line
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.json"))


def test_dior_and_coco_commands(tmp_path):
    from test_coco_ingest import make_coco
    from test_dior import make_dior

    root = make_dior(tmp_path / "DIOR")
    out = tmp_path / "DIOR-coco"
    result = runner.invoke(app, ["prepare-data", "dior", str(root), "--out", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.json")) == ["test.json", "train.json", "trainval.json", "val.json"]
    ann, images, _ = make_coco(tmp_path)
    result = runner.invoke(app, ["prepare-data", "coco", str(ann), "--images", str(images), "--out",
                                 str(tmp_path / "c"), "--name", "val", "--classes", "dior"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "val.json").is_file()
    # an image size mismatch in DIOR: exit 2, one line naming the XML
    Image.new("RGB", (10, 10)).save(root / "JPEGImages-test" / "00003.jpg")
    line = _one_line_error(runner.invoke(app, ["prepare-data", "dior", str(root), "--out", str(tmp_path / "d2")]))
    assert "00003.xml" in line


def test_synthetic_command(tmp_path):
    pytest.importorskip("ds2d2_cli.data.synthetic")
    out = tmp_path / "synthetic"
    result = runner.invoke(app, ["prepare-data", "synthetic", "--out", str(out), "--images", "2", "--size", "128",
                                 "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (out / "train" / "images").is_dir() and (tmp_path / "s.json").is_file()
    result = runner.invoke(app, ["prepare-data", "dota", str(out), "--split", "64", "--gap", "16",
                                 "--classes", "synthetic"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "synthetic-64" / "train.json").read_text())
    assert [c["name"] for c in data["categories"]][:2] == ["small-vehicle", "large-vehicle"]


@pytest.mark.parametrize("command, default", [
    (["demo"], "[default: runs/demo, with --quick runs/demo-quick]"),
    (["demo"], "[default: the machine's, shared out among --jobs]"),
    (["distill"], "[default: preset, i.e. ds2d2]"),
    (["eval"], "[default: the config's eval split]"),
    (["compare"], "[default: folder names]"),
])
def test_bracketed_defaults_in_help_are_shown_not_taken_for_markup(command, default):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and default in " ".join(result.output.split())
