"""Synthetic DOTA-layout scenes: layout, label format, determinism, class coverage, bad args."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.data.synthetic import generate_synthetic
from ds2d2_cli.errors import InputError
from ds2d2_cli.progress import NullReporter


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _parse(path: Path) -> tuple[list[str], list[tuple[np.ndarray, str, int]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    objects = []
    for line in lines[2:]:
        parts = line.split()
        assert len(parts) == 10, line
        coords = np.array([float(v) for v in parts[:8]]).reshape(4, 2)
        objects.append((coords, parts[8], int(parts[9])))
    return lines[:2], objects


class _CountingReporter(NullReporter):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[tuple[str, int | None]] = []
        self.updates = 0
        self.closed = 0

    def task(self, description, total, completed=0):
        self.tasks.append((description, total))
        outer = self

        class _T:
            def update(self, advance=1, **fields):
                outer.updates += advance

            def close(self):
                outer.closed += 1

        return _T()


@pytest.fixture(scope="module")
def small(module_tmp) -> tuple[Path, dict, _CountingReporter]:
    out = module_tmp("syn") / "data"
    rep = _CountingReporter()
    summary = generate_synthetic(out, images=3, size=256, seed=7, reporter=rep)
    return out, summary, rep


def test_layout_and_summary(small):
    out, summary, rep = small
    train = sorted((out / "train" / "images").glob("*.png"))
    val = sorted((out / "val" / "images").glob("*.png"))
    assert len(train) == 2 and len(val) == 1  # round(3 * 0.25) = 1
    for split, pngs in (("train", train), ("val", val)):
        labels = sorted((out / split / "labelTxt").glob("*.txt"))
        assert [p.stem for p in labels] == [p.stem for p in pngs]
        assert summary[split]["images"] == len(pngs)
        assert set(summary[split]["objects"]) == set(SYNTHETIC)
        counted = sum(len(_parse(p)[1]) for p in labels)
        assert sum(summary[split]["objects"].values()) == counted
    assert summary["seconds"] >= 0
    assert rep.tasks == [(rep.tasks[0][0], 3)] and rep.updates == 3 and rep.closed == 1
    # no temporary files left behind
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_images_and_labels_format(small):
    out, _, _ = small
    for png in out.rglob("*.png"):
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.size == (256, 256)
            assert not im.info.get("dpi") and "exif" not in im.info
        txt = png.parent.parent / "labelTxt" / f"{png.stem}.txt"
        header, objects = _parse(txt)
        assert header[0] == "imagesource:ds2d2-synthetic"
        assert header[1].startswith("gsd:") and float(header[1][4:]) > 0
        for coords, cls, difficult in objects:
            assert cls in SYNTHETIC
            assert difficult in (0, 1)
            assert (coords >= 0).all() and (coords <= 256).all()
            # a real quadrilateral, not a degenerate one
            x, y = coords[:, 0], coords[:, 1]
            area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            assert area > 4


def test_same_seed_same_bytes_different_seed_differs(small, tmp_path):
    out, summary, _ = small
    again = tmp_path / "again"
    summary2 = generate_synthetic(again, images=3, size=256, seed=7)
    assert _hashes(again) == _hashes(out)
    assert {k: v for k, v in summary2.items() if k != "seconds"} == \
        {k: v for k, v in summary.items() if k != "seconds"}
    other = tmp_path / "other"
    generate_synthetic(other, images=3, size=256, seed=8)
    h1, h2 = _hashes(out), _hashes(other)
    assert h1.keys() == h2.keys()
    assert all(h1[k] != h2[k] for k in h1)


def test_every_class_appears_and_objects_are_plausible(tmp_path):
    summary = generate_synthetic(tmp_path / "d", images=6, size=512, seed=0)
    totals = {c: summary["train"]["objects"][c] + summary["val"]["objects"][c] for c in SYNTHETIC}
    assert all(n > 0 for n in totals.values()), totals
    sizes: dict[str, list[float]] = {c: [] for c in SYNTHETIC}
    difficult = n = 0
    for txt in (tmp_path / "d").rglob("*.txt"):
        for coords, cls, diff in _parse(txt)[1]:
            sides = np.linalg.norm(coords - np.roll(coords, 1, 0), axis=1)
            sizes[cls].append(float(sides.max()))
            difficult += diff
            n += 1
    assert n / 6 >= 10  # a busy scene on average
    assert difficult <= 0.2 * n  # difficult is used sparingly
    assert 5 <= min(sizes["small-vehicle"]) and max(sizes["small-vehicle"]) <= 15
    assert max(sizes["plane"]) <= 101 and min(sizes["plane"]) >= 25
    # a storage tank's box is the axis-aligned square around it
    for txt in (tmp_path / "d").rglob("*.txt"):
        for coords, cls, _ in _parse(txt)[1]:
            if cls == "storage-tank":
                w = coords[:, 0].max() - coords[:, 0].min()
                h = coords[:, 1].max() - coords[:, 1].min()
                assert abs(w - h) < 0.3 and len(np.unique(coords[:, 0])) == 2


def test_rerun_replaces_stale_scenes_and_refuses_foreign_data(tmp_path):
    out = tmp_path / "d"
    generate_synthetic(out, images=4, size=64, seed=1)
    generate_synthetic(out, images=2, size=64, seed=1)
    names = sorted(p.name for p in out.rglob("*.png"))
    assert names == ["P0000.png", "P0001.png"]
    foreign = tmp_path / "dota"
    (foreign / "train" / "labelTxt").mkdir(parents=True)
    (foreign / "train" / "labelTxt" / "P0000.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n")
    with pytest.raises(InputError):
        generate_synthetic(foreign, images=2, size=64)
    file_out = tmp_path / "afile"
    file_out.write_text("x")
    with pytest.raises(InputError):
        generate_synthetic(file_out, images=2, size=64)


def test_single_image_goes_to_train(tmp_path):
    summary = generate_synthetic(tmp_path / "one", images=1, size=64, seed=3)
    assert summary["train"]["images"] == 1 and summary["val"]["images"] == 0
    assert (tmp_path / "one" / "val" / "images").is_dir()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"images": 0},
        {"images": -3},
        {"images": 2.5},
        {"images": True},
        {"size": 63},
        {"size": 0},
        {"size": "640"},
        {"seed": -1},
        {"seed": 1.5},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"val_fraction": float("nan")},
    ],
)
def test_bad_arguments_raise_input_error(tmp_path, kwargs):
    args = {"images": 2, "size": 64, "seed": 0, **kwargs}
    with pytest.raises(InputError):
        generate_synthetic(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()
