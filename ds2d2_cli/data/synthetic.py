"""Synthetic top-down scenes in the real DOTA v1.0 layout, for tests and the demo.

`generate_synthetic(out, images, size, seed)` writes

    OUT/train/images/P0000.png   OUT/train/labelTxt/P0000.txt
    OUT/val/images/P0018.png     OUT/val/labelTxt/P0018.txt

Each label file starts with `imagesource:ds2d2-synthetic` and `gsd:<metres per pixel>`,
then one line per object: `x1 y1 x2 y2 x3 y3 x4 y4 class difficult`.

A scene is a textured background (crop fields, meadows, forest, an urban grid of gabled
and flat roofs, lakes or coast with a sandy shore, roads with lane markings, parking lots,
aprons, tank-farm pads and piers) with the five `SYNTHETIC` classes placed where they
belong: cars and trucks on road lanes and in parking lots / depots, planes on aprons,
storage tanks in tank farms, ships at piers and at sea. Objects cast shadows away from a
per-scene sun, trees may partly hide them, and the image gets a slight blur, a colour cast
and sensor noise. Everything comes from `numpy.random.default_rng` seeded per image
(`SeedSequence(seed).spawn`), and PNGs are written without metadata, so the same seed
gives the same bytes.

`bands="rgbn"` or `"sar"` renders the same scenes (same objects, same label files) and
writes `P0000.tif` GeoTIFFs instead: 12-bit red, green, blue and near-infrared, or SAR VV
backscatter (`synthetic_bands` says how). Their extra randomness comes from a second
stream spawned from each scene's seed, so the scene itself does not change.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import atomic_path
from ds2d2_cli.progress import NullReporter, Reporter

IMAGESOURCE = "ds2d2-synthetic"
PNG_COMPRESS_LEVEL = 1  # fixed: same bytes for the same seed, fast to write
_NAME_RE = re.compile(r"^P\d{4,}\.(png|tif|txt)$")
BAND_MODES = ("rgb", "rgbn", "sar")

# Surface codes of the per-pixel `surface` map, used to decide where objects may stand.
GROUND, BUILDING, WATER, ROAD, PAD, URBAN, PIER, FOREST = range(8)


# --------------------------------------------------------------------------- public API


def generate_synthetic(
    out: Path,
    images: int = 24,
    size: int = 640,
    seed: int = 0,
    val_fraction: float = 0.25,
    reporter: Reporter | None = None,
    bands: str = "rgb",
) -> dict:
    """Write `images` synthetic scenes of `size` x `size` px under `out` in the DOTA layout.

    `bands`: rgb (8-bit PNG), rgbn (uint16 GeoTIFF red, green, blue, nir) or sar (float32
    GeoTIFF, vv); see `BAND_MODES` and `synthetic_bands`.

    The last `round(images * val_fraction)` scenes (at least one when `images >= 2`, and
    never all of them) go to `val/`, the others to `train/`. Returns
    `{"train": {"images": n, "objects": {class: count}}, "val": {...}, "seconds": s}`.
    """
    _check_args(images, size, seed, val_fraction)
    if bands not in BAND_MODES:
        raise InputError(f"--bands must be one of {', '.join(BAND_MODES)} (got {bands!r})")
    ext = ".png" if bands == "rgb" else ".tif"
    out = Path(out)
    reporter = reporter if reporter is not None else NullReporter()
    n_val = int(round(images * val_fraction))
    if images >= 2:
        n_val = min(max(n_val, 1), images - 1)
    else:
        n_val = 0
    n_train = images - n_val
    splits = ["train"] * n_train + ["val"] * n_val
    width = max(4, len(str(images - 1)))
    names = [f"P{i:0{width}d}" for i in range(images)]

    _prepare_out(out, {(s, n + e) for s, n in zip(splits, names) for e in (ext, ".txt")})

    summary: dict[str, Any] = {
        split: {"images": 0, "objects": {c: 0 for c in SYNTHETIC}} for split in ("train", "val")
    }
    start = time.perf_counter()
    children = np.random.SeedSequence(seed).spawn(images)
    task = reporter.task("Generating synthetic scenes", total=images)
    try:
        for i, (name, split, child) in enumerate(zip(names, splits, children)):
            focus = SYNTHETIC[i % len(SYNTHETIC)]
            rng = np.random.default_rng(child)
            if bands == "rgb":
                image, objects, gsd = render_scene(rng, size, focus)
                _write_png(out / split / "images" / f"{name}.png", image)
            else:
                from ds2d2_cli.data.synthetic_bands import render_bands, write_bands

                scene = render_bands(rng, np.random.default_rng(child.spawn(1)[0]), size, focus, bands)
                write_bands(out / split / "images" / f"{name}.tif", scene, index=i)
                objects, gsd = scene.objects, scene.gsd
            _write_labels(out / split / "labelTxt" / f"{name}.txt", objects, gsd, size)
            summary[split]["images"] += 1
            for obj in objects:
                summary[split]["objects"][obj.cls] += 1
            task.update()
    finally:
        task.close()
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _check_args(images: Any, size: Any, seed: Any, val_fraction: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(images) or images < 1:
        raise InputError(f"--images must be a whole number >= 1, got {images!r}")
    if images > 1_000_000:
        raise InputError(f"--images must be at most 1000000, got {images!r}")
    if not is_int(size) or size < 64:
        raise InputError(f"--size must be a whole number of pixels >= 64, got {size!r}")
    if size > 8192:
        raise InputError(f"--size must be at most 8192 pixels, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise InputError(f"--seed must be a whole number >= 0, got {seed!r}")
    if (
        not isinstance(val_fraction, (int, float, np.floating))
        or isinstance(val_fraction, bool)
        or not math.isfinite(val_fraction)
        or not 0.0 <= val_fraction < 1.0
    ):
        raise InputError(f"val fraction must be in [0, 1), got {val_fraction!r}")


def _prepare_out(out: Path, keep: set[tuple[str, str]]) -> None:
    """Create the layout; refuse a folder holding someone else's data; drop stale scenes.

    `keep` holds (split, file name): a P0000.png left from an rgb run goes when the scene
    is now P0000.tif, so no label file has two images.
    """
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)
    for split in ("train", "val"):
        labels = out / split / "labelTxt"
        if labels.is_dir():
            for txt in sorted(labels.glob("*.txt")):
                try:
                    with open(txt, encoding="utf-8", errors="replace") as fh:
                        first = fh.readline().strip()
                except OSError:
                    first = ""
                if first != f"imagesource:{IMAGESOURCE}":
                    raise InputError(
                        "folder holds a dataset not written by `prepare-data synthetic`; "
                        "choose an empty or new folder",
                        out,
                    )
    try:
        for split in ("train", "val"):
            for sub in ("images", "labelTxt"):
                folder = out / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                for f in folder.iterdir():
                    if f.is_file() and _NAME_RE.match(f.name) and (split, f.name) not in keep:
                        f.unlink()
    except OSError as exc:
        raise Ds2d2Error(f"cannot write here: {exc.strerror or exc}", out) from None


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_labels(path: Path, objects: list[_Obj], gsd: float, size: int) -> None:
    lines = [f"imagesource:{IMAGESOURCE}", f"gsd:{gsd:.6f}"]
    for o in objects:
        c = np.clip(o.corners, 0.0, float(size))
        coords = " ".join(f"{v:.1f}" for v in c.reshape(-1))
        lines.append(f"{coords} {o.cls} {o.difficult}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- geometry


@dataclass
class _Obj:
    cls: str | None  # None: an obstacle (pier), not a labelled object
    cx: float
    cy: float
    th: float
    length: float
    width: float
    kind: str = ""
    height: float = 1.0  # shadow length in px
    params: dict = field(default_factory=dict)
    corners: np.ndarray = field(default_factory=lambda: np.zeros((4, 2)))
    difficult: int = 0


def _corners(cx: float, cy: float, th: float, length: float, width: float) -> np.ndarray:
    c, s = math.cos(th), math.sin(th)
    u = np.array([-0.5, 0.5, 0.5, -0.5]) * length
    v = np.array([-0.5, -0.5, 0.5, 0.5]) * width
    return np.stack([cx + u * c - v * s, cy + u * s + v * c], axis=1)


def _local(o: _Obj, pts: np.ndarray | list) -> list[tuple[float, float]]:
    p = np.asarray(pts, dtype=np.float64)
    c, s = math.cos(o.th), math.sin(o.th)
    x = o.cx + p[:, 0] * c - p[:, 1] * s
    y = o.cy + p[:, 0] * s + p[:, 1] * c
    return list(zip(x.tolist(), y.tolist()))


def _rect(u0: float, u1: float, v0: float, v1: float) -> list[tuple[float, float]]:
    return [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]


def _sat_any(c: np.ndarray, boxes: np.ndarray) -> bool:
    """Does convex quad `c` (4,2) intersect any of `boxes` (N,4,2)? Separating axis test."""
    if len(boxes) == 0:
        return False
    lo, hi = c.min(0), c.max(0)
    near = (boxes[:, :, 0].min(1) <= hi[0]) & (boxes[:, :, 0].max(1) >= lo[0])
    near &= (boxes[:, :, 1].min(1) <= hi[1]) & (boxes[:, :, 1].max(1) >= lo[1])
    e = boxes[near]
    if len(e) == 0:
        return False
    edges_e = e[:, 1:3] - e[:, 0:2]
    edges_c = np.broadcast_to((c[1:3] - c[0:2])[None], edges_e.shape)
    axes = np.concatenate([edges_e, edges_c], axis=1)[..., ::-1] * np.array([-1.0, 1.0])
    pc = np.einsum("kd,nad->nak", c, axes)
    pe = np.einsum("nkd,nad->nak", e, axes)
    sep = (pc.max(-1) < pe.min(-1)) | (pe.max(-1) < pc.min(-1))
    return bool((~sep.any(-1)).any())


def _shrink(corners: np.ndarray, f: float) -> np.ndarray:
    c = corners.mean(0)
    return c + (corners - c) * f


# --------------------------------------------------------------------------- colours

_CAR_COLOURS = np.array([
    (228, 228, 226), (235, 235, 232), (28, 29, 32), (45, 45, 50), (172, 174, 178), (120, 122, 126),
    (165, 32, 30), (40, 62, 135), (28, 36, 72), (44, 84, 54), (195, 180, 145), (210, 170, 40),
    (95, 60, 40), (230, 230, 230),
], dtype=np.float64)
_CAR_P = np.array([12, 8, 10, 5, 10, 7, 5, 5, 4, 2, 3, 1, 2, 6], dtype=np.float64)
_TRUCK_CAB = np.array([(230, 230, 228), (180, 35, 30), (35, 70, 150), (220, 120, 30),
                       (40, 90, 60), (60, 60, 65), (200, 200, 40)], dtype=np.float64)
_TRAILER = np.array([(225, 225, 222), (200, 202, 205), (150, 152, 156), (140, 62, 40),
                     (45, 75, 125), (55, 110, 70), (205, 110, 40), (235, 235, 230)], dtype=np.float64)
_ROOF = np.array([(172, 82, 62), (150, 92, 72), (128, 70, 58), (82, 82, 88), (168, 168, 166),
                  (200, 198, 190), (120, 96, 80), (95, 105, 115), (185, 120, 90)], dtype=np.float64)
_TANK_TOP = np.array([(226, 226, 220), (205, 205, 200), (190, 188, 180), (215, 205, 180),
                      (150, 125, 100), (115, 130, 105)], dtype=np.float64)
_HULL = np.array([(238, 238, 236), (230, 232, 235), (70, 72, 76), (125, 42, 36), (38, 44, 70),
                  (28, 28, 30), (200, 200, 198)], dtype=np.float64)
_DECK = np.array([(165, 132, 92), (220, 220, 218), (140, 142, 146), (70, 110, 80), (150, 60, 45),
                  (190, 190, 186)], dtype=np.float64)
_CONTAINERS = np.array([(170, 60, 40), (40, 80, 140), (60, 120, 70), (210, 120, 40),
                        (200, 200, 200), (120, 40, 40), (230, 190, 60)], dtype=np.float64)

_PALETTES = {
    # field colours, meadow base, bare soil
    "green": ([(88, 118, 62), (108, 132, 70), (74, 104, 52), (128, 138, 82), (142, 118, 86),
               (160, 140, 100), (118, 128, 66), (96, 110, 58)], (92, 116, 66), (140, 122, 92)),
    "dry": ([(168, 150, 104), (150, 138, 96), (120, 122, 74), (182, 160, 118), (140, 112, 82),
             (104, 112, 64), (196, 176, 132), (160, 132, 96)], (150, 138, 98), (172, 148, 110)),
    "arid": ([(196, 176, 140), (182, 160, 124), (170, 150, 112), (206, 188, 150), (160, 142, 110),
              (150, 140, 100), (190, 166, 128), (176, 164, 130)], (186, 168, 132), (200, 180, 144)),
}


def _colour(rng: np.random.Generator, table: np.ndarray, p: np.ndarray | None = None,
            jitter: float = 8.0) -> tuple[int, int, int]:
    i = rng.choice(len(table), p=None if p is None else p / p.sum())
    c = table[i] * rng.uniform(0.9, 1.08) + rng.normal(0, jitter, 3)
    return _rgb(c)


def _rgb(c: Any) -> tuple[int, int, int]:
    c = np.clip(np.asarray(c, dtype=np.float64), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return _rgb(np.asarray(c, dtype=np.float64) * f)


# --------------------------------------------------------------------------- scene


def render_scene(
    rng: np.random.Generator, size: int, focus: str | None = None
) -> tuple[np.ndarray, list[_Obj], float]:
    """One scene: (H x W x 3 uint8 image, labelled objects, gsd in metres per pixel).

    `focus` names a class whose typical cluster (parking lot, depot, apron, tank farm,
    marina) the scene attempts first, so that consecutive scenes cover all classes.
    """
    return _Scene(rng, size).render(focus)


@dataclass(frozen=True)
class Optics:
    """The blur, per-channel gain, haze and noise level one scene's camera drew (for extra bands)."""

    blur: float
    gain: np.ndarray
    haze: float
    noise_sd: float


class _Scene:
    def __init__(self, rng: np.random.Generator, size: int, keep_layers: bool = False):
        self.rng = rng
        self.size = size
        self.keep_layers = keep_layers  # keep colour, optics, sensed: `synthetic_bands` derives NIR / SAR
        self.gsd = float(rng.uniform(0.32, 0.62))
        self.px = 1.0 / self.gsd  # pixels per metre
        ax = np.arange(size, dtype=np.float32)
        self.X, self.Y = np.meshgrid(ax, ax)
        self.img = np.zeros((size, size, 3), np.float32)
        self.surface = np.full((size, size), GROUND, np.uint8)
        az = rng.uniform(0, 2 * math.pi)
        self.sun = np.array([math.cos(az), math.sin(az)])  # shadows fall along +sun
        self.sun_k = float(rng.uniform(0.45, 0.9))  # shadow length per unit of height
        self.objects: list[_Obj] = []
        self.boxes = np.zeros((0, 4, 2))  # shrunk boxes of placed objects and obstacles
        self.pads = np.zeros((0, 4, 2))
        self.roads: list[dict] = []
        self.trees: list[tuple[float, float, float]] = []
        self.stripes: list[dict] = []  # painted lines drawn after the background

    # ----------------------------------------------------------------- helpers

    def noise(self, cells: int) -> np.ndarray:
        """Smooth value noise in [0, 1] with about `cells` features across the image."""
        cells = max(2, int(cells))
        g = self.rng.random((cells + 1, cells + 1), dtype=np.float32)
        return np.asarray(Image.fromarray(g).resize((self.size, self.size), Image.BICUBIC))

    def fbm(self, cells: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
        acc = np.zeros((self.size, self.size), np.float32)
        for c, w in zip(cells, weights):
            acc += w * (self.noise(c) - 0.5)
        return acc

    def frame(self, cx: float, cy: float, th: float, hl: float, hw: float):
        """Slices of the image covering a rotated rectangle and its local (a, b) coordinates."""
        r = math.hypot(hl, hw) + 1
        x0, x1 = max(0, int(cx - r)), min(self.size, int(cx + r) + 1)
        y0, y1 = max(0, int(cy - r)), min(self.size, int(cy + r) + 1)
        if x1 <= x0 or y1 <= y0:
            return None
        X = self.X[y0:y1, x0:x1] - cx
        Y = self.Y[y0:y1, x0:x1] - cy
        c, s = math.cos(th), math.sin(th)
        a = X * c + Y * s
        b = -X * s + Y * c
        inside = (np.abs(a) <= hl) & (np.abs(b) <= hw)
        return (slice(y0, y1), slice(x0, x1)), a, b, inside

    def fits(self, corners: np.ndarray, allowed: tuple[int, ...], shrink: float = 0.88) -> bool:
        m = 1.0
        if corners.min() < m or corners.max() > self.size - m:
            return False
        inner = _shrink(corners, 0.8)
        pts = np.concatenate([inner, corners.mean(0, keepdims=True),
                              (inner + np.roll(inner, 1, 0)) / 2])
        ix = np.clip(pts[:, 0].astype(int), 0, self.size - 1)
        iy = np.clip(pts[:, 1].astype(int), 0, self.size - 1)
        if not np.isin(self.surface[iy, ix], allowed).all():
            return False
        return not _sat_any(_shrink(corners, shrink), self.boxes)

    def add(self, o: _Obj, allowed: tuple[int, ...], shrink: float = 0.88) -> bool:
        if o.cls == "storage-tank":
            r = o.length / 2
            o.corners = np.array([[o.cx - r, o.cy - r], [o.cx + r, o.cy - r],
                                  [o.cx + r, o.cy + r], [o.cx - r, o.cy + r]])
        else:
            o.corners = _corners(o.cx, o.cy, o.th, o.length, o.width)
        if not self.fits(o.corners, allowed, shrink):
            return False
        self.boxes = np.concatenate([self.boxes, _shrink(o.corners, shrink)[None]])
        self.objects.append(o)
        return True

    def reserve_pad(self, cx, cy, th, hl, hw, max_water=0.05, max_road=0.04, max_building=1.0):
        corners = _corners(cx, cy, th, 2 * hl, 2 * hw)
        if _sat_any(corners, self.pads):
            return None
        fr = self.frame(cx, cy, th, hl, hw)
        if fr is None:
            return None
        sl, a, b, inside = fr
        n = inside.sum()
        if n < 0.25 * (4 * hl * hw):  # mostly outside the image
            return None
        surf = self.surface[sl][inside]
        if (surf == WATER).mean() > max_water or (surf == ROAD).mean() > max_road:
            return None
        if (surf == BUILDING).mean() > max_building:
            return None
        self.pads = np.concatenate([self.pads, corners[None]])
        return fr

    # ----------------------------------------------------------------- background

    def render(self, focus: str | None = None):
        """Build the scene; `focus` (a class) makes sure its typical cluster is attempted first."""
        rng = self.rng
        self.palette = _PALETTES[rng.choice(["green", "green", "dry", "arid"])]
        self.ground()
        if rng.random() < 0.45:
            self.urban()
        self.has_water = rng.random() < 0.6 or focus == "ship"
        if self.has_water:
            self.water()
        if rng.random() < 0.3:
            self.forest()
        self.make_roads(at_least_one=focus in ("small-vehicle", "large-vehicle"))
        # clusters: the focused one first, retried, so it gets room
        clusters = {
            "ship": (self.marina, 0.75 if self.has_water else 0.0),
            "plane": (self.apron, 0.55),
            "storage-tank": (self.tank_farm, 0.55),
            "small-vehicle": (lambda: self.parking_lot(large=False), 0.6),
            "large-vehicle": (lambda: self.parking_lot(large=True), 0.3),
        }
        order = list(clusters)
        if focus in clusters:
            order.remove(focus)
            before = len(self.objects)
            for _ in range(3):
                clusters[focus][0]()
                if len(self.objects) > before:
                    break
        for name in order:
            make, p = clusters[name]
            if rng.random() < p:
                make()
        for _ in range(rng.integers(0, 3)):
            self.parking_lot(large=rng.random() < 0.3)
        if self.has_water and rng.random() < 0.3:
            self.marina()
        # sparse placements
        self.road_traffic()
        if self.has_water:
            self.sea_ships()
        self.sparse_land()
        self.urban_cars()
        self.place_trees()
        self.building_shadows()
        return self.compose()

    def ground(self):
        rng = self.rng
        fields, meadow, soil = self.palette
        table_n = 64
        cols = np.array(fields, np.float32)[rng.integers(0, len(fields), table_n)]
        cols *= rng.uniform(0.88, 1.12, (table_n, 1)).astype(np.float32)
        kind = rng.choice(4, table_n, p=[0.45, 0.2, 0.2, 0.15])  # stripes, fine, meadow, soil
        period = rng.uniform(3.0, 9.0, table_n).astype(np.float32)
        amp = np.where(kind == 0, rng.uniform(0.06, 0.16, table_n),
                       np.where(kind == 1, rng.uniform(0.03, 0.07, table_n), 0.0)).astype(np.float32)
        along = rng.random(table_n) < 0.5
        cols[kind == 2] = np.array(meadow, np.float32) * rng.uniform(0.9, 1.1, (int((kind == 2).sum()), 1))
        cols[kind == 3] = np.array(soil, np.float32) * rng.uniform(0.9, 1.1, (int((kind == 3).sum()), 1))

        th = rng.uniform(0, math.pi)
        self.grid_th = th
        c, s = math.cos(th), math.sin(th)
        u = self.X * c + self.Y * s + rng.uniform(0, 500)
        v = -self.X * s + self.Y * c + rng.uniform(0, 500)
        fh = rng.uniform(70, 200)
        iv = np.floor(v / fh)
        row_shift = rng.uniform(0, 1, 97).astype(np.float32)
        row_fw = rng.uniform(60, 220, 97).astype(np.float32)
        ivm = np.mod(iv, 97).astype(np.int64)
        fw = row_fw[ivm]
        uu = u / fw + row_shift[ivm]
        iu = np.floor(uu)
        fid = np.mod(iu.astype(np.int64) * 7 + ivm * 13, table_n)
        img = cols[fid]
        coord = np.where(along[fid], u, v)
        stripe = np.sin(coord * (2 * math.pi) / period[fid])
        shade = 1.0 + amp[fid] * stripe
        shade += 0.10 * self.fbm((6, 24, 96), (1.0, 0.6, 0.5))
        # tracks / hedges between fields
        du = np.minimum(uu - iu, 1 - (uu - iu)) * fw
        dv = np.minimum(v / fh - iv, 1 - (v / fh - iv)) * fh
        edge = np.minimum(du, dv) < 1.6
        img = img * shade[..., None]
        hedge = np.array(meadow, np.float32) * 0.72 if rng.random() < 0.5 else np.array(soil, np.float32) * 1.1
        img[edge] = hedge + rng.normal(0, 4, 3).astype(np.float32)
        self.img = img.astype(np.float32)

    def urban(self):
        rng = self.rng
        mask = self.noise(3) + 0.25 * self.noise(10)
        t = np.quantile(mask[::8, ::8], 1 - rng.uniform(0.25, 0.6))
        region = mask > t
        iy, ix = np.nonzero(region)  # work on the region's pixels only
        th = self.grid_th + (0 if rng.random() < 0.6 else rng.uniform(0, math.pi))
        c, s = math.cos(th), math.sin(th)
        pu = rng.uniform(14, 24) * self.px
        pv = pu * rng.uniform(0.7, 1.3)
        X, Y = ix.astype(np.float32), iy.astype(np.float32)
        u = (X * c + Y * s) / pu + rng.uniform(0, 50)
        v = (-X * s + Y * c) / pv + rng.uniform(0, 50)
        iu, iv = np.floor(u), np.floor(v)
        fu, fv = u - iu, v - iv
        n = 257
        bid = np.mod(iu.astype(np.int64) * 31 + iv.astype(np.int64) * 17, n)
        street = rng.uniform(0.16, 0.26)
        a0 = street + rng.uniform(0.04, 0.2, n)
        a1 = 1 - rng.uniform(0.05, 0.25, n)
        b0 = street + rng.uniform(0.04, 0.2, n)
        b1 = 1 - rng.uniform(0.05, 0.25, n)
        present = rng.random(n) < 0.85
        roof = (_ROOF[rng.integers(0, len(_ROOF), n)] * rng.uniform(0.85, 1.12, (n, 1))).astype(np.float32)
        gable = rng.random(n) < 0.65
        ridge_u = rng.random(n) < 0.5
        acu, acv = rng.uniform(0.3, 0.7, n), rng.uniform(0.3, 0.7, n)
        sun_side = 1.0 if rng.random() < 0.5 else -1.0
        asphalt = np.array((104, 104, 106), np.float32) * rng.uniform(0.85, 1.1)
        meadow = np.array(self.palette[1], np.float32)

        is_street = (fu < street) | (fv < street)
        A0, A1, B0, B1 = a0[bid], a1[bid], b0[bid], b1[bid]
        lu = (fu - A0) / (A1 - A0)
        lv = (fv - B0) / (B1 - B0)
        bld = ~is_street & present[bid] & (lu >= 0) & (lu <= 1) & (lv >= 0) & (lv <= 1)
        yard = ~is_street & ~bld
        tex = self.noise(50)[iy, ix]
        col = np.empty((len(ix), 3), np.float32)
        col[yard] = meadow * (0.95 + 0.25 * (tex[yard, None] - 0.5))
        col[is_street] = asphalt * (1 + 0.06 * (tex[is_street, None] - 0.5))
        # roofs
        b = np.nonzero(bld)[0]
        bb = bid[b]
        lub, lvb = lu[b], lv[b]
        side = np.where(ridge_u[bb], lvb, lub)
        g = gable[bb]
        fac = np.where(g, np.where((side - 0.5) * sun_side > 0, 1.12, 0.84), 1.0)
        ridge = g & (np.abs(side - 0.5) < 0.04)
        wu, wv = (A1[b] - A0[b]) * pu, (B1[b] - B0[b]) * pv  # building size in px
        rim = ~g & ((np.minimum(lub, 1 - lub) * wu < 1.2) | (np.minimum(lvb, 1 - lvb) * wv < 1.2))
        ac = ~g & (np.abs(lub - acu[bb]) * wu < 1.6) & (np.abs(lvb - acv[bb]) * wv < 1.3)
        rc = roof[bb] * fac[:, None].astype(np.float32)
        rc[ridge] *= 0.8
        rc[rim] *= 0.78
        rc[ac] = (215, 215, 212)
        col[b] = rc
        self.img[iy, ix] = col
        surf = np.where(bld, BUILDING, URBAN).astype(np.uint8)
        self.surface[iy, ix] = surf
        self.bld_mask = self.surface == BUILDING
        self.bld_height = rng.uniform(4, 9) * self.px

    def building_shadows(self):
        bld = getattr(self, "bld_mask", None)
        if bld is None:
            return
        d = self.sun * self.bld_height * self.sun_k
        dx, dy = int(round(d[0])), int(round(d[1]))
        sh = np.zeros_like(bld)
        S = self.size
        sh[max(0, dy):S + min(0, dy), max(0, dx):S + min(0, dx)] = \
            bld[max(0, -dy):S - max(0, dy), max(0, -dx):S - max(0, dx)]
        sh &= ~bld & (self.surface != WATER)
        self.img[sh] *= 0.55

    def water(self):
        rng = self.rng
        n = self.noise(rng.integers(2, 4)) + 0.15 * self.noise(12)
        if rng.random() < 0.5:  # coast: a gradient towards one side
            ang = rng.uniform(0, 2 * math.pi)
            g = (self.X * math.cos(ang) + self.Y * math.sin(ang)) / self.size
            n = n + 1.2 * g
        t = float(np.quantile(n[::8, ::8], 1 - rng.uniform(0.18, 0.45)))
        water = n > t
        shore = (n > t - 0.018) & ~water & (self.surface != BUILDING)
        depth = np.clip((n - t) / 0.25, 0, 1)
        base = np.array([(48, 72, 88), (40, 66, 78), (52, 80, 76), (34, 52, 70)][rng.integers(0, 4)], np.float32)
        shallow = base * 1.35 + np.array((10, 14, 6), np.float32)
        col = shallow + (base - shallow) * depth[..., None]
        col = col * (1 + 0.05 * (self.noise(80)[..., None] - 0.5) + 0.04 * (self.noise(20)[..., None] - 0.5))
        self.img[water] = col[water]
        sand = np.array((196, 184, 150), np.float32) * rng.uniform(0.9, 1.05)
        self.img[shore] = sand
        self.surface[water] = WATER
        self.surface[shore] = GROUND
        if hasattr(self, "bld_mask"):
            self.bld_mask &= ~water

    def forest(self):
        rng = self.rng
        n = self.noise(4) + 0.3 * self.noise(16)
        t = np.quantile(n[::8, ::8], 1 - rng.uniform(0.08, 0.25))
        m = (n > t) & (self.surface == GROUND)
        tex = self.noise(self.size // 5) * 0.6 + self.noise(self.size // 12) * 0.4
        col = np.array((52, 78, 44), np.float32) * (0.7 + 0.6 * tex[..., None])
        self.img[m] = col[m]
        self.surface[m] = FOREST

    def make_roads(self, at_least_one: bool = False):
        rng, S = self.rng, self.size
        n_roads = int(rng.choice([0, 1, 2, 3], p=[0.08, 0.37, 0.38, 0.17]))
        n_roads = max(n_roads, int(at_least_one))
        base_th = self.grid_th + (0 if rng.random() < 0.5 else rng.uniform(0, math.pi))
        for i in range(n_roads):
            th = base_th + (i % 2) * math.pi / 2 if rng.random() < 0.7 else rng.uniform(0, math.pi)
            th += rng.normal(0, 0.03)
            p = rng.uniform(0.15 * S, 0.85 * S, 2)
            lanes = int(rng.choice([2, 2, 2, 4]))
            w = lanes * rng.uniform(3.2, 3.8) * self.px
            if any(abs(math.sin(th - r["th"])) < 0.3 and
                   abs((p[0] - r["p"][0]) * -math.sin(th) + (p[1] - r["p"][1]) * math.cos(th))
                   < (w + r["w"]) / 2 + 30 for r in self.roads):
                continue
            c, s = math.cos(th), math.sin(th)
            d = (self.X - p[0]) * -s + (self.Y - p[1]) * c
            al = (self.X - p[0]) * c + (self.Y - p[1]) * s
            ad = np.abs(d)
            shoulder = ad < w / 2 + 1.8
            asphalt = ad < w / 2
            self.img[shoulder & ~asphalt] = np.array((150, 146, 136), np.float32) * rng.uniform(0.9, 1.1)
            tone = np.array((88, 88, 92), np.float32) * rng.uniform(0.8, 1.25)
            self.img[asphalt] = tone * (1 + 0.08 * (self.noise(90)[asphalt, None] - 0.5))
            paint = np.array((222, 222, 214), np.float32)
            edge_line = (ad > w / 2 - 2.2) & (ad < w / 2 - 1.2)
            period = rng.uniform(5, 8) * self.px
            dash = np.mod(al, period) < period * 0.45
            lane_w = w / lanes
            marks = edge_line.copy()
            for k in range(1, lanes):
                off = -w / 2 + k * lane_w
                if lanes == 4 and k == 2:
                    marks |= np.abs(d - off) < 0.7  # solid centre line
                else:
                    marks |= (np.abs(d - off) < 0.55) & dash
            self.img[marks] = paint
            self.surface[shoulder] = ROAD
            if hasattr(self, "bld_mask"):
                self.bld_mask &= ~shoulder
            self.roads.append({"p": p, "th": th, "w": w, "lanes": lanes})

    def paint_pad(self, fr, colour, tex=0.08):
        sl, a, b, inside = fr
        region = self.img[sl]
        n = self.noise(self.size // 6)[sl]
        region[inside] = np.asarray(colour, np.float32) * (1 + tex * (n[inside, None] - 0.5))
        self.surface[sl][inside] = PAD
        if hasattr(self, "bld_mask"):
            self.bld_mask[sl][inside] = False

    # ----------------------------------------------------------------- clusters

    def car(self, cx, cy, th) -> _Obj:
        rng = self.rng
        L = float(np.clip(rng.uniform(3.9, 5.1) * self.px, 6, 14))
        W = L * rng.uniform(0.4, 0.47)
        return _Obj("small-vehicle", cx, cy, th, L, W, "car", 1.5 * self.px,
                    {"c": _colour(rng, _CAR_COLOURS, _CAR_P)})

    def truck(self, cx, cy, th) -> _Obj:
        rng = self.rng
        bus = rng.random() < 0.25
        L = float(np.clip(rng.uniform(9, 17) * self.px, 18, 40))
        W = float(np.clip(rng.uniform(2.4, 2.6) * self.px, 4, 9))
        p = {"bus": bus, "cab": _colour(rng, _TRUCK_CAB), "body": _colour(rng, _TRAILER)}
        return _Obj("large-vehicle", cx, cy, th, L, W, "truck", 3.5 * self.px, p)

    def parking_lot(self, large: bool):
        rng = self.rng
        if not self.roads:
            return
        r = self.roads[rng.integers(0, len(self.roads))]
        th = r["th"]
        if large:
            slen = float(np.clip(16 * self.px, 22, 44))
            sw = float(np.clip(4.2 * self.px, 8, 14))
        else:
            slen = float(np.clip(5.2 * self.px, 8, 16))
            sw = float(np.clip(2.6 * self.px, 5, 8))
        aisle = (8 if large else 6) * self.px
        pairs = int(rng.integers(1, 3 if large else 4))
        depth = pairs * (2 * slen + aisle) + 3
        length = rng.uniform(6, 22) * sw
        side = 1 if rng.random() < 0.5 else -1
        for _ in range(12):
            s0 = rng.uniform(-0.45, 0.45) * self.size * 1.2
            c, s = math.cos(th), math.sin(th)
            nrm = np.array([-s, c]) * side
            off = r["w"] / 2 + 2 + rng.uniform(1, 6) + depth / 2
            cen = r["p"] + np.array([c, s]) * s0 + nrm * off
            fr = self.reserve_pad(cen[0], cen[1], th, length / 2, depth / 2, max_building=1.0)
            if fr is not None:
                break
        else:
            return
        sl, a, b, inside = fr
        bb = b * side  # local across coordinate, increasing away from the road
        colour = np.array((95, 96, 100) if rng.random() < 0.7 else (150, 148, 142)) * rng.uniform(0.9, 1.1)
        self.paint_pad(fr, colour)
        # stall lines
        q = np.mod(bb + depth / 2 - 2, 2 * slen + aisle)
        rows = (q < 2 * slen) & (np.abs(bb) < depth / 2 - 1)
        lines = rows & (np.mod(a + length / 2, sw) < 0.9) & inside
        self.img[sl][lines] = (205, 205, 198)
        occupancy = rng.uniform(0.45, 0.95)
        n_stalls = int(length // sw)
        for pair in range(pairs):
            for row in range(2):
                bcen = -depth / 2 + 2 + pair * (2 * slen + aisle) + (row + 0.5) * slen
                for k in range(n_stalls):
                    if rng.random() > occupancy:
                        continue
                    acen = -length / 2 + (k + 0.5) * sw + rng.normal(0, 0.4)
                    bj = bcen + rng.normal(0, 0.6)
                    x = cen[0] + acen * c - bj * side * s
                    y = cen[1] + acen * s + bj * side * c
                    ang = th + side * math.pi / 2 + (math.pi if rng.random() < 0.5 else 0) + rng.normal(0, 0.05)
                    o = self.truck(x, y, ang) if large else self.car(x, y, ang)
                    if large:
                        o.length = min(o.length, slen - 2)
                    self.add(o, (PAD,), shrink=0.8)

    def tank_farm(self):
        rng = self.rng
        D = float(np.clip(rng.uniform(10, 30) * self.px, 12, 50))
        pitch = D * rng.uniform(1.3, 1.7)
        nx, ny = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        hl, hw = nx * pitch / 2 + 4, ny * pitch / 2 + 4
        th = self.grid_th if rng.random() < 0.5 else rng.uniform(0, math.pi)
        for _ in range(15):
            cx, cy = rng.uniform(0.1, 0.9, 2) * self.size
            fr = self.reserve_pad(cx, cy, th, hl, hw, max_building=0.3)
            if fr is not None:
                break
        else:
            return
        sl, a, b, inside = fr
        colour = np.array((168, 162, 146) if rng.random() < 0.5 else (150, 146, 138)) * rng.uniform(0.9, 1.1)
        self.paint_pad(fr, colour, tex=0.12)
        # dikes between tanks
        ga, gb = np.mod(a + nx * pitch / 2, pitch), np.mod(b + ny * pitch / 2, pitch)
        dike = inside & ((ga < 1.5) | (gb < 1.5)) & (np.abs(a) < nx * pitch / 2 + 1) & (np.abs(b) < ny * pitch / 2 + 1)
        self.img[sl][dike] *= 1.18
        top = _colour(rng, _TANK_TOP)
        c, s = math.cos(th), math.sin(th)
        for i in range(nx):
            for j in range(ny):
                if rng.random() < 0.12:
                    continue
                ua = -nx * pitch / 2 + (i + 0.5) * pitch
                vb = -ny * pitch / 2 + (j + 0.5) * pitch
                x, y = cx + ua * c - vb * s, cy + ua * s + vb * c
                d = D * (rng.uniform(0.9, 1.0) if rng.random() < 0.8 else rng.uniform(0.55, 0.8))
                self.add(self.tank(x, y, d, top), (PAD,), shrink=0.9)

    def tank(self, cx, cy, d, top=None) -> _Obj:
        rng = self.rng
        top = top if top is not None else _colour(rng, _TANK_TOP)
        top = _shade(top, rng.uniform(0.95, 1.05))
        p = {"top": top, "floating": rng.random() < 0.55}
        return _Obj("storage-tank", cx, cy, 0.0, d, d, "tank", d * rng.uniform(0.4, 0.8), p)

    def plane(self, cx, cy, th, L=None) -> _Obj:
        rng = self.rng
        if L is None:
            L = float(np.clip(rng.uniform(14, 55) * self.px, 30, 100))
        span = L * rng.uniform(0.85, 1.08)
        jet = L > 40 or rng.random() < 0.5
        body = _rgb(np.array((232, 232, 234)) * rng.uniform(0.82, 1.0))
        tail = body if rng.random() < 0.5 else _colour(rng, _TRUCK_CAB)
        p = {"jet": jet, "body": body, "tail": tail, "sweep": rng.uniform(0.12, 0.25) if jet else 0.02}
        return _Obj("plane", cx, cy, th, L, span, "plane", 3.0 * self.px, p)

    def apron(self):
        rng = self.rng
        L = float(np.clip(rng.uniform(18, 55) * self.px, 30, max(30.0, min(100.0, 0.3 * self.size))))
        gap = rng.uniform(0.1, 0.4) * L
        n = int(min(rng.integers(2, 7), max(1, 0.8 * self.size // (L * 1.05 + gap))))
        hl = n * (L * 1.05 + gap) / 2 + 5
        hw = L * 1.25
        th = self.grid_th if rng.random() < 0.5 else rng.uniform(0, math.pi)
        for _ in range(25):
            cx, cy = rng.uniform(0.2, 0.8, 2) * self.size
            fr = self.reserve_pad(cx, cy, th, hl, hw, max_water=0.06, max_road=0.08, max_building=0.6)
            if fr is not None:
                break
        else:
            return
        sl, a, b, inside = fr
        colour = np.array((176, 176, 170)) * rng.uniform(0.85, 1.1)
        self.paint_pad(fr, colour)
        slab = 5 * self.px
        joints = inside & ((np.mod(a, slab) < 0.7) | (np.mod(b, slab) < 0.7))
        self.img[sl][joints] *= 0.93
        yellow = np.array((215, 180, 60), np.float32)
        taxi = inside & (np.abs(b - hw * 0.55) < 0.8)
        self.img[sl][taxi] = yellow
        c, s = math.cos(th), math.sin(th)
        pitch = (2 * hl - 10) / n
        for k in range(n):
            ua = -hl + 5 + (k + 0.5) * pitch
            lead = inside & (np.abs(a - ua) < 0.7) & (b > -hw * 0.2) & (b < hw * 0.55)
            self.img[sl][lead] = yellow
            if rng.random() < 0.15:
                continue
            vb = -hw + L * 0.55 + 4
            x, y = cx + ua * c - vb * s, cy + ua * s + vb * c
            ang = th - math.pi / 2 + rng.normal(0, 0.04)  # nose towards -b (the terminal side)
            self.add(self.plane(x, y, ang, L * rng.uniform(0.85, 1.0)), (PAD,), shrink=0.9)
        # one taxiing plane along the taxi line
        if rng.random() < 0.4:
            ua = rng.uniform(-hl * 0.6, hl * 0.6)
            vb = hw * 0.55
            x, y = cx + ua * c - vb * s, cy + ua * s + vb * c
            self.add(self.plane(x, y, th + (math.pi if rng.random() < 0.5 else 0)), (PAD, GROUND, ROAD), 0.9)

    def ship(self, cx, cy, th, L=None) -> _Obj:
        rng = self.rng
        if L is None:
            L = float(np.clip(rng.lognormal(math.log(18), 0.55) * self.px, 15, 90))
        W = L * rng.uniform(0.2, 0.3) if L < 45 else L * rng.uniform(0.14, 0.2)
        cargo = L > 50 and rng.random() < 0.6
        p = {"hull": _colour(rng, _HULL), "deck": _colour(rng, _DECK), "cargo": cargo,
             "cabin": rng.uniform(-0.35, 0.1), "wake": 0.0}
        return _Obj("ship", cx, cy, th, L, W, "ship", 1.5 * self.px, p)

    def marina(self):
        rng = self.rng
        wy, wx = np.nonzero(self.surface[::4, ::4] == WATER)
        if len(wx) < 20:
            return
        boat_L = float(np.clip(rng.uniform(7, 16) * self.px, 15, 40))
        for _ in range(20):
            i = rng.integers(0, len(wx))
            p = np.array([wx[i], wy[i]], float) * 4
            th = rng.uniform(0, math.pi)
            plen = rng.uniform(2.5, 7) * boat_L
            c, s = math.cos(th), math.sin(th)
            t = np.linspace(-plen / 2, plen / 2, 24)
            xs, ys = p[0] + t * c, p[1] + t * s
            if xs.min() < 0 or ys.min() < 0 or xs.max() >= self.size or ys.max() >= self.size:
                continue
            on_water = self.surface[ys.astype(int), xs.astype(int)] == WATER
            if on_water.mean() >= 0.85:
                break
        else:
            return
        pw = float(np.clip(2.5 * self.px, 3, 7))
        fr = self.frame(p[0], p[1], th, plen / 2, pw / 2)
        if fr is None:
            return
        sl, a, b, inside = fr
        inside &= self.surface[sl] == WATER
        self.img[sl][inside] = np.array((150, 128, 98) if rng.random() < 0.5 else (170, 170, 166)) * rng.uniform(0.9, 1.1)
        self.surface[sl][inside] = PIER
        pier = _Obj(None, p[0], p[1], th, plen, pw)
        pier.corners = _corners(p[0], p[1], th, plen, pw)
        self.boxes = np.concatenate([self.boxes, pier.corners[None]])
        gap = rng.uniform(2, 6)
        for side in (-1, 1):
            ua = -plen / 2 + rng.uniform(2, 8)
            while ua < plen / 2:
                Lb = boat_L * rng.uniform(0.75, 1.15)
                ship = self.ship(0, 0, 0, Lb)
                if rng.random() < 0.85:
                    ua += ship.width / 2
                    vb = side * (pw / 2 + 1 + Lb / 2)
                    ang = th + side * math.pi / 2 + rng.normal(0, 0.05)
                    ship.th = ang
                    ship.cx, ship.cy = p[0] + ua * c - vb * s, p[1] + ua * s + vb * c
                    self.add(ship, (WATER,), shrink=0.85)
                ua += ship.width / 2 + gap

    def sea_ships(self):
        rng = self.rng
        wy, wx = np.nonzero(self.surface[::4, ::4] == WATER)
        if len(wx) < 10:
            return
        n = int(rng.integers(1, 8) * (len(wx) * 16 / (640 * 640 * 0.3)) ** 0.5) + 1
        for _ in range(n * 3):
            if n <= 0:
                break
            i = rng.integers(0, len(wx))
            x, y = wx[i] * 4 + rng.uniform(0, 4), wy[i] * 4 + rng.uniform(0, 4)
            o = self.ship(x, y, rng.uniform(0, 2 * math.pi))
            if rng.random() < 0.5:
                o.params["wake"] = rng.uniform(0.7, 2.0)
            if self.add(o, (WATER,)):
                n -= 1

    def road_traffic(self):
        rng = self.rng
        for r in self.roads:
            busy = rng.random() < 0.5
            n = int(rng.integers(8, 30) if busy else rng.integers(1, 8))
            n = int(n * self.size / 640) + 1
            c, s = math.cos(r["th"]), math.sin(r["th"])
            lanes, w = r["lanes"], r["w"]
            for _ in range(n):
                k = rng.integers(0, lanes)
                off = -w / 2 + (k + 0.5) * w / lanes
                forward = off > 0
                t = rng.uniform(-0.75, 0.75) * self.size
                x = r["p"][0] + t * c - off * s
                y = r["p"][1] + t * s + off * c
                ang = r["th"] + (0 if forward else math.pi) + rng.normal(0, 0.02)
                # queues: a few cars behind each other
                q = int(rng.integers(1, 5)) if busy and rng.random() < 0.4 else 1
                for j in range(q):
                    o = self.truck(x, y, ang) if rng.random() < 0.15 else self.car(x, y, ang)
                    if lanes == 2 and o.cls == "large-vehicle":
                        o.width = min(o.width, w / 2 - 1)
                    self.add(o, (ROAD,), shrink=0.9)
                    step = o.length + rng.uniform(2, 6)
                    x -= step * math.cos(ang)
                    y -= step * math.sin(ang)

    def sparse_land(self):
        rng = self.rng
        gy, gx = np.nonzero(self.surface[::4, ::4] == GROUND)
        if len(gx) < 10:
            return
        def spot():
            i = rng.integers(0, len(gx))
            return gx[i] * 4 + rng.uniform(0, 4), gy[i] * 4 + rng.uniform(0, 4)
        if rng.random() < 0.4:  # single tanks (farm silos, water tanks)
            for _ in range(int(rng.integers(1, 4)) * 4):
                x, y = spot()
                d = float(np.clip(rng.uniform(6, 14) * self.px, 12, 30))
                if self.add(self.tank(x, y, d), (GROUND,), 0.9) and rng.random() < 0.4:
                    break
        if rng.random() < 0.25:  # a small plane on a grass strip
            for _ in range(6):
                x, y = spot()
                if self.add(self.plane(x, y, rng.uniform(0, 2 * math.pi), rng.uniform(30, 40)), (GROUND,), 0.9):
                    break
        if rng.random() < 0.35:  # a parked truck or two beside fields / on tracks
            for _ in range(int(rng.integers(1, 4))):
                x, y = spot()
                self.add(self.truck(x, y, self.grid_th + rng.choice([0, math.pi / 2, math.pi])), (GROUND,))

    def urban_cars(self):
        rng = self.rng
        uy, ux = np.nonzero(self.surface[::2, ::2] == URBAN)
        if len(ux) < 50:
            return
        n = int(rng.integers(0, 25) * len(ux) * 4 / (640 * 640 * 0.3))
        for _ in range(n):
            i = rng.integers(0, len(ux))
            x, y = ux[i] * 2 + rng.uniform(0, 2), uy[i] * 2 + rng.uniform(0, 2)
            th = self.grid_th + rng.choice([0, math.pi / 2, math.pi, 1.5 * math.pi]) + rng.normal(0, 0.1)
            self.add(self.car(x, y, th), (URBAN,))

    def place_trees(self):
        rng = self.rng
        cand = (self.surface == GROUND) | (self.surface == URBAN)
        gy, gx = np.nonzero(cand[::3, ::3])
        if len(gx) == 0:
            return
        n = int(rng.integers(10, 120) * (self.size / 640) ** 2)
        idx = rng.integers(0, len(gx), n)
        for i in idx:
            r = rng.uniform(2.0, 5.0) * self.px * 0.5
            self.trees.append((gx[i] * 3 + rng.uniform(0, 3), gy[i] * 3 + rng.uniform(0, 3), r))
        # rows of trees along roads
        for road in self.roads:
            if rng.random() < 0.4:
                c, s = math.cos(road["th"]), math.sin(road["th"])
                side = rng.choice([-1, 1])
                off = side * (road["w"] / 2 + rng.uniform(4, 8))
                step = rng.uniform(6, 12)
                for t in np.arange(-self.size, self.size, step):
                    x = road["p"][0] + t * c - off * s
                    y = road["p"][1] + t * s + off * c
                    if 0 <= x < self.size and 0 <= y < self.size and cand[int(y), int(x)] and rng.random() < 0.8:
                        self.trees.append((x, y, rng.uniform(2.5, 4.5) * self.px * 0.5))

    # ----------------------------------------------------------------- objects

    def compose(self):
        rng, S = self.rng, self.size
        base = Image.fromarray(np.clip(self.img, 0, 255).astype(np.uint8))
        shadow = Image.new("L", (S, S), 0)
        sd = ImageDraw.Draw(shadow)
        glow = Image.new("L", (S, S), 0)
        gd = ImageDraw.Draw(glow)
        for o in self.objects:
            d = self.sun * o.height * self.sun_k
            if o.kind == "tank":
                r = o.length / 2
                for t in np.linspace(0, 1, 4):
                    x, y = o.cx + d[0] * t, o.cy + d[1] * t
                    sd.ellipse((x - r, y - r, x + r, y + r), fill=255)
            else:
                for poly in self.outline(o):
                    sd.polygon([(x + d[0], y + d[1]) for x, y in poly], fill=255)
            if o.kind == "ship" and o.params["wake"] > 0:
                wl = o.length * o.params["wake"]
                pts = [(-o.length / 2, -o.width * 0.4), (-o.length / 2 - wl, -o.width * 1.6 - wl * 0.12),
                       (-o.length / 2 - wl, o.width * 1.6 + wl * 0.12), (-o.length / 2, o.width * 0.4)]
                gd.polygon(_local(o, pts), fill=70)
                gd.polygon(_local(o, [(o.length * 0.45, 0), (-o.length / 2, -o.width * 0.9),
                                      (-o.length / 2, o.width * 0.9)]), fill=120)
        for x, y, r in self.trees:
            d = self.sun * r * 1.6 * self.sun_k
            sd.ellipse((x + d[0] - r, y + d[1] - r, x + d[0] + r, y + d[1] + r), fill=255)
        arr = np.asarray(base).astype(np.float32)
        sh = np.asarray(shadow.filter(ImageFilter.BoxBlur(1))).astype(np.float32) / 255.0
        if any(o.kind == "ship" and o.params["wake"] > 0 for o in self.objects):
            gl = np.asarray(glow.filter(ImageFilter.GaussianBlur(2))).astype(np.float32) / 255.0
            arr = arr + (235 - arr) * (gl[..., None] * 0.35)
        arr *= 1 - 0.48 * sh[..., None]
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for o in self.objects:
            getattr(self, "draw_" + o.kind)(draw, o)
        # trees over everything
        for x, y, r in self.trees:
            g = _rgb(np.array((48, 76, 40)) * rng.uniform(0.75, 1.25))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=g)
            h = self.sun * -r * 0.3
            r2 = r * 0.55
            draw.ellipse((x + h[0] - r2, y + h[1] - r2, x + h[0] + r2, y + h[1] + r2), fill=_shade(g, 1.25))
        self.mark_difficult()
        # optics and sensor
        blur = float(rng.uniform(0.45, 0.85))
        if self.keep_layers:
            self.colour = np.asarray(im)  # what the ground looks like before optics and sensor
        im = im.filter(ImageFilter.GaussianBlur(blur))
        arr = np.asarray(im).astype(np.float32)
        gain = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, 3)
        haze = rng.uniform(0, 18)
        arr = arr * gain.astype(np.float32) + haze
        noise = rng.standard_normal(arr.shape, dtype=np.float32)
        noise_sd = np.float32(rng.uniform(1.5, 4.0))
        arr += noise * noise_sd
        if self.keep_layers:
            self.optics = Optics(blur, gain, float(haze), float(noise_sd))
            self.sensed = arr  # before 8-bit quantisation: the 12-bit bands of `--bands rgbn`
        image = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
        labelled = [o for o in self.objects if o.cls is not None]
        return image, labelled, self.gsd

    def outline(self, o: _Obj) -> list[list[tuple[float, float]]]:
        L, W = o.length, o.width
        if o.kind == "plane":
            return self.plane_polys(o)
        if o.kind == "ship":
            return [self.hull(o, 1.0)]
        return [_local(o, _rect(-L / 2, L / 2, -W / 2, W / 2))]

    def mark_difficult(self):
        objs = [o for o in self.objects if o.cls is not None]
        if not objs:
            return
        if self.trees:
            t = np.array(self.trees)
            g = np.array([-1 / 3, 0, 1 / 3])
            gu, gv = np.meshgrid(g, g)
            for o in objs:
                c, s = math.cos(o.th), math.sin(o.th)
                u, v = gu.ravel() * o.length, gv.ravel() * o.width
                px = o.cx + u * c - v * s
                py = o.cy + u * s + v * c
                d2 = (px[:, None] - t[None, :, 0]) ** 2 + (py[:, None] - t[None, :, 1]) ** 2
                covered = (d2 < (t[None, :, 2] ** 2)).any(1).mean()
                if covered >= 0.55:
                    o.difficult = 1
        for o in objs:
            if max(o.length, o.width) < 7.0:
                o.difficult = 1

    # ----------------------------------------------------------------- renderers

    def draw_car(self, d: ImageDraw.ImageDraw, o: _Obj):
        L, W, col = o.length, o.width, o.params["c"]
        d.polygon(_local(o, [(-L / 2, -W / 2 + 0.4), (-L / 2 + 0.6, -W / 2), (L / 2 - 0.8, -W / 2),
                             (L / 2, -W / 2 + 0.6), (L / 2, W / 2 - 0.6), (L / 2 - 0.8, W / 2),
                             (-L / 2 + 0.6, W / 2), (-L / 2, W / 2 - 0.4)]), fill=col)
        glass = (38, 46, 56) if sum(col) > 200 else (90, 100, 112)
        d.polygon(_local(o, _rect(0.1 * L, 0.3 * L, -0.4 * W, 0.4 * W)), fill=glass)
        d.polygon(_local(o, _rect(-0.38 * L, -0.26 * L, -0.38 * W, 0.38 * W)), fill=glass)

    def draw_truck(self, d: ImageDraw.ImageDraw, o: _Obj):
        L, W, p = o.length, o.width, o.params
        if p["bus"]:
            d.polygon(_local(o, _rect(-L / 2, L / 2, -W / 2, W / 2)), fill=p["body"])
            d.polygon(_local(o, _rect(L / 2 - 1.5, L / 2, -W / 2, W / 2)), fill=(40, 48, 58))
            for u in (-0.25 * L, 0.05 * L):
                d.polygon(_local(o, _rect(u, u + 0.12 * L, -0.3 * W, 0.3 * W)), fill=_shade(p["body"], 0.8))
            return
        cab = max(3.0, min(0.2 * L, 2.6 * self.px))
        d.polygon(_local(o, _rect(L / 2 - cab, L / 2, -W / 2 * 0.95, W / 2 * 0.95)), fill=p["cab"])
        d.polygon(_local(o, _rect(L / 2 - cab * 0.45, L / 2 - cab * 0.2, -W * 0.4, W * 0.4)), fill=(40, 48, 58))
        d.polygon(_local(o, _rect(-L / 2, L / 2 - cab - 1, -W / 2, W / 2)), fill=p["body"])
        d.line(_local(o, [(-L / 2 + 1, 0), (L / 2 - cab - 2, 0)]), fill=_shade(p["body"], 0.88), width=1)

    def plane_polys(self, o: _Obj):
        L, S, p = o.length, o.width, o.params
        fw = max(2.0, 0.11 * L)
        sweep = p["sweep"] * L
        ur = 0.1 * L
        chord = 0.2 * L if p["jet"] else 0.14 * L
        tipc = 0.07 * L if p["jet"] else 0.11 * L
        fus = [(L / 2, 0), (L / 2 - 0.08 * L, -fw / 2), (-L / 2 + 0.12 * L, -fw / 2), (-L / 2, -fw * 0.2),
               (-L / 2, fw * 0.2), (-L / 2 + 0.12 * L, fw / 2), (L / 2 - 0.08 * L, fw / 2)]
        wing = [(ur, -fw / 2), (ur - sweep, -S / 2), (ur - sweep - tipc, -S / 2), (ur - chord, -fw / 2),
                (ur - chord, fw / 2), (ur - sweep - tipc, S / 2), (ur - sweep, S / 2), (ur, fw / 2)]
        ts, tr = 0.19 * S, -0.32 * L
        tail = [(tr, -fw / 2), (tr - sweep * 0.6 - 0.03 * L, -ts), (tr - sweep * 0.6 - 0.09 * L, -ts),
                (-L / 2 + 0.02 * L, -fw / 2), (-L / 2 + 0.02 * L, fw / 2),
                (tr - sweep * 0.6 - 0.09 * L, ts), (tr - sweep * 0.6 - 0.03 * L, ts), (tr, fw / 2)]
        return [_local(o, wing), _local(o, tail), _local(o, fus)]

    def draw_plane(self, d: ImageDraw.ImageDraw, o: _Obj):
        L, S, p = o.length, o.width, o.params
        wing, tail, fus = self.plane_polys(o)
        d.polygon(wing, fill=_shade(p["body"], 0.93))
        d.polygon(tail, fill=p["tail"])
        if p["jet"]:
            fw = max(2.0, 0.11 * L)
            for sgn in (-1, 1):
                v = sgn * (fw / 2 + 0.17 * S)
                u0 = 0.1 * L - p["sweep"] * L * (0.17 * S) / (S / 2) + 0.05 * L
                d.polygon(_local(o, _rect(u0 - 0.12 * L, u0, v - 0.03 * L, v + 0.03 * L)), fill=(90, 92, 98))
        d.polygon(fus, fill=p["body"])
        d.polygon(_local(o, _rect(L / 2 - 0.1 * L, L / 2 - 0.06 * L, -0.03 * L, 0.03 * L)), fill=(50, 58, 70))

    def draw_tank(self, d: ImageDraw.ImageDraw, o: _Obj):
        r, p = o.length / 2, o.params
        top = p["top"]
        x, y = o.cx, o.cy
        d.ellipse((x - r, y - r, x + r, y + r), fill=_shade(top, 0.72))
        ri = r * 0.86
        if p["floating"]:
            d.ellipse((x - ri, y - ri, x + ri, y + ri), fill=_shade(top, 0.55))
            off = self.sun * ri * 0.14
            r2 = ri * 0.86
            d.ellipse((x + off[0] - r2, y + off[1] - r2, x + off[0] + r2, y + off[1] + r2), fill=_shade(top, 0.92))
        else:
            d.ellipse((x - ri, y - ri, x + ri, y + ri), fill=top)
            ang = math.degrees(math.atan2(self.sun[1], self.sun[0]))
            d.pieslice((x - ri, y - ri, x + ri, y + ri), ang - 90, ang + 90, fill=_shade(top, 0.82))
            rc = max(0.8, r * 0.1)
            d.ellipse((x - rc, y - rc, x + rc, y + rc), fill=_shade(top, 0.7))

    def hull(self, o: _Obj, f: float):
        L, W = o.length * f, o.width * f
        bow = 0.28 * L
        return _local(o, [(L / 2, 0), (L / 2 - bow, -W / 2), (-L / 2 + 0.05 * L, -W / 2), (-L / 2, -W * 0.35),
                          (-L / 2, W * 0.35), (-L / 2 + 0.05 * L, W / 2), (L / 2 - bow, W / 2)])

    def draw_ship(self, d: ImageDraw.ImageDraw, o: _Obj):
        L, W, p = o.length, o.width, o.params
        d.polygon(self.hull(o, 1.0), fill=p["hull"])
        d.polygon(self.hull(o, 0.84), fill=p["deck"])
        if p["cargo"]:
            rng = self.rng
            nblk = int(max(2, L // 12))
            u0, u1 = -0.2 * L, 0.28 * L
            step = (u1 - u0) / nblk
            for k in range(nblk):
                c = _colour(rng, _CONTAINERS, jitter=10)
                d.polygon(_local(o, _rect(u0 + k * step + 0.5, u0 + (k + 1) * step - 0.5, -0.36 * W, 0.36 * W)), fill=c)
            d.polygon(_local(o, _rect(-0.42 * L, -0.3 * L, -0.4 * W, 0.4 * W)), fill=(228, 228, 226))
        else:
            u = p["cabin"] * L
            d.polygon(_local(o, _rect(u, u + 0.28 * L, -0.3 * W, 0.3 * W)), fill=(236, 236, 234))
            d.polygon(_local(o, _rect(u + 0.2 * L, u + 0.26 * L, -0.26 * W, 0.26 * W)), fill=(45, 52, 64))
