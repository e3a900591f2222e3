"""Class lists: the one place dataset class names and their canonical order live."""

from __future__ import annotations

import re

DOTA_V1_0 = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
    "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
    "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
)
DOTA_V1_5 = DOTA_V1_0 + ("container-crane",)
DOTA_V2_0 = DOTA_V1_5 + ("airport", "helipad")

# DIOR's 20 classes in the order of the DIOR paper (alphabetical), one spelling each.
DIOR = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
    "expressway-service-area", "expressway-toll-station", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation",
    "vehicle", "windmill",
)

# The synthetic scenes borrow DOTA names so they go through the same DOTA path.
SYNTHETIC = ("small-vehicle", "large-vehicle", "plane", "storage-tank", "ship")

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "dota-v1.0": DOTA_V1_0,
    "dota-v1.5": DOTA_V1_5,
    "dota-v2.0": DOTA_V2_0,
    "dior": DIOR,
    "synthetic": SYNTHETIC,
}


def class_key(name: str) -> str:
    """Spelling-insensitive key: `Expressway-Service-area`, `expressway service area` -> same key."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def canonical_name(name: str, classes: tuple[str, ...] | list[str]) -> str | None:
    """The canonical spelling of `name` in `classes`, or None when it is not one of them."""
    key = class_key(name)
    for canonical in classes:
        if class_key(canonical) == key:
            return canonical
    return None


def get_class_set(name: str) -> tuple[str, ...]:
    from ds2d2_cli.errors import InputError

    try:
        return CLASS_SETS[name]
    except KeyError:
        raise InputError(
            f"unknown class set {name!r}; available: {', '.join(CLASS_SETS)}"
        ) from None
