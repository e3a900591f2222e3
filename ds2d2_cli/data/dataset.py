"""A torch Dataset over a prepared COCO JSON, with the remote-sensing augmentations.

Images are returned at their stored size as float tensors, the run's bands scaled as the
data's `SampleSpec` says ([0, 1] for 8-bit RGB); resizing to the preset input size and
normalisation happen inside the torchvision detector's transform, so predictions come
back in image pixels. Boxes are torchvision `tv_tensors.BoundingBoxes` and the
augmentations are torchvision's v2 functionals, so a box format the spec names is
flipped and turned by the library that defines it. Augmentation randomness is a pure
function of (seed, sample index, epoch), so runs are reproducible and resumable with
any number of loader workers.

Rotated boxes (`rboxes=True`, data prepared with `--boxes obb`): `target["rboxes"]` is a
float32 `[N, 5]` tensor of the annotations' `rbox` in the le90 convention
(`ds2d2_cli.rotated`), and `target["boxes"]` their envelopes; flips and quarter turns move
them by exact arithmetic (`augment_rboxes`) and the envelopes are taken again after.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F

from ds2d2_cli.config import InputConfig
from ds2d2_cli.data.prepared import SCENES_SUFFIX
from ds2d2_cli.errors import InputError, one_line
from ds2d2_cli.rotated import normalize_le90, rbox_envelope
from ds2d2_cli.sample import SampleSpec, bands_text

AUGMENTATIONS = ("hflip", "vflip", "rot90")


@dataclass(frozen=True)
class CocoSplit:
    """The parsed JSON of one prepared split, indexed for fast per-image access."""

    path: Path
    images: list[dict[str, Any]]
    annotations_by_image: dict[int, list[dict[str, Any]]]
    categories: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def image_path(self, image: dict[str, Any]) -> Path:
        return (self.path.parent / image["file_name"]).resolve()

    @property
    def sample(self) -> SampleSpec:
        """How this split's pixels are stored (`info["sample"]`; 8-bit RGB for data prepared before bands)."""
        recorded = self.info.get("sample")
        if recorded is None:
            return SampleSpec()
        try:
            return SampleSpec.model_validate(recorded)
        except ValueError as exc:
            raise InputError(f"info.sample is damaged ({one_line(exc)})", self.path) from None


def split_json_path(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}.json"
    if not Path(data_dir).is_dir():
        raise InputError("prepared data folder not found (run `ds2d2 prepare-data` first or pass --data)", data_dir)
    if split.endswith(SCENES_SUFFIX) and path.is_file():
        # The whole scenes behind a patch split: only for merging patch detections back per scene.
        patches = split[: -len(SCENES_SUFFIX)]
        raise InputError(f"{split}.json holds the whole scenes behind split {patches!r}; score them with "
                         f"--split {patches} --merge-patches", data_dir)
    if not path.is_file():
        found = sorted(p.stem for p in Path(data_dir).glob("*.json") if not p.stem.endswith(SCENES_SUFFIX))
        raise InputError(f"no split {split!r} here (found: {', '.join(found) or 'none'})", data_dir)
    return path


def load_coco_split(path: str | Path) -> CocoSplit:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable COCO JSON file: {exc}", path) from None
    try:
        images = list(data["images"])
        categories = sorted(data["categories"], key=lambda c: c["id"])
        by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in images}
        for ann in data.get("annotations", []):
            if ann["image_id"] not in by_image:
                raise InputError(f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}", path)
            by_image[ann["image_id"]].append(ann)
    except (KeyError, TypeError) as exc:
        raise InputError(f"not a COCO detection file (missing {exc})", path) from None
    if [c["id"] for c in categories] != list(range(1, len(categories) + 1)):
        raise InputError("category ids must be 1..K (prepare the data with `ds2d2 prepare-data`)", path)
    return CocoSplit(path, images, by_image, categories, data.get("info", {}) or {})


def read_image(path: Path, spec: SampleSpec = SampleSpec(), bands: Sequence[str] | None = None) -> torch.Tensor:
    """Float32 `[len(bands), H, W]` as `spec` reads the file's stored pixels (all its bands by default).

    A one-line InputError names a file that is unreadable or stored differently from `spec`
    (other band count or storage type), rather than a shape error deep inside the model.
    """
    return spec.to_float(read_pixels(path, spec), bands)


def read_pixels(path: Path, spec: SampleSpec) -> torch.Tensor:
    """The file's stored pixels `[C, H, W]` in their storage type, checked against `spec`."""
    from ds2d2_cli.data.raster import probe, read_raster

    array = read_raster(path)
    if array.shape[0] != len(spec.bands) or array.dtype != np.dtype(spec.dtype):
        info = probe(path)
        raise InputError(f"has {bands_text(info.bands, info.dtype)}; the data's images have "
                         f"{bands_text(spec.bands, spec.dtype)}", path)
    # np.array keeps the layout (PIL's is height, width, band) and makes PIL's read-only view writable.
    return torch.from_numpy(np.array(array))


class Rot90(Transform):
    """`turns` quarter turns counter-clockwise (torch.rot90's direction) of images and boxes.

    Images go through `F.rotate(image, 90, expand=True)`, which is torch.rot90 exactly.
    XYXY boxes are permuted per turn, `[y1, W - x2, y2, W - x1]` with W the width before
    the turn: exact, where `F.rotate`'s box path goes through an affine matrix with
    cos(90°) = 6e-17 and comes out an ulp off (a box at x = 0 lands at 1e-14), which would
    change training. Other formats (rotated boxes) go through `F.rotate`.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.BoundingBoxes)

    def __init__(self, turns: int):
        super().__init__()
        self.turns = turns

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        for _ in range(self.turns):
            if isinstance(inpt, tv_tensors.BoundingBoxes) and inpt.format == tv_tensors.BoundingBoxFormat.XYXY:
                height, width = inpt.canvas_size
                turned = torch.stack([inpt[:, 1], width - inpt[:, 2], inpt[:, 3], width - inpt[:, 0]], dim=1)
                inpt = tv_tensors.wrap(turned, like=inpt, canvas_size=(width, height))
            else:
                inpt = F.rotate(inpt, 90, expand=True)
        return inpt


def augmentation(ops: Sequence[str], rng: np.random.Generator) -> tuple[bool, bool, int]:
    """What `ops` (a subset of AUGMENTATIONS) do to one sample: (hflip, vflip, quarter turns).

    One hflip draw, one vflip draw, then 0-3 quarter turns, each only when its op is on; the
    draws and their order are part of every run's reproducibility.
    """
    hflip = "hflip" in ops and rng.random() < 0.5
    vflip = "vflip" in ops and rng.random() < 0.5
    turns = int(rng.integers(0, 4)) if "rot90" in ops else 0
    return bool(hflip), bool(vflip), turns


def augment(image: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, ops: Sequence[str],
            rng: np.random.Generator) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    """`ops` applied at random (`augmentation`) to an image and its boxes."""
    return apply_augmentation(image, boxes, *augmentation(ops, rng))


def apply_augmentation(image: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, hflip: bool, vflip: bool,
                       turns: int) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    if hflip:
        image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
    if vflip:
        image, boxes = F.vertical_flip(image), F.vertical_flip(boxes)
    if turns:
        image, boxes = Rot90(turns)(image, boxes)
    return image, boxes


def augment_rboxes(rboxes: torch.Tensor, canvas_size: tuple[int, int], hflip: bool, vflip: bool,
                   turns: int) -> torch.Tensor:
    """le90 boxes `[N, 5]` on a (height, width) canvas moved as `apply_augmentation` moves the image.

    A flip mirrors the centre and negates theta; a quarter turn counter-clockwise (torch.rot90's)
    sends the centre (x, y) to (y, W - x) and theta to theta - pi/2, W the width before it.
    The result is in le90 form again.
    """
    height, width = canvas_size
    cx, cy, w, h, theta = rboxes.unbind(-1)
    if hflip:
        cx, theta = width - cx, -theta
    if vflip:
        cy, theta = height - cy, -theta
    for _ in range(turns):
        cx, cy, theta = cy, width - cx, theta - math.pi / 2
        width, height = height, width
    return normalize_le90(torch.stack([cx, cy, w, h, theta], dim=-1))


class DetectionDataset(Dataset):
    """Samples are (image [C,H,W] float, target dict) as torchvision detectors expect.

    `input_cfg` is the run's resolved input (`config.input.resolved`, or a checkpoint's
    `meta.input.resolved`): which bands are read and how their stored values become floats.
    Without it, the split's own sample spec and all its bands. `target["boxes"]` is a
    `tv_tensors.BoundingBoxes` in the spec's box format on the image's canvas.

    `rboxes=True` adds `target["rboxes"]` (le90, float32 `[N, 5]`) from the annotations'
    `rbox`, and `target["boxes"]` becomes their envelopes; an InputError names a JSON
    prepared without `--boxes obb`.

    Index with an int (no augmentation) or with `(index, augment_seed)` as the
    `ResumableBatchSampler` yields. Crowd (`iscrowd: 1`) and degenerate boxes are left
    out of training targets: torchvision detectors have no ignore regions.

    `cache_images` keeps each image's stored pixels in memory (in their storage type, in
    every loader worker, which live for the whole run) so later epochs skip decoding: for
    small datasets.
    """

    def __init__(self, split: CocoSplit, input_cfg: InputConfig | None = None, augment: Sequence[str] = (),
                 seed: int = 0, cache_images: bool = False, rboxes: bool = False):
        unknown = set(augment) - set(AUGMENTATIONS)
        if unknown:
            raise InputError(f"unknown augmentation(s): {', '.join(sorted(unknown))}")
        if rboxes and (split.info.get("ds2d2") or {}).get("boxes") != "obb":
            raise InputError(f"{split.path.name} holds no rotated boxes (no rbox fields: prepared without "
                             "--boxes obb); prepare the data again with --boxes obb", split.path)
        self.rboxes = rboxes
        self.split = split
        resolved = input_cfg.resolved if input_cfg is not None else None
        self.spec: SampleSpec = resolved.sample if resolved is not None else split.sample
        self.bands: tuple[str, ...] = resolved.bands if resolved is not None else self.spec.bands
        self.augment = tuple(augment)
        self.seed = seed
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}

    def image(self, index: int) -> torch.Tensor:
        pixels = self._cache.get(index)
        if pixels is None:
            pixels = read_pixels(self.split.image_path(self.split.images[index]), self.spec)
            if self.cache_images:
                self._cache[index] = pixels
        return self.spec.to_float(pixels, self.bands)

    def __len__(self) -> int:
        return len(self.split.images)

    def target(self, index: int, canvas_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Boxes, labels and id of image `index`, whose pixels are `canvas_size` (height, width)."""
        info = self.split.images[index]
        anns = [
            a for a in self.split.annotations_by_image[info["id"]]
            if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        ]
        xywh = tv_tensors.BoundingBoxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                                        format="XYWH", canvas_size=canvas_size)  # COCO's box format
        boxes = F.convert_bounding_box_format(xywh, new_format=self.spec.box_format)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if self.rboxes:
            rboxes = self._rboxes(anns)
            boxes = self._envelopes(rboxes, canvas_size)
            return {"boxes": boxes, "rboxes": rboxes, "labels": labels, "image_id": torch.tensor(info["id"])}
        return {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}

    def _rboxes(self, anns: list[dict[str, Any]]) -> torch.Tensor:
        for a in anns:
            if not _is_rbox(a.get("rbox")):
                raise InputError(f"annotation {a.get('id')} has no rbox [cx, cy, w, h, theta]", self.split.path)
        return torch.tensor([a["rbox"] for a in anns], dtype=torch.float32).reshape(-1, 5)

    def _envelopes(self, rboxes: torch.Tensor, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
        xyxy = tv_tensors.BoundingBoxes(rbox_envelope(rboxes.double()).float().reshape(-1, 4), format="XYXY",
                                        canvas_size=canvas_size)
        return F.convert_bounding_box_format(xyxy, new_format=self.spec.box_format)

    def __getitem__(self, item: int | tuple[int, int]):
        index, augment_seed = (item, None) if isinstance(item, int) else item
        image = self.image(index)
        target = self.target(index, tuple(image.shape[-2:]))
        if augment_seed is not None and self.augment:
            rng = np.random.default_rng([self.seed, augment_seed, index])
            moves = augmentation(self.augment, rng)
            turned, target["boxes"] = apply_augmentation(tv_tensors.Image(image), target["boxes"], *moves)
            if self.rboxes:
                target["rboxes"] = augment_rboxes(target["rboxes"], tuple(image.shape[-2:]), *moves)
                target["boxes"] = self._envelopes(target["rboxes"], tuple(turned.shape[-2:]))
            image = turned.as_subclass(torch.Tensor)
        return image, target


def _is_rbox(value: Any) -> bool:
    try:
        return len(value) == 5 and all(math.isfinite(float(v)) for v in value)
    except (TypeError, ValueError):
        return False


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class ResumableBatchSampler(Sampler):
    """Batches for iterations `start .. total-1` of a run, identical however the run is split.

    Each epoch is a seeded permutation (`seed`, `epoch`), cut into full batches (the
    ragged tail is dropped, as detection training usually does). Each element is
    `(index, augment_seed)` so augmentation is reproducible too. With several processes
    (DDP), `rank`/`world_size` take interleaved slices of every global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, total_iters: int, start_iter: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise InputError(
                f"the training split has {num_samples} images, fewer than one batch of {global_batch}; "
                "lower train.batch_size or add data"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.total_iters, self.start_iter = total_iters, start_iter
        self.rank, self.world_size = rank, world_size
        self.iters_per_epoch = num_samples // global_batch

    def __len__(self) -> int:
        return max(0, self.total_iters - self.start_iter)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        epoch, order = -1, None
        for it in range(self.start_iter, self.total_iters):
            e, pos = divmod(it, self.iters_per_epoch)
            if e != epoch:
                epoch = e
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.num_samples, generator=gen).tolist()
            chunk = order[pos * global_batch:(pos + 1) * global_batch]
            mine = chunk[self.rank::self.world_size]
            yield [(idx, epoch) for idx in mine]
