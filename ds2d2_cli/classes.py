"""Class lists: the one place dataset class names and their canonical order live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

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
            f"unknown class set {name!r}; available: {', '.join(CLASS_SETS)} "
            f"(or your own list, e.g. [{name},other])"
        ) from None


AUTO = "auto"  # data.classes: the training split's categories, in id order


def split_class_text(text: str) -> list[str] | None:
    """`[car, truck]` or `car,truck` -> the names; None for a single word (a set name or `auto`)."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
    elif "," not in stripped:
        return None
    return [part.strip().strip("'\"").strip() for part in stripped.split(",")]


@dataclass(frozen=True)
class ClassChoice:
    """What `--classes` / `data.classes` chose: a shipped set by name, or the user's own list.

    A named set is strict (a name outside it is bad input: DIOR labels under a DOTA set are
    caught); a list filters (objects of other classes are left out and counted) and orders.
    """

    names: tuple[str, ...]
    set_name: str | None = None

    @property
    def strict(self) -> bool:
        return self.set_name is not None

    @property
    def label(self) -> str:
        """How summaries and JSON name the choice: the set's name, or the list itself."""
        return self.set_name if self.set_name is not None else ",".join(self.names)


def check_class_list(names: Sequence[str], what: str = "class list") -> tuple[str, ...]:
    """A usable explicit class list: non-empty names, none twice (spelling-insensitively)."""
    from ds2d2_cli.errors import InputError

    cleaned = [str(n).strip() for n in names]
    if not cleaned or any(not n for n in cleaned):
        raise InputError(f"{what} has an empty class name (got {list(names)!r})")
    keys = [class_key(n) for n in cleaned]
    twice = sorted({n for n, k in zip(cleaned, keys) if keys.count(k) > 1})
    if twice:
        raise InputError(f"{what} names a class twice: {', '.join(twice)}")
    return tuple(cleaned)


def class_choice(value: str | Sequence[str], option: str = "--classes") -> ClassChoice:
    """A set name (`dior`), a list (`[car,truck]`, `car,truck`, or a Python list) -> ClassChoice."""
    if not isinstance(value, str):
        return ClassChoice(check_class_list(value, option))
    names = split_class_text(value)
    if names is not None:
        return ClassChoice(check_class_list(names, option))
    return ClassChoice(get_class_set(value.strip()), value.strip())
