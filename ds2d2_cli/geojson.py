"""Map coordinates out: detections of a georeferenced image as GeoJSON in the raster's CRS.

Box corners go through the raster's affine transform (rasterio's `transform.xy`), so a
detection lands where it is on the map, merged tiles included (they are merged in scene
pixels first). A rotated box (an oriented model's "rboxes") is its own 4 corners
(`rotated.rbox_to_poly`), not its envelope. GIS tools (GDAL, QGIS) read the CRS from the pre-RFC 7946 ``crs`` member.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ds2d2_cli.data.raster import RasterInfo

Detections = dict[str, Any]  # predict's: boxes [K, 4] xyxy in image pixels, scores [K], labels [K] (1..C),
# and for an oriented model rboxes [K, 5] (le90, image pixels)


def map_corners(boxes: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """`[K, 4]` pixel boxes (x1, y1, x2, y2, pixel edges) -> `[K, 5, 2]` closed map rings.

    Corners (x1, y1), (x2, y1), (x2, y2), (x1, y2) through the affine transform
    (x = a*col + b*row + c, y = d*col + e*row + f), as `map_rings` orders them (counter-clockwise
    on the map: on a north-up raster (x1, y1), (x1, y2), (x2, y2), (x2, y1), (x1, y1)).
    """
    x1, y1, x2, y2 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
    corners = np.stack([np.stack([x1, x2, x2, x1], axis=1), np.stack([y1, y1, y2, y2], axis=1)], axis=-1)
    return map_rings(corners, transform)


def map_rings(polygons: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """`[K, N, 2]` pixel polygons (x, y: positions, pixel (0, 0) spans 0..1) -> `[K, N + 1, 2]` closed
    map rings through the affine transform, each starting and ending at its first corner and
    running counter-clockwise on the map, as RFC 7946 asks of exterior rings (a ring that would
    run clockwise, as a positive image-axes polygon does on a north-up raster, is reversed)."""
    from affine import Affine
    from rasterio.transform import xy

    polygons = np.asarray(polygons, dtype=np.float64)
    if polygons.size == 0:
        return np.zeros((0, (polygons.shape[1] if polygons.ndim == 3 else 4) + 1, 2))
    ring = np.concatenate([polygons, polygons[:, :1]], axis=1)
    cols, rows = ring[..., 0], ring[..., 1]
    # offset "ul": fractional pixel coordinates are positions, the corner of pixel (0, 0) is (0, 0)
    xs, ys = xy(Affine(*transform[:6]), rows.ravel(), cols.ravel(), offset="ul")
    rings = np.stack([np.asarray(xs).reshape(cols.shape), np.asarray(ys).reshape(cols.shape)], axis=-1)
    local = rings - rings[:, :1]  # about the first corner: map coordinates are large, areas small
    area = (local[:, :-1, 0] * local[:, 1:, 1] - local[:, 1:, 0] * local[:, :-1, 1]).sum(axis=1)
    rings[area < 0] = rings[area < 0, ::-1]
    return rings


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

    One Polygon per detection (`map_corners`; a rotated box's own corners, `map_rings`), best
    score first, with properties ``class`` (name), ``label`` (category id, as in
    predictions.json), ``score``, ``image`` (file name) and ``image_id`` (its id in
    images.json), and for a rotated box ``rbox`` (le90 in image pixels, as predictions.json);
    the CRS as `crs_member` names it.
    """
    if not info.georeferenced:
        raise ValueError(f"{info.path} has no georeferencing")
    rboxes = detections.get("rboxes")
    if rboxes is not None:
        from ds2d2_cli.evaluation import rbox_row
        from ds2d2_cli.rotated import rbox_to_poly

        rboxes = rboxes.detach().cpu().double()
        rings = map_rings(rbox_to_poly(rboxes).numpy(), info.transform)
    else:
        rings = map_corners(detections["boxes"].detach().cpu().double().numpy(), info.transform)
    features = []
    for k, (ring, score, label) in enumerate(zip(rings, detections["scores"].tolist(),
                                                 detections["labels"].tolist())):
        label = int(label)
        properties = {"class": classes[label - 1] if 0 < label <= len(classes) else str(label),
                      "label": label, "score": round(float(score), 5), "image": info.path.name,
                      "image_id": image_id}
        if rboxes is not None:
            properties["rbox"] = rbox_row(rboxes[k].tolist())
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                         "properties": properties})
    return {"type": "FeatureCollection", "name": info.path.stem, **crs_member(info.crs), "features": features}
