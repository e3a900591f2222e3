"""A torch Dataset over a prepared COCO JSON, with the remote-sensing augmentations.

Images are returned at their stored size as float tensors in [0, 1]; resizing to the
preset input size and normalisation happen inside the torchvision detector's transform,
so predictions come back in image pixels. Augmentation randomness is a pure function
of (seed, sample index, epoch), so runs are reproducible and resumable with any number
of loader workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ds2d2_cli.data.prepared import SCENES_SUFFIX
from ds2d2_cli.errors import InputError, one_line
from ds2d2_cli.sample import SampleSpec

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


def read_image(path: Path) -> torch.Tensor:
    """RGB float tensor [3, H, W] in [0, 1]; a one-line InputError naming an unreadable file."""
    from ds2d2_cli.data.validate import open_rgb

    array = np.asarray(open_rgb(path), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    """Exact inverse of read_image's /255 (a quarter of the memory for the cache)."""
    return image.mul(255.0).round_().to(torch.uint8)


def _augment(image: torch.Tensor, boxes: torch.Tensor, ops: Sequence[str], rng: np.random.Generator):
    _, h, w = image.shape
    if "hflip" in ops and rng.random() < 0.5:
        image = image.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if "vflip" in ops and rng.random() < 0.5:
        image = image.flip(-2)
        boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)
    if "rot90" in ops:
        for _ in range(int(rng.integers(0, 4))):  # each turn: 90 degrees counter-clockwise
            _, h, w = image.shape
            image = torch.rot90(image, 1, dims=(1, 2))
            boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
    return image, boxes


class DetectionDataset(Dataset):
    """Samples are (image [3,H,W] float, target dict) as torchvision detectors expect.

    Index with an int (no augmentation) or with `(index, augment_seed)` as the
    `ResumableBatchSampler` yields. Crowd (`iscrowd: 1`) and degenerate boxes are left
    out of training targets: torchvision detectors have no ignore regions.

    `cache_images` keeps each decoded image in memory (uint8, in every loader worker,
    which live for the whole run) so later epochs skip PNG decoding: for small datasets.
    """

    def __init__(self, split: CocoSplit, augment: Sequence[str] = (), seed: int = 0, cache_images: bool = False):
        unknown = set(augment) - set(AUGMENTATIONS)
        if unknown:
            raise InputError(f"unknown augmentation(s): {', '.join(sorted(unknown))}")
        self.split = split
        self.augment = tuple(augment)
        self.seed = seed
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}

    def image(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        if cached is not None:
            return cached.float().div_(255.0)
        image = read_image(self.split.image_path(self.split.images[index]))
        if self.cache_images:
            self._cache[index] = _as_uint8(image)
        return image

    def __len__(self) -> int:
        return len(self.split.images)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        info = self.split.images[index]
        anns = [
            a for a in self.split.annotations_by_image[info["id"]]
            if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        ]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}

    def __getitem__(self, item: int | tuple[int, int]):
        index, augment_seed = (item, None) if isinstance(item, int) else item
        image = self.image(index)
        target = self.target(index)
        if augment_seed is not None and self.augment:
            rng = np.random.default_rng([self.seed, augment_seed, index])
            image, target["boxes"] = _augment(image, target["boxes"], self.augment, rng)
        return image, target


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
