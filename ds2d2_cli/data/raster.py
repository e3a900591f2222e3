"""The one image reader: any supported file as stored bands `[C, H, W]`, whole or one window.

* PNG, JPEG and BMP go through PIL. 8-bit images are read as RGB, as they always were
  (grey is repeated, palettes expanded, alpha dropped): aerial datasets mix grey and colour
  scenes (DOTA has both) and an RGB model reads them all. 16-bit and float single-channel
  PNGs (PIL modes I;16, I, F) are one band, ``b1``.
* TIFF and GeoTIFF go through rasterio (GDAL): 8-bit, 16-bit or float, any number of
  bands, with the georeferencing (CRS and affine transform) when the file has it. Windows
  are read from the file, not from a decoded copy, so scenes larger than memory can be cut
  and predicted on. Alpha bands are dropped; a palette band is expanded to RGB.

Band names come from the file when it names them (GeoTIFF band descriptions, or a
red/green/blue colour interpretation), else ``b1 .. bN``; `prepare-data --band-names`
renames them. `SampleSpec.to_float` turns what this returns into the model's floats.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ds2d2_cli.data.validate import BadItem, no_pixel_limit, open_rgb, unsupported_extension
from ds2d2_cli.errors import one_line
from ds2d2_cli.sample import RGB

TIFF_EXTS = (".tif", ".tiff")
PIL_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
HIGH_DEPTH_MODES = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}
Window = tuple[int, int, int, int]  # left, top, width, height in pixels


@dataclass(frozen=True)
class RasterInfo:
    """What a file holds, from its header: size, bands, storage type and georeferencing."""

    path: Path
    width: int
    height: int
    bands: tuple[str, ...]
    dtype: str
    crs: str | None = None  # as rasterio writes it: "EPSG:32633", or WKT when there is no code
    transform: tuple[float, ...] | None = None  # pixel -> map: x = a*col + b*row + c, y = d*col + e*row + f

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    @property
    def count(self) -> int:
        return len(self.bands)


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTS


def _rasterio():
    import rasterio  # a dependency: GeoTIFF is how multispectral and SAR scenes come

    return rasterio


@contextlib.contextmanager
def open_tiff(path: Path) -> Iterator[Any]:
    """rasterio's reader, quiet about files without georeferencing (plain TIFFs are fine)."""
    rasterio = _rasterio()
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            yield src


def _raster_error(exc: Exception, path: Path) -> BadItem:
    if not path.exists():
        return BadItem("image file not found", path, reason="missing image")
    if path.is_dir():
        return BadItem("a folder, not an image file", path, reason="unreadable image")
    text = one_line(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return BadItem(f"cannot read image: {text or type(exc).__name__}", path, reason="unreadable image")


def _tiff_layout(src: Any) -> tuple[list[int], tuple[str, ...], bool]:
    """Which bands to read (1-based, alpha dropped), their names, and whether band 1 is a palette."""
    from rasterio.enums import ColorInterp

    interp = list(src.colorinterp)
    if src.count == 1 and interp[0] == ColorInterp.palette:
        return [1], RGB, True
    keep = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha] or [1]
    descriptions = [src.descriptions[i - 1] for i in keep]
    if all(descriptions) and len(set(descriptions)) == len(descriptions):
        return keep, tuple(str(d) for d in descriptions), False
    colours = tuple(interp[i - 1].name for i in keep)
    if colours == RGB:
        return keep, RGB, False
    return keep, tuple(f"b{i}" for i in range(1, len(keep) + 1)), False


def probe(path: str | Path) -> RasterInfo:
    """The header of an image file; BadItem for a missing, unreadable or unsupported one."""
    path = Path(path)
    if is_tiff(path):
        try:
            with open_tiff(path) as src:
                keep, names, palette = _tiff_layout(src)
                dtype = "uint8" if palette else str(src.dtypes[keep[0] - 1])
                if len({src.dtypes[i - 1] for i in keep}) > 1:
                    raise BadItem(f"bands of different types ({', '.join(sorted(set(src.dtypes)))}); "
                                  "ds2d2 reads one type per image", path, reason="unreadable image")
                crs = src.crs.to_string() if src.crs else None
                transform = tuple(src.transform)[:6] if src.crs and not src.transform.is_identity else None
                if src.width <= 0 or src.height <= 0:
                    raise BadItem(f"image has no pixels ({src.width}x{src.height})", path, reason="unreadable image")
                return RasterInfo(path, int(src.width), int(src.height), names, dtype, crs, transform)
        except BadItem:
            raise
        except Exception as exc:  # noqa: BLE001 - rasterio raises its own RasterioIOError and friends
            raise _raster_error(exc, path) from None
    if path.suffix.lower() not in PIL_EXTS:
        raise unsupported_extension(path)
    from ds2d2_cli.data.validate import _check_format, _image_error, _pil

    Image, _ = _pil()
    try:
        with no_pixel_limit(), Image.open(path) as img:
            _check_format(img, path)
            dtype = HIGH_DEPTH_MODES.get(img.mode)
            bands = ("b1",) if dtype else RGB
            return RasterInfo(path, int(img.size[0]), int(img.size[1]), bands, dtype or "uint8")
    except BadItem:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _image_error(exc, path) from None


def read_raster(path: str | Path, window: Window | None = None,
                out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Stored pixels `[C, H, W]` of the whole image or of `window` (clipped to the image).

    `out_shape` (height, width) resamples what is read, bilinearly (GDAL's for TIFF, PIL's
    otherwise): a decimated read of a large scene costs the memory of the result only.
    """
    path = Path(path)
    if is_tiff(path):
        return _read_tiff(path, window, out_shape)
    if path.suffix.lower() not in PIL_EXTS:
        raise unsupported_extension(path)
    info = probe(path)
    if info.dtype == "uint8":
        image = open_rgb(path)
        if window is not None:
            left, top, width, height = _clip(window, info)
            image = image.crop((left, top, left + width, top + height))
        if out_shape is not None:
            from PIL import Image

            image = image.resize((out_shape[1], out_shape[0]), Image.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)
    from ds2d2_cli.data.validate import _image_error, _pil

    Image, _ = _pil()
    try:
        with no_pixel_limit(), Image.open(path) as img:
            img.load()
            array = np.asarray(img).astype(info.dtype, copy=False)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _image_error(exc, path) from None
    array = array[None]
    if window is not None:
        left, top, width, height = _clip(window, info)
        array = array[:, top:top + height, left:left + width]
    if out_shape is not None:
        array = resize_bands(array, out_shape)
    return array


def _clip(window: Window, info: RasterInfo) -> Window:
    left, top, width, height = window
    left, top = max(0, left), max(0, top)
    width = max(0, min(left + width, info.width) - left)
    height = max(0, min(top + height, info.height) - top)
    return left, top, width, height


def _read_tiff(path: Path, window: Window | None, out_shape: tuple[int, int] | None) -> np.ndarray:
    from rasterio.enums import Resampling
    from rasterio.windows import Window as RioWindow

    try:
        with open_tiff(path) as src:
            keep, _, palette = _tiff_layout(src)
            rio_window = None
            if window is not None:
                info = RasterInfo(path, src.width, src.height, (), "")
                left, top, width, height = _clip(window, info)
                rio_window = RioWindow(left, top, width, height)
            shape = None if out_shape is None else (len(keep), *out_shape)
            array = src.read(keep, window=rio_window, out_shape=shape,
                             resampling=Resampling.bilinear if out_shape is not None else Resampling.nearest)
            if palette:
                table = np.zeros((256, 3), np.uint8)
                for value, colour in src.colormap(1).items():
                    if 0 <= value < 256:
                        table[value] = colour[:3]
                array = table[array[0]].transpose(2, 0, 1)
            return array
    except BadItem:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _raster_error(exc, path) from None


def resize_bands(array: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """`[C, H, W]` resized bilinearly band by band (PIL, in float), back in the stored type."""
    from PIL import Image

    height, width = out_shape
    bands = [np.asarray(Image.fromarray(band.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
             for band in array]
    out = np.stack(bands)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


def write_geotiff(path: str | Path, array: np.ndarray, *, crs: str | None = None,
                  transform: Sequence[float] | None = None, band_names: Sequence[str] | None = None) -> None:
    """`[C, H, W]` as a lossless (deflate) GeoTIFF keeping its type; georeferenced when given."""
    rasterio = _rasterio()
    from affine import Affine

    # MINISBLACK: GDAL would otherwise mark a 4th 8-bit band as alpha, and readers (ours too) drop alpha.
    profile: dict[str, Any] = {"driver": "GTiff", "count": array.shape[0], "height": array.shape[1],
                               "width": array.shape[2], "dtype": str(array.dtype), "compress": "deflate",
                               "photometric": "MINISBLACK"}
    if crs is not None and transform is not None:
        profile.update(crs=crs, transform=Affine(*transform[:6]))
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(array)
            if band_names:
                for index, name in enumerate(band_names, start=1):
                    dst.set_band_description(index, name)


def window_transform(transform: Sequence[float], left: float, top: float, scale: float = 1.0) -> tuple[float, ...]:
    """The transform of a window starting at (left, top) of an image resized by `scale`.

    A patch pixel (c, r) is image pixel ((left + c) / scale, (top + r) / scale).
    """
    from affine import Affine

    moved = Affine(*transform[:6]) @ Affine.scale(1.0 / scale) @ Affine.translation(left, top)
    return tuple(moved)[:6]
