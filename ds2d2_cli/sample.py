"""What a sample is: the bands of an image, how stored values become floats, and the box format.

One owner for the whole pipeline. `prepare-data` looks at the images it writes, measures the
training split and records a `SampleSpec` in the prepared JSON's ``info["sample"]``; stages
resolve `input.bands`, `input.mean` and `input.std` against it (`InputConfig.resolve`) and
every checkpoint carries the result, so eval, predict and export turn pixels into floats
exactly as training did. Data prepared before this existed (no ``info["sample"]``) is
8-bit RGB, which `SampleSpec()` describes.

Value scaling (`scaling`), applied per band after an optional ``10·log10`` (``db``):

    float = (value - low) / (high - low)

* ``range``      low/high are the storage type's range: /255 for 8-bit (today's RGB path);
* ``percentile`` low/high are the training split's 1st and 99th percentiles per band: for
                 16-bit and float optical bands, whose useful range is a sliver of the type's;
* ``minmax``     low/high are the training split's minimum and maximum per band;
* ``db``         SAR: linear backscatter to decibels (``10·log10(max(v, 1e-6))``), then the
                 1st and 99th percentiles of the dB values.

Values are not clipped to [0, 1]: the scaling only puts bands on comparable footing, and
normalisation by the per-band mean and std follows inside the detector.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

Scaling = Literal["range", "percentile", "minmax", "db"]
SCALINGS: tuple[str, ...] = ("range", "percentile", "minmax", "db")
BoxFormat = Literal["XYXY"]
RGB: tuple[str, ...] = ("red", "green", "blue")
# ImageNet statistics of the three visible bands (torchvision's), used for bands of those names.
IMAGENET_MEAN = {"red": 0.485, "green": 0.456, "blue": 0.406}
IMAGENET_STD = {"red": 0.229, "green": 0.224, "blue": 0.225}
DB_FLOOR = 1e-6  # linear backscatter below this is read as -60 dB (no log of zero)
PERCENTILES = (1.0, 99.0)


def bands_text(bands: Sequence[str], dtype: str | None = None) -> str:
    """`4 bands (red, green, blue, nir)` (`... of uint16` with a dtype): how messages name bands."""
    text = f"{len(bands)} band{'s' if len(bands) != 1 else ''} ({', '.join(bands)})"
    return text if dtype is None else f"{text} of {dtype}"


class SampleSpec(BaseModel):
    """How the stored pixels of a prepared dataset are read: bands, dtype, scaling, statistics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bands: tuple[str, ...] = RGB
    dtype: str = "uint8"
    scaling: Scaling = "range"
    low: tuple[float, ...] = (0.0, 0.0, 0.0)
    high: tuple[float, ...] = (255.0, 255.0, 255.0)
    mean: tuple[float, ...] | None = None  # per band, of the scaled training values
    std: tuple[float, ...] | None = None
    box_format: BoxFormat = "XYXY"

    @model_validator(mode="after")
    def _consistent(self) -> "SampleSpec":
        n = len(self.bands)
        if n == 0:
            raise ValueError("a sample has at least one band")
        if len(set(self.bands)) != n:
            raise ValueError(f"band names must be unique (got {', '.join(self.bands)})")
        for name in ("low", "high", "mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} values for {n} bands")
        if any(h <= lo for lo, h in zip(self.low, self.high)):
            raise ValueError("every band's high must exceed its low")
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"unknown dtype {self.dtype!r}") from None
        return self

    @property
    def is_rgb8(self) -> bool:
        """Plain 8-bit RGB read as /255: written as PNG, decoded by PIL, as before bands existed."""
        return (self.bands == RGB and self.dtype == "uint8" and self.scaling == "range"
                and self.low == (0.0,) * 3 and self.high == (255.0,) * 3)

    def band_indices(self, bands: Sequence[str]) -> list[int]:
        return [self.bands.index(b) for b in bands]

    def describe(self) -> str:
        """`4 bands (red, green, blue, nir) of uint16, percentile-scaled`, for messages."""
        return f"{bands_text(self.bands, self.dtype)}, {self.scaling}-scaled"

    def reading(self) -> tuple:
        """What decides the float values (not the statistics): checkpoints are compared on it."""
        return (self.bands, self.dtype, self.scaling, self.low, self.high)

    def to_float(self, array: np.ndarray | torch.Tensor, bands: Sequence[str] | None = None) -> torch.Tensor:
        """Stored pixels `[C, H, W]` (C = this spec's bands) as float32 `[len(bands), H, W]`."""
        tensor = torch.as_tensor(array)
        if tensor.dim() != 3 or tensor.shape[0] != len(self.bands):
            raise ValueError(f"expected [{len(self.bands)}, H, W] pixels for bands {', '.join(self.bands)}, "
                             f"got {tuple(tensor.shape)}")
        chosen = list(range(len(self.bands))) if bands is None else self.band_indices(bands)
        if chosen != list(range(len(self.bands))):
            tensor = tensor[chosen]
        if self.is_rgb8 and len(chosen) == 3 and tensor.dtype == torch.uint8:
            return tensor.float().div_(255.0)  # the exact arithmetic of the RGB path before bands
        x = tensor.float()
        if self.scaling == "db":
            x = x.clamp(min=DB_FLOOR).log10_().mul_(10.0)
        low = torch.tensor([self.low[i] for i in chosen], dtype=torch.float32).view(-1, 1, 1)
        span = torch.tensor([self.high[i] - self.low[i] for i in chosen], dtype=torch.float32).view(-1, 1, 1)
        return x.sub_(low).div_(span)


def storage_range(dtype: str) -> tuple[float, float]:
    """The value range of an integer storage type (`range` scaling); floats have none."""
    kind = np.dtype(dtype)
    if kind.kind not in "ui":
        raise ValueError(f"{dtype} has no fixed range; use percentile, minmax or db scaling")
    info = np.iinfo(kind)
    return float(info.min if kind.kind == "i" else 0), float(info.max)


def default_scaling(bands: Sequence[str], dtype: str) -> str:
    """`auto`: 8-bit data by its range (/255), anything else by the training split's percentiles."""
    return "range" if np.dtype(dtype) == np.uint8 else "percentile"


class BandStatistics:
    """Per-band running moments and a pixel sample of a split, for the spec's low/high/mean/std.

    Values are accumulated in the pre-affine domain (raw, or dB for `db`), so the statistics
    of the scaled values follow exactly from low/high without a second pass over the images.
    """

    SAMPLE_PER_IMAGE = 4096

    def __init__(self, bands: int, scaling: str, seed: int = 0):
        self.bands, self.scaling = bands, scaling
        self.count = 0
        self.total = np.zeros(bands, np.float64)
        self.squares = np.zeros(bands, np.float64)
        self.minimum = np.full(bands, np.inf)
        self.maximum = np.full(bands, -np.inf)
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, pixels: np.ndarray) -> None:
        """One image's stored pixels `[C, H, W]`."""
        x = pixels.reshape(self.bands, -1).astype(np.float64)
        if self.scaling == "db":
            x = 10.0 * np.log10(np.maximum(x, DB_FLOOR))
        self.count += x.shape[1]
        self.total += x.sum(axis=1)
        self.squares += np.square(x).sum(axis=1)
        self.minimum = np.minimum(self.minimum, x.min(axis=1))
        self.maximum = np.maximum(self.maximum, x.max(axis=1))
        take = min(self.SAMPLE_PER_IMAGE, x.shape[1])
        self.samples.append(x[:, self.rng.choice(x.shape[1], size=take, replace=False)])

    def spec(self, bands: Sequence[str], dtype: str) -> SampleSpec:
        if self.count == 0:
            raise ValueError("no pixels to measure")
        if self.scaling == "range":
            lo, hi = storage_range(dtype)
            low, high = np.full(self.bands, lo), np.full(self.bands, hi)
        elif self.scaling == "minmax":
            low, high = self.minimum, self.maximum
        else:
            sample = np.concatenate(self.samples, axis=1)
            low, high = (np.percentile(sample, p, axis=1) for p in PERCENTILES)
        high = np.where(high > low, high, low + 1.0)  # a constant band: any span keeps it finite
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean ** 2, 0.0)
        span = high - low
        scaled_mean = (mean - low) / span
        scaled_std = np.maximum(np.sqrt(var) / span, 1e-6)

        def floats(values: np.ndarray, digits: int = 6) -> tuple[float, ...]:
            return tuple(round(float(v), digits) for v in values)

        return SampleSpec(bands=tuple(bands), dtype=dtype, scaling=self.scaling,  # type: ignore[arg-type]
                          low=floats(low, 9), high=floats(high, 9), mean=floats(scaled_mean), std=floats(scaled_std))
