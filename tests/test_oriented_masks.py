"""DISW and FGD masks from rotated boxes (`distill/cells.py`): hand-checked cells and weights,
theta = 0 equal bit for bit to the horizontal maps, a polygon reference, and the distill stage
handing an oriented student's rotated boxes to both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli.distill.cells import axis_aligned
from ds2d2_cli.distill.disw import disw_weights, disw_weights_levels
from ds2d2_cli.distill.fgd import fgd_masks
from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.rotated import rbox_envelope, rbox_to_poly

from conftest import TINY

R2 = math.sqrt(2)

# A diamond |x - 4| + |y - 4| <= 2 (a 2 sqrt 2 square at 45 degrees; le90 keeps squares in
# [-pi/4, pi/4)) on 1-pixel cells. Cell (i, j) is covered when the diamond meets the open
# square (i +- 1, j +- 1): on x and y that is the envelope rule floor(2) <= i <= ceil(6), on the
# diamond's axes |di - dj| < 4 and |di + dj| < 4 (di = i - 4, dj = j - 4). The envelope's 5 x 5
# cells lose their four corners: 21 cells, 1/21 each.
DIAMOND = [4.0, 4.0, 2 * R2, 2 * R2, -math.pi / 4]
DIAMOND_CELLS = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], dtype=torch.bool)

# A thin box along the diagonal on 2-pixel cells: centre (8, 8), w = 7 sqrt 2, h = 1.5 sqrt 2,
# theta = pi/4, input 16 x 16, map 8 x 8. Grid points (2i, 2j), di = i - 4, dj = j - 4:
#   envelope: half extent 3.5 + 0.75 -> [3.75, 12.25] -> i, j in floor(1.875)..ceil(6.125) = 1..7
#   u = (1, 1)/sqrt 2: |2 di + 2 dj| / sqrt 2 < 3.5 sqrt 2 + 2 (cos + sin) -> |di + dj| < 5.5
#   v = (-1, 1)/sqrt 2: |2 dj - 2 di| / sqrt 2 < 0.75 sqrt 2 + 2 (sin + cos) -> |dj - di| < 2.75
# row dj keeps di in [dj - 2, dj + 2] with |di + dj| <= 5: 2, 4, 5, 5, 5, 4, 2 cells, 27 of the
# envelope's 49.
STICK = [8.0, 8.0, 7 * R2, 1.5 * R2, math.pi / 4]
STICK_CELLS = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 0],
], dtype=torch.bool)


def _rboxes(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def _random_scene(n: int, seed: int, size: float = 200.0, tilted: bool = True):
    """(xyxy, rboxes) of random boxes, some over the borders; theta 0 unless `tilted`."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=gen) * size * 1.1 - size * 0.05
    sides = torch.rand(n, 2, generator=gen) * size / 3 + 0.5
    sides = torch.sort(sides, dim=1, descending=True).values  # le90: w >= h
    theta = (torch.rand(n, 1, generator=gen) - 0.5) * math.pi if tilted else torch.zeros(n, 1)
    rboxes = torch.cat([centre, sides, theta], dim=1)
    return rbox_envelope(rboxes), rboxes


def _covered(rbox, cell_w: float, cell_h: float, cols, rows) -> torch.Tensor:
    """Reference: cell (i, j) is covered when the box's polygon overlaps the square of side 2
    cells centred on (i cell_w, j cell_h) with positive area (shapely)."""
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Polygon, box

    polygon = Polygon(rbox_to_poly(torch.tensor(rbox, dtype=torch.float64)).tolist())
    out = torch.zeros(len(rows), len(cols), dtype=torch.bool)
    for r, j in enumerate(rows):
        for c, i in enumerate(cols):
            square = box((i - 1) * cell_w, (j - 1) * cell_h, (i + 1) * cell_w, (j + 1) * cell_h)
            out[r, c] = polygon.intersection(square).area > 1e-9
    assert shapely
    return out


# ----------------------------------------------------------------------------- DISW


def test_disw_diamond_and_stick_by_hand():
    weights = disw_weights([_rboxes([DIAMOND])], (8, 8), (8, 8))
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0][DIAMOND_CELLS] += 1 / 21
    assert torch.equal(weights, expected)
    weights = disw_weights([_rboxes([STICK])], (16, 16), (8, 8))
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0][STICK_CELLS] += 1 / 27
    assert torch.equal(weights, expected)
    # its envelope as an xyxy box would cover all 7 x 7 cells at 1/49
    envelope = disw_weights([rbox_envelope(_rboxes([STICK]))], (16, 16), (8, 8))
    assert (envelope > 1).sum() == 49 and (weights > 1).sum() == 27


def test_disw_overlap_clipping_and_empty_images():
    # the diamond twice plus the stick on one image: overlaps add up; another image is empty
    weights = disw_weights_levels([_rboxes([DIAMOND, DIAMOND]), _rboxes([])], (8, 8), [(8, 8), (4, 4)])
    first = torch.ones(8, 8)
    first[DIAMOND_CELLS] += 2 / 21
    assert torch.allclose(weights[0][0, 0], first, rtol=0, atol=1e-7) and torch.equal(weights[0][1], torch.ones(1, 8, 8))
    # on 2-pixel cells (the second level): checked against the polygon reference
    coarse = _covered(DIAMOND, 2.0, 2.0, range(4), range(4))
    assert torch.equal(weights[1][0, 0] > 1, coarse)
    assert torch.allclose(weights[1][0, 0][coarse], torch.full((int(coarse.sum()),), 1 + 2 / coarse.sum().item()))
    # a box half off the map counts only its cells on the map (as for rectangles)
    edge = disw_weights([_rboxes([[0.0, 4.0, 2 * R2, 2 * R2, -math.pi / 4]])], (8, 8), (8, 8))
    on_map = _covered([0.0, 4.0, 2 * R2, 2 * R2, -math.pi / 4], 1.0, 1.0, range(8), range(8))
    assert torch.equal(edge[0, 0] > 1, on_map)
    assert torch.allclose(edge[0, 0][on_map], torch.full((int(on_map.sum()),), 1 + 1 / on_map.sum().item()))


@pytest.mark.parametrize("seed", [0, 1])
def test_disw_theta_zero_is_the_horizontal_map_bit_for_bit(seed):
    xyxy, rboxes = _random_scene(60, seed, tilted=False)
    split = [xyxy[:35], xyxy[35:35], xyxy[35:]], [rboxes[:35], rboxes[35:35], rboxes[35:]]
    bands = [(25, 24), (13, 12), (7, 6), (4, 3)]
    for horizontal, rotated in zip(disw_weights_levels(split[0], (200, 190), bands),
                                   disw_weights_levels(split[1], (200, 190), bands)):
        assert torch.equal(horizontal, rotated)
    # so is a vertical box (theta = -pi/2, 4.4e-8 rad off in float32): its envelope's cells
    vertical = rboxes.clone()
    vertical[:, 2:4] = rboxes[:, [3, 2]]
    vertical[:, 4] = -math.pi / 2
    assert bool(axis_aligned(vertical[:, 4]).all())
    for horizontal, rotated in zip(disw_weights_levels([rbox_envelope(vertical)], (200, 190), bands),
                                   disw_weights_levels([vertical], (200, 190), bands)):
        assert torch.equal(horizontal, rotated)


def test_disw_tilted_boxes_match_the_polygon_reference():
    _, rboxes = _random_scene(12, 5, size=64.0)
    in_hw, band = (64, 60), (9, 8)
    cell_w, cell_h = in_hw[1] / band[1], in_hw[0] / band[0]
    expected = torch.ones(band, dtype=torch.float64)
    for rbox in rboxes.double().tolist():
        covered = _covered(rbox, cell_w, cell_h, range(band[1]), range(band[0]))
        if covered.any():
            expected[covered] += 1 / covered.sum().item()
    weights = disw_weights([rboxes], in_hw, band)
    assert torch.allclose(weights[0, 0].double(), expected, rtol=0, atol=1e-6)


def test_disw_rejects_mixed_box_widths():
    with pytest.raises(Ds2d2Error, match="\\[K, 5\\]"):
        disw_weights([_rboxes([DIAMOND]), torch.zeros(1, 4)], (8, 8), (8, 8))


# ----------------------------------------------------------------------------- FGD


def test_fgd_masks_of_rotated_boxes_by_hand():
    # FGD scales by the image's own size: a 16 px image on an 8 x 8 map has 2 px cells, so the
    # diamond doubled is the diamond above: 21 cells at 1/21 (the larger value where boxes overlap)
    double = [8.0, 8.0, 4 * R2, 4 * R2, -math.pi / 4]
    fg, bg = fgd_masks([_rboxes([double])], [(16, 16)], (8, 8))
    expected = torch.zeros(8, 8)
    expected[DIAMOND_CELLS] = 1 / 21
    assert torch.equal(fg[0], expected)
    assert torch.allclose(bg[0], (~DIAMOND_CELLS).float() / 43)
    fg, _ = fgd_masks([_rboxes([STICK, double])], [(16, 16)], (8, 8))
    assert torch.equal(fg[0] > 0, STICK_CELLS | DIAMOND_CELLS)
    assert fg[0, 4, 4].item() == pytest.approx(1 / 21) and fg[0, 2, 1].item() == pytest.approx(1 / 27)


def test_fgd_counts_covered_cells_beyond_the_map_as_fgd_does():
    # FGD's 1 / ((y2 + 1 - y1)(x2 + 1 - x1)) counts cells of its range beyond the map (ceil
    # reaches w at the right border); the rotated count does too: the reference on a larger lattice.
    rbox = [14.0, 7.0, 10.0, 3.0, 0.5]
    fg, _ = fgd_masks([_rboxes([rbox])], [(16, 16)], (8, 8))
    lattice = _covered(rbox, 2.0, 2.0, range(-2, 12), range(-2, 12))
    on_map = lattice[2:10, 2:10]
    assert lattice.sum() > on_map.sum()
    assert torch.equal(fg[0] > 0, on_map)
    assert fg[0][on_map].unique().tolist() == [pytest.approx(1 / lattice.sum().item())]


@pytest.mark.parametrize("seed", [0, 1])
def test_fgd_theta_zero_is_the_horizontal_mask_bit_for_bit(seed):
    xyxy, rboxes = _random_scene(50, seed, tilted=False)
    sizes = [(200, 190), (180, 200), (150, 150)]
    for feature in [(25, 24), (13, 12), (7, 6)]:
        horizontal = fgd_masks([xyxy[:30], xyxy[30:30], xyxy[30:]], sizes, feature)
        rotated = fgd_masks([rboxes[:30], rboxes[30:30], rboxes[30:]], sizes, feature)
        assert all(torch.equal(a, b) for a, b in zip(horizontal, rotated))


def test_fgd_tilted_boxes_match_the_polygon_reference():
    _, rboxes = _random_scene(8, 3, size=64.0)
    fg, bg = fgd_masks([rboxes], [(64, 60)], (9, 8))
    cell_w, cell_h = 60 / 8, 64 / 9
    expected = torch.zeros(9, 8, dtype=torch.float64)
    for rbox in rboxes.double().tolist():
        lattice = _covered(rbox, cell_w, cell_h, range(-4, 12), range(-4, 13))
        weight = 1 / lattice.sum().item()
        on_map = lattice[4:13, 4:12]
        expected[on_map] = torch.clamp(expected[on_map], min=weight)
    assert torch.allclose(fg[0].double(), expected, rtol=0, atol=1e-7)
    assert bg[0].sum().item() == pytest.approx(1.0) and torch.equal(bg[0] > 0, fg[0] == 0)


# ----------------------------------------------------------------------------- the distill stage


@pytest.mark.slow
def test_an_oriented_student_hands_its_rotated_boxes_to_disw_and_fgd(monkeypatch):
    from ds2d2_cli.config import load_config
    from ds2d2_cli.distill import explicit, fgd
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.distill import DistillTask

    seen: dict[str, list] = {"disw": [], "fgd": []}
    disw, masks = explicit.disw_weights_levels, fgd.fgd_masks

    def spy_disw(boxes, *args, **kwargs):
        seen["disw"].append([b.clone() for b in boxes])
        return disw(boxes, *args, **kwargs)

    def spy_fgd(boxes, *args, **kwargs):
        seen["fgd"].append([b.clone() for b in boxes])
        return masks(boxes, *args, **kwargs)

    monkeypatch.setattr(explicit, "disw_weights_levels", spy_disw)
    monkeypatch.setattr(fgd, "fgd_masks", spy_fgd)
    rboxes = [torch.tensor([[30.0, 40, 40, 10, 0.6], [90, 90, 20, 8, -0.3]]), torch.tensor([[60.0, 64, 50, 30, 0.0]])]
    for preset, method, oriented in (("tiny-synthetic-obb", "ds2d2", True), ("tiny-synthetic-obb", "fgd", True),
                                     ("tiny-synthetic", "ds2d2", False), ("tiny-synthetic", "fgd", False)):
        config = load_config(preset, [*TINY, f"distill.method={method}"])
        torch.manual_seed(0)
        task = DistillTask(build_detector(config.student, 2, config.input),
                           build_detector(config.teacher, 2, config.input), config)
        task.train_mode()
        targets = [{"rboxes": r, "boxes": rbox_envelope(r), "labels": torch.ones(len(r), dtype=torch.int64)}
                   for r in rboxes]
        if not oriented:
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        terms = task.losses([torch.rand(3, 128, 128) for _ in range(2)], targets)
        assert all(torch.isfinite(v) for v in terms.values())
        given = seen["disw" if method == "ds2d2" else "fgd"].pop()
        assert [tuple(b.shape) for b in given] == ([(2, 5), (1, 5)] if oriented else [(2, 4), (1, 4)])
        if oriented:  # the 128 px input is not resized: the boxes arrive as given
            assert all(torch.allclose(a, b) for a, b in zip(given, rboxes))


@pytest.mark.slow
def test_ds2d2_and_fgd_distill_an_oriented_student_end_to_end(tmp_path: Path):
    from ds2d2_cli.cli.app import app
    from ds2d2_cli.data.dota import prepare_dota
    from ds2d2_cli.data.synthetic import generate_synthetic

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return result

    generate_synthetic(tmp_path / "scenes", images=3, size=128, seed=3, val_fraction=0.34)  # 2 train, 1 val
    prepare_dota(tmp_path / "scenes", tmp_path / "data", size=128, gap=32, classes="synthetic", boxes="obb")
    quick = ["train.max_iters=2", "train.eval_every=100", "train.checkpoint_every=100"]  # scored once, at the end
    sets = [arg for item in [*TINY, *quick] for arg in ("--set", item)]
    common = ["--preset", "tiny-synthetic-obb", "--data", str(tmp_path / "data"), *sets]
    teacher = tmp_path / "teacher/model.safetensors"
    run("train-teacher", *common, "--out", str(teacher.parent))
    run("train-amplifier", *common, "--teacher", str(teacher), "--out", str(tmp_path / "amp"))
    for method, terms in (("ds2d2", ("explicit_low", "explicit_high", "implicit_full_box")),
                          ("fgd", ("fgd_fg", "fgd_bg", "fgd_attention", "fgd_global"))):
        out = tmp_path / method
        run("distill", *common, "--teacher", str(teacher), "--amplifier", str(tmp_path / "amp/model.safetensors"),
            "--method", method, "--out", str(out))
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert steps and all(math.isfinite(steps[-1][name]) and steps[-1][name] >= 0 for name in terms)
        assert steps[-1]["explicit_low" if method == "ds2d2" else "fgd_fg"] > 0
