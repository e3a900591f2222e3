"""Map coordinates out: detections of a georeferenced image as GeoJSON in the raster's CRS.

Box corners go through the raster's affine transform (rasterio's `transform.xy`), so a
detection lands where it is on the map, merged tiles included (they are merged in scene
pixels first). GIS tools (GDAL, QGIS) read the CRS from the pre-RFC 7946 ``crs`` member.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ds2d2_cli.data.raster import RasterInfo

Detections = dict[str, Any]  # predict's: boxes [K, 4] xyxy in image pixels, scores [K], labels [K] (1..C)


def map_corners(boxes: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """`[K, 4]` pixel boxes (x1, y1, x2, y2, pixel edges) -> `[K, 5, 2]` closed map rings.

    Corners (x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1) through the affine transform
    (x = a*col + b*row + c, y = d*col + e*row + f); on a north-up raster this ring runs
    counter-clockwise on the map, as RFC 7946 asks of exterior rings.
    """
    from affine import Affine
    from rasterio.transform import xy

    x1, y1, x2, y2 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
    cols = np.stack([x1, x2, x2, x1, x1], axis=1)
    rows = np.stack([y1, y1, y2, y2, y1], axis=1)
    if cols.size == 0:
        return np.zeros((0, 5, 2))
    # offset "ul": fractional pixel coordinates are positions, the corner of pixel (0, 0) is (0, 0)
    xs, ys = xy(Affine(*transform[:6]), rows.ravel(), cols.ravel(), offset="ul")
    return np.stack([np.asarray(xs).reshape(cols.shape), np.asarray(ys).reshape(cols.shape)], axis=-1)


def crs_member(crs: str) -> dict[str, Any]:
    """How a GeoJSON file names `crs` for GDAL and QGIS: the pre-RFC 7946 ``crs`` member
    (``urn:ogc:def:crs:EPSG::<code>``) when the CRS has an EPSG code, else ``crs_wkt``
    (its WKT), a member of our own, since GeoJSON has no place for a CRS without a code."""
    from rasterio.crs import CRS

    parsed = CRS.from_user_input(crs)
    code = parsed.to_epsg()
    if code is not None:
        return {"crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{code}"}}}
    return {"crs_wkt": parsed.to_wkt()}


def detections_geojson(detections: Detections, classes: Sequence[str], info: RasterInfo,
                       image_id: int | None = None) -> dict[str, Any]:
    """A georeferenced image's detections as a GeoJSON FeatureCollection in its CRS.

    One Polygon per detection (`map_corners`), best score first, with properties ``class``
    (name), ``label`` (category id, as in predictions.json), ``score``, ``image`` (file
    name) and ``image_id`` (its id in images.json); the CRS as `crs_member` names it.
    """
    if not info.georeferenced:
        raise ValueError(f"{info.path} has no georeferencing")
    rings = map_corners(detections["boxes"].detach().cpu().double().numpy(), info.transform)
    features = []
    for ring, score, label in zip(rings, detections["scores"].tolist(), detections["labels"].tolist()):
        label = int(label)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
            "properties": {"class": classes[label - 1] if 0 < label <= len(classes) else str(label),
                           "label": label, "score": round(float(score), 5), "image": info.path.name,
                           "image_id": image_id},
        })
    return {"type": "FeatureCollection", "name": info.path.stem, **crs_member(info.crs), "features": features}
