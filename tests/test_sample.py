"""The sample spec: value scaling, statistics and the resolution of input bands, hand-checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds2d2_cli.config import InputConfig
from ds2d2_cli.errors import InputError
from ds2d2_cli.sample import BandStatistics, SampleSpec

RGBN = ("red", "green", "blue", "nir")


def test_rgb_default_is_divide_by_255_bit_for_bit():
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    chw = pixels.transpose(2, 0, 1)
    before = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
    assert torch.equal(SampleSpec().to_float(chw), before)
    assert SampleSpec().is_rgb8


def test_affine_scaling_per_band_and_band_selection():
    spec = SampleSpec(bands=RGBN, dtype="uint16", scaling="percentile",
                      low=(100, 0, 0, 1000), high=(300, 10, 10, 3000))
    pixels = np.zeros((4, 1, 2), np.uint16)
    pixels[0] = [[100, 200]]
    pixels[3] = [[2000, 3000]]
    out = spec.to_float(pixels)
    assert out[0].tolist() == [[0.0, 0.5]]
    assert out[3].tolist() == [[0.5, 1.0]]
    picked = spec.to_float(pixels, bands=("nir", "red"))
    assert picked.shape == (2, 1, 2)
    assert picked[0].tolist() == [[0.5, 1.0]] and picked[1].tolist() == [[0.0, 0.5]]


def test_db_scaling():
    spec = SampleSpec(bands=("vv",), dtype="float32", scaling="db", low=(-30.0,), high=(0.0,))
    pixels = np.array([[[1.0, 0.1, 0.001, 0.0]]], np.float32)  # 0, -10, -30 dB and the -60 dB floor
    out = spec.to_float(pixels)
    assert out[0, 0].tolist() == pytest.approx([1.0, 2 / 3, 0.0, -1.0], abs=1e-6)


def test_statistics_range_and_minmax_hand_checked():
    # band 0: half 0, half 200 -> mean 100, std 100; band 1 constant 50
    image = np.zeros((2, 2, 4), np.uint8)
    image[0, :, 2:] = 200
    image[1] = 50
    stats = BandStatistics(2, "range")
    stats.add(image)
    spec = stats.spec(("a", "b"), "uint8")
    assert spec.low == (0.0, 0.0) and spec.high == (255.0, 255.0)
    assert spec.mean == pytest.approx((100 / 255, 50 / 255), abs=1e-6)
    assert spec.std == pytest.approx((100 / 255, 1e-6), abs=1e-6)
    stats = BandStatistics(2, "minmax")
    stats.add(image)
    spec = stats.spec(("a", "b"), "uint8")
    assert spec.low == (0.0, 50.0) and spec.high == (200.0, 51.0)  # a constant band gets a unit span
    assert spec.mean == pytest.approx((0.5, 0.0)) and spec.std[0] == pytest.approx(0.5)


def test_statistics_over_several_images_and_percentiles():
    stats = BandStatistics(1, "percentile")
    stats.add(np.arange(0, 100, dtype=np.uint16).reshape(1, 10, 10))
    stats.add(np.arange(100, 200, dtype=np.uint16).reshape(1, 10, 10))
    spec = stats.spec(("b1",), "uint16")
    assert spec.low[0] == pytest.approx(1.99, abs=1e-6) and spec.high[0] == pytest.approx(197.01, abs=1e-6)
    assert spec.mean[0] == pytest.approx((99.5 - 1.99) / (197.01 - 1.99), abs=1e-6)


def test_db_statistics_are_in_decibels():
    stats = BandStatistics(1, "db")
    stats.add(np.array([[[0.1, 0.1, 0.001, 0.001]]], np.float32))
    spec = stats.spec(("vv",), "float32")
    assert spec.scaling == "db"
    assert spec.low[0] == pytest.approx(-30.0, abs=1e-4) and spec.high[0] == pytest.approx(-10.0, abs=1e-4)
    assert spec.mean[0] == pytest.approx(0.5, abs=1e-6)


def test_spec_validation():
    with pytest.raises(ValueError, match="unique"):
        SampleSpec(bands=("a", "a"), low=(0, 0), high=(1, 1))
    with pytest.raises(ValueError, match="low has 3 values for 1 bands"):
        SampleSpec(bands=("vv",), high=(1.0,))
    with pytest.raises(ValueError, match="high must exceed"):
        SampleSpec(bands=("vv",), low=(1.0,), high=(1.0,), dtype="float32")


def test_input_resolution_auto_bands_and_statistics():
    data = SampleSpec(bands=RGBN, dtype="uint16", scaling="percentile", low=(0,) * 4, high=(4000,) * 4,
                      mean=(0.1, 0.2, 0.3, 0.4), std=(0.01, 0.02, 0.03, 0.04))
    resolved = InputConfig(size=64).resolve(data)
    assert resolved.bands == RGBN
    assert resolved.mean == (0.485, 0.456, 0.406, 0.4)  # ImageNet for the visible bands, the data's for NIR
    assert resolved.std == (0.229, 0.224, 0.225, 0.04)
    picked = InputConfig(size=64, bands="nir,red").resolve(data)
    assert picked.bands == ("nir", "red") and picked.mean == (0.4, 0.485)
    assert picked.channels == 2


def test_input_resolution_refuses_missing_bands_and_wrong_lengths():
    data = SampleSpec(bands=("vv",), dtype="float32", scaling="db", low=(-30.0,), high=(0.0,),
                      mean=(0.5,), std=(0.2,))
    with pytest.raises(InputError, match="asks for red, which the data does not have"):
        InputConfig(size=64, bands=("red",)).resolve(data)
    with pytest.raises(InputError, match="input.mean has 3 values for 1 bands"):
        InputConfig(size=64, mean=(0.1, 0.2, 0.3)).resolve(data)
    with pytest.raises(ValueError, match="input.std has 1 values for 2 bands"):
        InputConfig(size=64, bands=("a", "b"), std=(1.0,))


def test_old_checkpoints_compare_equal_to_new_rgb_inputs():
    old = InputConfig.model_validate({"size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    new = InputConfig(size=128).resolve(SampleSpec(mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2)))
    assert old.comparable() == new.comparable()
    assert old.comparable() != InputConfig(size=128, bands=("red", "green")).resolve(SampleSpec()).comparable()
