"""`prepare-data synthetic --bands`: rgb unchanged, rgbn's NIR and sar's VV derived from the same scenes."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app

from ds2d2_cli.classes import SYNTHETIC
from ds2d2_cli.data import synthetic_bands as sb
from ds2d2_cli.data.raster import probe, read_raster
from ds2d2_cli.data.synthetic import generate_synthetic
from ds2d2_cli.errors import InputError

SEED, IMAGES, SIZE = 5, 3, 192

# sha256 over (file name, decoded pixels) of the PNGs and (file name, bytes) of the label files of
# generate_synthetic(images=3, size=128, seed=11), recorded at e21c198, before --bands existed.
RGB_REFERENCE = "4eb714f58a412dc738e45f86c3eef1766029811d216e02afa4a8b96a3e9c786e"


def _content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix == ".png":
            h.update(p.name.encode())
            with Image.open(p) as im:
                h.update(np.asarray(im).tobytes())
        elif p.suffix == ".txt":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _labels(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.txt"))}


def _images(root: Path, ext: str) -> list[Path]:
    return sorted(root.glob(f"*/images/*{ext}"))


@pytest.fixture(scope="module")
def made(module_tmp) -> dict[str, Path]:
    root = module_tmp("bands")
    return {bands: (generate_synthetic(root / bands, images=IMAGES, size=SIZE, seed=SEED, bands=bands), root / bands)[1]
            for bands in ("rgb", "rgbn", "sar")}


@functools.cache
def _rendered(bands: str) -> list[sb.BandScene]:
    """The scenes generate_synthetic(seed=SEED) writes, with their material maps (same seeding)."""
    children = np.random.SeedSequence(SEED).spawn(IMAGES)
    return [sb.render_bands(np.random.default_rng(c), np.random.default_rng(c.spawn(1)[0]), SIZE,
                            SYNTHETIC[i % len(SYNTHETIC)], bands) for i, c in enumerate(children)]


def test_rgb_is_unchanged(tmp_path):
    generate_synthetic(tmp_path / "d", images=3, size=128, seed=11, bands="rgb")
    assert _content_hash(tmp_path / "d") == RGB_REFERENCE
    assert not list((tmp_path / "d").rglob("*.tif"))


def test_same_labels_in_every_mode(made):
    rgb = _labels(made["rgb"])
    assert len(rgb) == IMAGES
    assert _labels(made["rgbn"]) == rgb and _labels(made["sar"]) == rgb
    for bands in ("rgbn", "sar"):
        assert [p.stem for p in _images(made[bands], ".tif")] == [p.stem for p in _images(made["rgb"], ".png")]
        assert not _images(made[bands], ".png")


def test_rgbn_files(made):
    rgb_pngs = _images(made["rgb"], ".png")
    for i, (tif, scene) in enumerate(zip(_images(made["rgbn"], ".tif"), _rendered("rgbn"))):
        info = probe(tif)
        assert info.bands == ("red", "green", "blue", "nir") and info.dtype == "uint16"
        assert (info.width, info.height) == (SIZE, SIZE)
        assert info.georeferenced and info.crs == "EPSG:32633"
        gsd = float((tif.parent.parent / "labelTxt" / f"{tif.stem}.txt").read_text().splitlines()[1][4:])
        assert info.transform == pytest.approx((gsd, 0, 300_000 + 10_000 * i, 0, -gsd, 5_300_000), abs=1e-6)
        array = read_raster(tif)
        assert np.array_equal(array, scene.array)
        assert array.max() <= 4095
        # the RGB bands are the rgb scene in 12 bits: back to 8 bits, within one level
        with Image.open(rgb_pngs[i]) as im:
            rgb8 = np.asarray(im).transpose(2, 0, 1).astype(int)
        back = np.rint(array[:3] * (255 / 4095)).astype(int)
        assert np.abs(back - rgb8).max() <= 1 and (back == rgb8).mean() > 0.95


def test_nir_separates_vegetation_from_paint(made):
    nir: dict[str, list[np.ndarray]] = {"tree": [], "metal": [], "green paint": [], "water": [], "paved": []}
    for scene in _rendered("rgbn"):
        m, colour = scene.materials, scene.colour.astype(float)
        tree = m == sb.TREE
        # painted metal coloured like this scene's trees: green cars, truck cabs and trailers
        green = (m == sb.METAL) & (sb.greenness(scene.colour) > 0.25) & \
            (np.linalg.norm(colour - colour[tree].mean(0), axis=-1) < 30)
        for name, mask in (("tree", tree), ("metal", m == sb.METAL), ("green paint", green),
                           ("water", m == sb.WATER), ("paved", m == sb.PAVED)):
            nir[name].append(scene.array[3][mask].astype(float))
        if green.any():
            # in the RGB bands the paint sits inside the trees' own spread, other metal far outside it
            rgb = scene.array[:3].transpose(1, 2, 0).astype(float)
            centre = rgb[tree].mean(0)
            spread = np.sqrt(((rgb[tree] - centre) ** 2).sum(-1).mean())
            assert np.linalg.norm(rgb[green].mean(0) - centre) < 1.5 * spread
            assert np.linalg.norm(rgb[m == sb.METAL].mean(0) - centre) > 3 * spread
    mean = {k: np.concatenate(v).mean() for k, v in nir.items()}
    assert sum(len(v) for v in nir["green paint"]) >= 50
    assert mean["tree"] > 2 * mean["metal"]
    assert mean["tree"] > 3 * mean["green paint"]  # only NIR tells them apart
    assert mean["water"] < 0.1 * 4095 and mean["water"] < 0.25 * mean["paved"]


def test_sar_file_and_backscatter(made):
    water, land, metal = [], [], []
    for i, (tif, scene) in enumerate(zip(_images(made["sar"], ".tif"), _rendered("sar"))):
        info = probe(tif)
        assert info.bands == ("vv",) and info.dtype == "float32" and info.georeferenced
        array = read_raster(tif)
        assert np.array_equal(array, scene.array)
        vv, m = array[0], scene.materials
        assert (vv > 0).all()
        water.append(vv[m == sb.WATER])
        land.append(vv[m == sb.LAND])
        metal.append(vv[m == sb.METAL])
        assert vv[m == sb.METAL].max() > 1  # corner reflectors
    med = [float(np.median(np.concatenate(v))) for v in (water, land, metal)]
    assert 0.001 < med[0] < 0.01 and 0.02 < med[1] < 0.1 and med[2] > 0.2
    assert med[0] < med[1] < med[2]


def test_sar_speckle_has_the_looks():
    # open water away from its shore and from ships: one sigma0 up to a slow wind modulation,
    # so its spread is the speckle's, 1/sqrt(4 looks) = 0.5
    covs = []
    for scene in _rendered("sar"):
        water = (scene.materials == sb.WATER).astype(np.uint8) * 255
        open_water = np.asarray(Image.fromarray(water).filter(ImageFilter.MinFilter(9))) > 0
        if open_water.sum() > 1000:
            v = scene.array[0][open_water].astype(np.float64)
            covs.append(v.std() / v.mean())
    assert covs
    assert all(abs(c - 1 / np.sqrt(sb.LOOKS)) < 0.04 for c in covs), covs


def test_switching_modes_leaves_one_image_per_label(tmp_path):
    out = tmp_path / "d"
    generate_synthetic(out, images=2, size=64, seed=1)
    generate_synthetic(out, images=2, size=64, seed=1, bands="sar")
    assert sorted(p.name for p in out.rglob("P*.*")) == ["P0000.tif", "P0000.txt", "P0001.tif", "P0001.txt"]
    generate_synthetic(out, images=2, size=64, seed=1)
    assert sorted(p.name for p in out.rglob("P*.*")) == ["P0000.png", "P0000.txt", "P0001.png", "P0001.txt"]


def test_unknown_bands_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="--bands must be one of rgb, rgbn, sar"):
        generate_synthetic(tmp_path / "bad", images=2, size=64, bands="nir")
    assert not (tmp_path / "bad").exists()


def test_cli_bands(tmp_path):
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(app, ["prepare-data", "synthetic", "--out", str(out), "--images", "2", "--size", "64",
                                 "--bands", "rgbn"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.rglob("*.tif")) == ["P0000.tif", "P0001.tif"]
    result = runner.invoke(app, ["prepare-data", "synthetic", "--out", str(tmp_path / "t"), "--bands", "nir"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error: ")] == \
        ["error: --bands must be one of rgb, rgbn, sar (got 'nir')"]
    assert not (tmp_path / "t").exists()
