"""The one image reader on 1-, 3-, 4- and 13-band files of uint8, uint16 and float32."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from PIL import Image

from ds2d2_cli.data.raster import probe, read_raster, resize_bands, window_transform, write_geotiff
from ds2d2_cli.data.validate import BadItem, check_image

UTM = "EPSG:32633"
TRANSFORM = (0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)


def _pixels(bands: int, dtype: str, h: int = 6, w: int = 5) -> np.ndarray:
    values = np.arange(bands * h * w).reshape(bands, h, w)
    if dtype == "float32":
        return (values / 7.0 - 3.0).astype(np.float32)
    return (values * (257 if dtype == "uint16" else 1) % np.iinfo(dtype).max).astype(dtype)


@pytest.mark.parametrize("bands", [1, 3, 4, 13])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_geotiff_round_trip(tmp_path, bands, dtype):
    pixels = _pixels(bands, dtype)
    path = tmp_path / "scene.tif"
    write_geotiff(path, pixels, crs=UTM, transform=TRANSFORM)
    info = probe(path)
    assert (info.width, info.height, info.count, info.dtype) == (5, 6, bands, dtype)
    assert info.crs == UTM and info.transform == TRANSFORM and info.georeferenced
    out = read_raster(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, pixels)
    window = read_raster(path, window=(1, 2, 3, 3))
    assert np.array_equal(window, pixels[:, 2:5, 1:4])
    assert check_image(path) == (5, 6)


def test_band_names_from_descriptions_or_colours_or_numbers(tmp_path):
    path = tmp_path / "a.tif"
    write_geotiff(path, _pixels(4, "uint16"), band_names=["red", "green", "blue", "nir"])
    assert probe(path).bands == ("red", "green", "blue", "nir")
    write_geotiff(path, _pixels(4, "uint16"))
    assert probe(path).bands == ("b1", "b2", "b3", "b4")
    assert not probe(path).georeferenced
    Image.fromarray(_pixels(3, "uint8").transpose(1, 2, 0)).save(tmp_path / "rgb.tif")
    assert probe(tmp_path / "rgb.tif").bands == ("red", "green", "blue")


def test_window_clipped_to_the_image(tmp_path):
    path = tmp_path / "a.tif"
    pixels = _pixels(2, "uint16")
    write_geotiff(path, pixels)
    assert np.array_equal(read_raster(path, window=(3, 4, 10, 10)), pixels[:, 4:, 3:])


def test_pil_formats(tmp_path):
    rgb = _pixels(3, "uint8").transpose(1, 2, 0)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    assert np.array_equal(read_raster(tmp_path / "a.png"), rgb.transpose(2, 0, 1))
    assert np.array_equal(read_raster(tmp_path / "a.bmp"), rgb.transpose(2, 0, 1))
    grey = read_raster(tmp_path / "grey.png")  # 8-bit grey is read as RGB, as before
    assert grey.shape == (3, 6, 5) and np.array_equal(grey[1], rgb[..., 0])
    deep = (np.arange(30).reshape(6, 5) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    info = probe(tmp_path / "deep.png")
    assert info.bands == ("b1",) and info.dtype == "uint16"
    assert np.array_equal(read_raster(tmp_path / "deep.png"), deep[None])


def test_decimated_read_and_resize(tmp_path):
    path = tmp_path / "a.tif"
    write_geotiff(path, np.full((2, 8, 8), 1000, np.uint16))
    out = read_raster(path, out_shape=(4, 4))
    assert out.shape == (2, 4, 4) and (out == 1000).all()
    assert (resize_bands(np.full((1, 4, 4), 7.5, np.float32), (2, 2)) == 7.5).all()


def test_window_transform_matches_rasterio(tmp_path):
    path = tmp_path / "a.tif"
    write_geotiff(path, _pixels(1, "uint8", 40, 40), crs=UTM, transform=TRANSFORM)
    with rasterio.open(path) as src:
        expected = tuple(src.window_transform(rasterio.windows.Window(8, 12, 16, 16)))[:6]
    assert window_transform(TRANSFORM, 8, 12) == pytest.approx(expected)


def test_unreadable_tiff_is_one_bad_item(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(BadItem, match="cannot read image"):
        probe(path)
    with pytest.raises(BadItem, match="image file not found"):
        probe(tmp_path / "missing.tif")
