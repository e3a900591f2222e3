"""The dataset reads any bands as the data's SampleSpec says, and augments torchvision tv_tensors
exactly as the hand-written arithmetic before it (RGB runs stay bit-identical)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ds2d2_cli.config import InputConfig
from ds2d2_cli.data.dataset import DetectionDataset, Rot90, augment, load_coco_split, read_image
from ds2d2_cli.data.raster import write_geotiff
from ds2d2_cli.errors import InputError
from ds2d2_cli.sample import SampleSpec

BANDS4 = ("red", "green", "blue", "nir")


# The augmentation arithmetic as it was before tv_tensors: the reference the new code must equal bit for bit.
def old_hflip(boxes: torch.Tensor, w: int) -> torch.Tensor:
    return torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def old_vflip(boxes: torch.Tensor, h: int) -> torch.Tensor:
    return torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)


def old_rot90(boxes: torch.Tensor, w: int) -> torch.Tensor:
    return torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)


def old_augment(image, boxes, ops, rng):
    _, h, w = image.shape
    if "hflip" in ops and rng.random() < 0.5:
        image, boxes = image.flip(-1), old_hflip(boxes, w)
    if "vflip" in ops and rng.random() < 0.5:
        image, boxes = image.flip(-2), old_vflip(boxes, h)
    if "rot90" in ops:
        for _ in range(int(rng.integers(0, 4))):
            _, h, w = image.shape
            image, boxes = torch.rot90(image, 1, dims=(1, 2)), old_rot90(boxes, w)
    return image, boxes


def _boxes(values, canvas) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(torch.as_tensor(values, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                    canvas_size=canvas)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def test_a_2x3_box_flipped_and_turned_on_a_4x6_canvas():
    """Box x 1..3, y 0..3 (2 wide, 3 high) on a canvas 4 high, 6 wide; the image's pixels move with it."""
    box = _boxes([[1, 0, 3, 3]], (4, 6))
    assert _plain(F.horizontal_flip(box)).tolist() == [[3, 0, 5, 3]]
    assert _plain(F.vertical_flip(box)).tolist() == [[1, 1, 3, 4]]
    image = torch.zeros(1, 4, 6)
    image[:, 0:3, 1:3] = 1.0  # the box's pixels
    expected = {1: ([[0, 3, 3, 5]], (6, 4)), 2: ([[3, 1, 5, 4]], (4, 6)), 3: ([[1, 1, 4, 3]], (6, 4))}
    for turns, (values, canvas) in expected.items():
        turned_image, turned = Rot90(turns)(tv_tensors.Image(image), box)
        assert _plain(turned).tolist() == values and turned.canvas_size == canvas
        assert tuple(turned_image.shape[-2:]) == canvas
        rows, cols = torch.nonzero(turned_image[0], as_tuple=True)
        assert [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1] == values[0]


def test_flips_and_turns_equal_the_old_arithmetic_bit_for_bit():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    xy = rng.uniform(0, [w, h], size=(200, 2)).astype(np.float32)
    wh = rng.uniform(0.5, 20, size=(200, 2)).astype(np.float32)
    raw = torch.from_numpy(np.concatenate([xy, xy + wh], axis=1))
    raw[:3] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [w - 1.5, h - 2.25, w, h], [0.1, 0.2, 0.3, 0.4]])
    boxes = tv_tensors.BoundingBoxes(raw, format="XYXY", canvas_size=(h, w))
    assert torch.equal(_plain(F.horizontal_flip(boxes)), old_hflip(raw, w))
    assert torch.equal(_plain(F.vertical_flip(boxes)), old_vflip(raw, h))
    reference, width = raw, w
    for turns in (1, 2, 3):
        reference = old_rot90(reference, width)
        width = h if width == w else w
        turned = Rot90(turns)(boxes)
        assert torch.equal(_plain(turned), reference), turns
        assert turned.canvas_size == ((h, w) if turns % 2 == 0 else (w, h))


def test_rot90_of_an_image_is_torch_rot90():
    image = torch.rand(4, 5, 7, generator=torch.Generator().manual_seed(0))
    for turns in range(4):
        turned = Rot90(turns)(tv_tensors.Image(image))
        assert isinstance(turned, tv_tensors.Image)
        assert torch.equal(_plain(turned), torch.rot90(image, turns, dims=(1, 2)))


def test_augment_makes_the_old_draws_and_results():
    """Same generator, same draws in the same order, same pixels and boxes, for every op subset."""
    image = torch.rand(3, 6, 9, generator=torch.Generator().manual_seed(1))
    raw = torch.tensor([[0.5, 1.0, 4.0, 5.5], [2.0, 0.0, 9.0, 3.0]])
    for ops in [("hflip", "vflip", "rot90"), ("hflip", "rot90"), ("vflip",), ("rot90",)]:
        for seed in range(40):
            new_rng, old_rng = np.random.default_rng([1, seed, 7]), np.random.default_rng([1, seed, 7])
            new_image, new_boxes = augment(tv_tensors.Image(image), _boxes(raw, (6, 9)), ops, new_rng)
            old_image, old_boxes = old_augment(image, raw, ops, old_rng)
            assert torch.equal(_plain(new_image), old_image) and torch.equal(_plain(new_boxes), old_boxes)
            assert new_boxes.canvas_size == tuple(old_image.shape[-2:])
            assert new_rng.random() == old_rng.random()  # nothing drawn beyond the old draws


def _coco(folder: Path, file_name: str, size: tuple[int, int], sample: SampleSpec | None) -> Path:
    h, w = size
    data = {"images": [{"id": 1, "file_name": file_name, "height": h, "width": w}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 0, 2, 3], "area": 6, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "ship"}],
            "info": {} if sample is None else {"sample": sample.model_dump(mode="json")}}
    path = folder / "train.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# Percentile scaling of a 4-band uint16 scene: float = (value - low) / (high - low), per band.
SPEC4 = SampleSpec(bands=BANDS4, dtype="uint16", scaling="percentile", low=(100.0, 200.0, 0.0, 1000.0),
                   high=(1100.0, 400.0, 512.0, 3000.0), mean=(0.5, 0.5, 0.5, 0.25), std=(0.2, 0.2, 0.2, 0.125))


def _four_band_scene(tmp_path: Path) -> Path:
    pixels = np.zeros((4, 4, 6), np.uint16)
    pixels[0], pixels[1], pixels[2], pixels[3] = 350, 300, 128, 3500  # 0.25, 0.5, 0.25, 1.25
    pixels[3, 0, 0] = 1000  # 0.0
    pixels[0, 3, 5] = 60000  # (60000 - 100) / 1000 = 59.9: values are not clipped
    write_geotiff(tmp_path / "scene.tif", pixels, band_names=BANDS4)
    return _coco(tmp_path, "scene.tif", (4, 6), SPEC4)


def test_a_four_band_uint16_geotiff_is_read_with_the_datas_percentiles(tmp_path):
    split = load_coco_split(_four_band_scene(tmp_path))
    assert split.sample == SPEC4
    image, target = DetectionDataset(split)[0]
    assert image.dtype == torch.float32 and image.shape == (4, 4, 6)
    assert image[:, 1, 1].tolist() == [0.25, 0.5, 0.25, 1.25]
    assert image[3, 0, 0].item() == 0.0
    assert image[0, 3, 5].item() == pytest.approx(59.9, abs=1e-5)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].canvas_size == (4, 6) and target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert _plain(target["boxes"]).tolist() == [[1, 0, 3, 3]]
    # the run's bands, in the run's order
    nir_red = InputConfig(size=64, bands=("nir", "red")).resolve(SPEC4)
    image, _ = DetectionDataset(split, nir_red)[0]
    assert image.shape == (2, 4, 6) and image[:, 1, 1].tolist() == [1.25, 0.25]


def test_image_cache_keeps_stored_pixels_and_gives_the_same_samples(tmp_path):
    split = load_coco_split(_four_band_scene(tmp_path))
    ops = ("hflip", "vflip", "rot90")
    plain = DetectionDataset(split, augment=ops, seed=2)
    cached = DetectionDataset(split, augment=ops, seed=2, cache_images=True)
    items = [0, *((0, epoch) for epoch in range(8))]
    expected = {item: plain[item] for item in items}
    for _ in range(2):  # filling the cache, then answering from it
        for item in items:
            image, target = cached[item]
            assert torch.equal(image, expected[item][0])
            assert torch.equal(_plain(target["boxes"]), _plain(expected[item][1]["boxes"]))
            assert target["boxes"].canvas_size == expected[item][1]["boxes"].canvas_size
    assert cached._cache[0].dtype == torch.uint16  # the stored type, not a float or uint8 copy


def test_rgb_png_floats_are_the_old_division_by_255(tmp_path):
    from PIL import Image

    hwc = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(hwc).save(tmp_path / "scene.png")
    old = torch.from_numpy(hwc).permute(2, 0, 1).float().div_(255.0)
    new = read_image(tmp_path / "scene.png")
    assert new.dtype == torch.float32 and torch.equal(new, old) and new.stride() == old.stride()
    split = load_coco_split(_coco(tmp_path, "scene.png", (5, 7), None))  # data prepared before bands
    for cache in (False, True):
        dataset = DetectionDataset(split, InputConfig(size=64), cache_images=cache)
        assert torch.equal(dataset[0][0], old) and torch.equal(dataset[0][0], old)


def test_an_image_stored_unlike_the_data_is_one_line_naming_it(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "scene.png")
    with pytest.raises(InputError) as caught:
        read_image(tmp_path / "scene.png", SPEC4)
    assert str(caught.value) == (f"{tmp_path / 'scene.png'}: has 3 bands (red, green, blue) of uint8; "
                                 "the data's images have 4 bands (red, green, blue, nir) of uint16")
    write_geotiff(tmp_path / "grey.tif", np.zeros((1, 4, 6), np.float32))
    with pytest.raises(InputError, match=r"grey.tif: has 1 band \(b1\) of float32; the data's images have "
                                         r"3 bands \(red, green, blue\) of uint8$"):
        read_image(tmp_path / "grey.tif")
