"""Near-infrared and SAR versions of the synthetic scenes (`prepare-data synthetic --bands`).

The scene is rendered exactly as for `--bands rgb` (same random draws, same objects, same
label files); what it is made of, per pixel, then gives the other bands:

* materials: the scene's surface map (fields and meadows, forest, water, roads and pads,
  roofs, piers) with the objects' outlines and the tree crowns drawn over it.
* ``rgbn``: uint16 red, green, blue, nir in 12-bit digital numbers, 0..4095, the 8-bit
  scene's 0..255 mapped linearly (DN = value x 4095 / 255, from the camera's values before
  8-bit rounding, so dividing back and rounding gives the rgb scene to within 1). NIR is the
  pixel's visible brightness times a material's NIR/visible ratio, then the scene's own
  blur, gain and noise, with a third of its haze (haze scatters less in the infrared).
  Natural ground gets 1.25 (bare soil) to 2.3 (fully green vegetation: the red edge),
  by how green the pixel is; water 0.12 (absorbs NIR); roads and pads 1.1; roofs 1.2;
  piers 1.1; painted metal (vehicles, ships, planes, tanks) 0.35: paint has no red edge.
  So the green-painted cars, truck cabs and trailers of the colour tables, which match the
  trees in RGB, are dark in NIR, as camouflage paint is on colour-infrared film; white paint
  is darker here than real white paints are, so that vehicles read as not vegetation.
* ``sar``: float32 ``vv``, linear backscatter sigma0, as a C-band sensor looking from one
  side (per-scene direction) at 35 degrees incidence sees it: water 0.003-0.006 (specular,
  wind-modulated), roads and pads 0.012, ground 0.03-0.08 (more with vegetation), trees
  and forest 0.1 (volume scattering), roofs 0.35 with 3.0 double-bounce along the walls
  that face the sensor and radar shadow (noise floor) behind buildings, piers 0.15, metal
  objects 0.3 with point scatterers of 1-10 (corner reflectors at the corners facing the
  sensor and inside, a near-side arc on tanks), a noise floor of 0.0005, then multiplicative
  speckle: gamma with `LOOKS` = 4 looks (mean 1, coefficient of variation 1/2).

GeoTIFFs get band names as descriptions and a synthetic UTM zone 33N georeference: pixels of
the scene's gsd (the label file's), scene i's top-left corner at easting 300 km + 10 km x
(i mod 50), northing 5300 km - 10 km x (i div 50 mod 100) (footprints repeat after 5000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ds2d2_cli.data import synthetic as syn
from ds2d2_cli.fileio import atomic_path

BANDS = {"rgbn": ("red", "green", "blue", "nir"), "sar": ("vv",)}
CRS = "EPSG:32633"
DN_MAX = 4095  # 12-bit sensor
LOOKS = 4

# Materials, per pixel.
LAND, WATER, PAVED, ROOF, PIER, METAL, TREE = range(7)
MATERIALS = ("land", "water", "paved", "roof", "pier", "metal", "tree")
_FROM_SURFACE = np.zeros(8, np.uint8)
_FROM_SURFACE[[syn.GROUND, syn.BUILDING, syn.WATER, syn.ROAD, syn.PAD, syn.URBAN, syn.PIER, syn.FOREST]] = \
    [LAND, ROOF, WATER, PAVED, PAVED, LAND, PIER, TREE]

SOIL_NIR, VEG_NIR = 1.25, 2.3
NIR_RATIO = np.array([SOIL_NIR, 0.12, 1.1, 1.2, 1.1, 0.35, SOIL_NIR], np.float32)  # by material
NIR_HAZE = 1 / 3

INCIDENCE = math.radians(35.0)
NOISE_FLOOR = 0.0005
SIGMA0 = np.array([0.03, 0.004, 0.012, 0.35, 0.15, 0.3, 0.1], np.float32)  # by material, before texture


@dataclass
class BandScene:
    """One rendered scene: bands `[C, H, W]` with their names, labelled objects, gsd, and
    the per-pixel materials and pre-camera colour they were derived from (for checks)."""

    array: np.ndarray
    band_names: tuple[str, ...]
    objects: list
    gsd: float
    materials: np.ndarray
    colour: np.ndarray


def render_bands(rng: np.random.Generator, extra: np.random.Generator, size: int,
                 focus: str | None, bands: str) -> BandScene:
    """The scene `render_scene(rng, size, focus)` draws, as `bands` (rgbn or sar).

    `extra` is the only source of the new randomness (NIR noise, SAR texture, scatterers,
    speckle), so `rng` makes the same draws as for rgb.
    """
    scene = syn._Scene(rng, size, keep_layers=True)
    _, objects, gsd = scene.render(focus)
    mats = materials(scene)
    array = _rgbn(scene, mats, extra) if bands == "rgbn" else _sar(scene, mats, extra)
    return BandScene(array, BANDS[bands], objects, gsd, mats, scene.colour)


def write_bands(path: Path, scene: BandScene, index: int) -> None:
    """The scene as a georeferenced GeoTIFF (see the module docstring for the grid)."""
    from ds2d2_cli.data.raster import write_geotiff

    x0 = 300_000.0 + 10_000.0 * (index % 50)
    y0 = 5_300_000.0 - 10_000.0 * (index // 50 % 100)
    transform = (scene.gsd, 0.0, x0, 0.0, -scene.gsd, y0)
    with atomic_path(path) as tmp:
        write_geotiff(tmp, scene.array, crs=CRS, transform=transform, band_names=scene.band_names)


def materials(scene: syn._Scene) -> np.ndarray:
    """uint8 `[H, W]` of material codes: the surface map, objects over it, tree crowns on top."""
    im = Image.fromarray(_FROM_SURFACE[scene.surface])
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        if o.kind == "tank":
            r = o.length / 2
            draw.ellipse((o.cx - r, o.cy - r, o.cx + r, o.cy + r), fill=METAL)
        else:
            for poly in scene.outline(o):
                draw.polygon(poly, fill=METAL)
    for x, y, r in scene.trees:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=TREE)
    return np.asarray(im)


def greenness(colour: np.ndarray) -> np.ndarray:
    """How much green stands above red and blue, relative to brightness (0: grey or brown)."""
    c = colour.astype(np.float32)
    bright = np.maximum(c.mean(-1), 1.0)
    return (c[..., 1] - (c[..., 0] + c[..., 2]) / 2) / bright


def _rgbn(scene: syn._Scene, mats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colour = scene.colour.astype(np.float32)
    veg = np.clip((greenness(colour) - 0.05) / 0.3, 0.0, 1.0)
    ratio = NIR_RATIO[mats]
    natural = (mats == LAND) | (mats == TREE)
    ratio = np.where(natural, SOIL_NIR + veg * (VEG_NIR - SOIL_NIR), ratio)
    nir = _gaussian_blur(colour.mean(-1) * ratio, scene.optics.blur)
    nir = nir * np.float32(scene.optics.gain.mean()) + np.float32(NIR_HAZE * scene.optics.haze)
    nir += rng.standard_normal(nir.shape, dtype=np.float32) * np.float32(scene.optics.noise_sd)
    values = np.concatenate([scene.sensed.transpose(2, 0, 1), nir[None]])
    return np.clip(np.rint(values * (DN_MAX / 255.0)), 0, DN_MAX).astype(np.uint16)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float image (PIL blurs 8-bit images only)."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    h, w = a.shape
    p = np.pad(a, ((0, 0), (r, r)), mode="edge")
    a = sum(k[i] * p[:, i:i + w] for i in range(2 * r + 1))
    p = np.pad(a, ((r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[i:i + h] for i in range(2 * r + 1)).astype(np.float32)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`mask` moved by (dx, dy) pixels, nothing wrapping round."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))


def _sar(scene: syn._Scene, mats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = scene.size
    az = rng.uniform(0, 2 * math.pi)
    look = np.array([math.cos(az), math.sin(az)])  # ground range direction, away from the sensor
    sigma = SIGMA0[mats].copy()
    land = mats == LAND
    veg = np.clip((greenness(scene.colour) - 0.05) / 0.3, 0.0, 1.0)
    field = 0.85 + 0.3 * _smooth_noise(rng, size, max(2, size // 48))  # soil moisture, roughness
    sigma[land] = ((0.03 + 0.05 * veg[land]) * field[land]).astype(np.float32)
    water = mats == WATER
    wind = 0.75 + 0.5 * _smooth_noise(rng, size, 3)
    sigma[water] *= wind[water]
    # buildings: double bounce along the walls facing the sensor, shadow behind them
    bld = scene.surface == syn.BUILDING
    if bld.any():
        near = np.rint(-look * 2).astype(int)
        walls = bld & ~_shift(bld, int(-near[0]), int(-near[1]))
        sigma[walls] = 3.0
        reach = getattr(scene, "bld_height", 0.0) * math.tan(INCIDENCE)
        shadow = np.zeros_like(bld)
        for t in np.linspace(1.0, max(1.0, reach), 4):
            d = np.rint(look * t).astype(int)
            shadow |= _shift(bld, int(d[0]), int(d[1]))
        sigma[shadow & ~bld & (mats != METAL)] = 0.0
    _scatterers(sigma, scene.objects, look, rng)
    sigma += np.float32(NOISE_FLOOR)
    speckle = rng.gamma(LOOKS, 1.0 / LOOKS, sigma.shape).astype(np.float32)
    return (sigma * speckle)[None]


def _scatterers(sigma: np.ndarray, objects: list, look: np.ndarray, rng: np.random.Generator) -> None:
    """Bright points (corner reflectors) on each metal object, spread over a small cross."""
    h, w = sigma.shape
    points: list[tuple[float, float, float]] = []
    for o in objects:
        if o.kind == "tank":
            r = o.length / 2
            for a in math.atan2(-look[1], -look[0]) + np.linspace(-1.2, 1.2, 5):
                amp = float(np.exp(rng.uniform(0, math.log(6))))
                points.append((o.cx + r * math.cos(a), o.cy + r * math.sin(a), amp))
            continue
        corners = syn._shrink(o.corners, 0.85)
        for x, y in corners:
            if (x - o.cx) * look[0] + (y - o.cy) * look[1] < 0:  # faces the sensor
                points.append((x, y, float(np.exp(rng.uniform(math.log(2), math.log(10))))))
        n = 1 + int(min(10, o.length / 8))
        u = rng.uniform(-0.4, 0.4, n) * o.length
        v = rng.uniform(-0.3, 0.3, n) * o.width
        c, s = math.cos(o.th), math.sin(o.th)
        for du, dv, amp in zip(u, v, np.exp(rng.uniform(0, math.log(4), n))):
            points.append((o.cx + du * c - dv * s, o.cy + du * s + dv * c, float(amp)))
    for x, y, amp in points:
        ix, iy = int(x), int(y)
        for dx, dy, f in ((0, 0, 1.0), (1, 0, 0.35), (-1, 0, 0.35), (0, 1, 0.35), (0, -1, 0.35)):
            if 0 <= ix + dx < w and 0 <= iy + dy < h:
                sigma[iy + dy, ix + dx] += np.float32(amp * f)
