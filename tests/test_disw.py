"""DISW (method.md, "Explicit stream"): hand-computed maps, clipping, and the vectorised
builder against the per-box reference loop."""

from __future__ import annotations

import pytest
import torch

from ds2d2_cli.distill.disw import _disw_weights_loop, disw_weights, disw_weights_levels
from ds2d2_cli.errors import Ds2d2Error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _boxes(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_one_box_rectangular_input() -> None:
    # input H=8, W=16 -> band 4 x 8 (scale 1/2 both ways)
    # x0=floor(2/2)=1, x1=ceil(7/2)=4; y0=floor(2/2)=1, y1=ceil(3/2)=2 -> 4 x 2 = 8 cells
    w = disw_weights([_boxes([[2, 2, 7, 3]])], (8, 16), (4, 8))
    expected = torch.ones(1, 1, 4, 8)
    expected[0, 0, 1:3, 1:5] += 1 / 8
    assert w.shape == (1, 1, 4, 8) and w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)


def test_single_level_2x2_cells_and_overlap() -> None:
    # input 8x8, band 4x4 (scale 1/2): box [2, 2, 3, 3] -> x0 = y0 = floor(1) = 1,
    # x1 = y1 = ceil(1.5) = 2 -> 2 x 2 cells, +1/4 each.
    w = disw_weights([_boxes([[2, 2, 3, 3]])], (8, 8), (4, 4))
    expected = torch.ones(1, 1, 4, 4)
    expected[0, 0, 1:3, 1:3] = 1.25
    assert w.shape == (1, 1, 4, 4) and w.dtype == torch.float32
    assert torch.equal(w, expected)
    # a second box [4, 2, 5, 3] -> cells x 2..3, y 1..2 (4 cells) overlaps column 2
    w = disw_weights([_boxes([[2, 2, 3, 3], [4, 2, 5, 3]])], (8, 8), (4, 4))
    expected[0, 0, 1:3, 3] = 1.25
    expected[0, 0, 1:3, 2] = 1.5
    assert torch.equal(w, expected)


def test_single_level_empty_and_no_images() -> None:
    w = disw_weights([_boxes([]), _boxes([])], (32, 48), (5, 7))
    assert w.shape == (2, 1, 5, 7) and w.dtype == torch.float32 and torch.equal(w, torch.ones(2, 1, 5, 7))
    assert disw_weights([], (32, 48), (5, 7)).shape == (0, 1, 5, 7)


def test_single_level_dtype_and_device_follow_boxes() -> None:
    w = disw_weights([_boxes([[0, 0, 4, 4]]).double()], (8, 8), (4, 4))
    assert w.dtype == torch.float32 and w.device == torch.device("cpu")
    meta = disw_weights([_boxes([[0, 0, 4, 4]]).to("meta")], (8, 8), (4, 4))
    assert meta.device.type == "meta" and meta.dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1])
def test_single_level_equals_loop_and_levels(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes = [_random_boxes(n, 300, gen) for n in (120, 0, 9)]
    for band in [(38, 25), (19, 19), (3, 2), (1, 1)]:
        single = disw_weights(boxes, (300, 200), band)
        (ref,) = _disw_weights_loop(boxes, (300, 200), [band])
        assert single.shape == (3, 1, *band)
        torch.testing.assert_close(single, ref, rtol=0, atol=1e-6)
    levels = disw_weights_levels(boxes, (300, 200), [(38, 25), (3, 2)])
    assert torch.equal(levels[1], disw_weights(boxes, (300, 200), (3, 2)))


def test_two_levels_three_boxes_by_hand() -> None:
    boxes = [_boxes([[2, 2, 6, 6], [8, 8, 15, 15], [2, 2, 4, 4]]), _boxes([])]
    level8, level4 = disw_weights_levels(boxes, (16, 16), [(8, 8), (4, 4)])
    a, b, c = 1 + 1 / 9 + 1 / 4, 1 + 1 / 9, 1 + 1 / 16
    # 8x8 (scale 1/2): box0 -> cells 1..3 (9 cells), box1 -> 4..ceil(7.5)=8 clipped to 7
    # (16 cells), box2 -> 1..2 (4 cells), overlapping box0.
    expected8 = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, a, a, b, 1, 1, 1, 1],
            [1, a, a, b, 1, 1, 1, 1],
            [1, b, b, b, 1, 1, 1, 1],
            [1, 1, 1, 1, c, c, c, c],
            [1, 1, 1, 1, c, c, c, c],
            [1, 1, 1, 1, c, c, c, c],
            [1, 1, 1, 1, c, c, c, c],
        ]
    )
    # 4x4 (scale 1/4): box0 -> 0..ceil(1.5)=2 (9 cells), box1 -> 2..3 (4 cells),
    # box2 -> 0..1 (4 cells).
    d, e = 1 + 1 / 9 + 1 / 4, 1 + 1 / 4
    expected4 = torch.tensor([[a, a, b, 1], [a, a, b, 1], [b, b, d, e], [1, 1, e, e]])
    torch.testing.assert_close(level8[0, 0], expected8, rtol=0, atol=1e-6)
    torch.testing.assert_close(level4[0, 0], expected4, rtol=0, atol=1e-6)
    # the image without boxes is pure background
    assert torch.equal(level8[1], torch.ones(1, 8, 8)) and torch.equal(level4[1], torch.ones(1, 4, 4))


def test_clipping_and_boxes_outside() -> None:
    boxes = [_boxes([[-10, -10, 1, 1], [20, 20, 30, 30]])]
    w = disw_weights(boxes, (16, 16), (8, 8))
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0, 0:2, 0:2] += 1 / 4  # clipped to cells 0..ceil(0.5)=1 -> 4 cells; second box covers none
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)


def _random_boxes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size * 1.1 - 0.05 * size
    wh = torch.rand(n, 2, generator=gen).pow(3) * size / 4 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[: n // 4] = boxes[: n // 4].div(8).round().mul(8)  # edges exactly on cell borders
    return boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes = [_random_boxes(n, 512, gen) for n in (400, 0, 37)]
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1), (5, 3)]
    fast = disw_weights_levels(boxes, (512, 512), shapes)
    slow = _disw_weights_loop(boxes, (512, 512), shapes)
    for f, s in zip(fast, slow):
        assert f.shape == s.shape
        torch.testing.assert_close(f, s, rtol=0, atol=1e-6)


def test_each_box_adds_unit_mass() -> None:
    gen = torch.Generator().manual_seed(3)
    boxes = [_random_boxes(50, 256, gen).clamp(1, 255)]
    for w in disw_weights_levels(boxes, (256, 256), [(64, 64), (8, 8)], dtype=torch.float64):
        torch.testing.assert_close((w - 1).sum().item(), 50.0)
        assert w.min().item() >= 1.0  # background is exactly 1, never below


def test_bad_arguments() -> None:
    with pytest.raises(Ds2d2Error, match="\\[K, 4\\]"):
        disw_weights([torch.zeros(3)], (8, 8), (4, 4))
    with pytest.raises(Ds2d2Error, match="input_hw"):
        disw_weights([_boxes([])], (0, 8), (4, 4))
    with pytest.raises(Ds2d2Error, match="band shapes"):
        disw_weights([_boxes([])], (8, 8), [(4, 4)])  # one band shape, not a list of them


@CUDA
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(4)
    boxes = [_random_boxes(300, 1024, gen) for _ in range(2)]
    shapes = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    fast = disw_weights_levels([b.cuda() for b in boxes], (1024, 1024), shapes)
    for f, s in zip(fast, _disw_weights_loop(boxes, (1024, 1024), shapes)):
        assert f.is_cuda
        torch.testing.assert_close(f.cpu(), s, rtol=0, atol=1e-6)
