"""Does the data pipeline keep up? Loader images/s against the training step's images/s.

Synthetic DOTA-like scenes are generated and split as `prepare-data dota` does, then the
training loader (`DetectionDataset` with the presets' augmentations, the engine's
`ResumableBatchSampler`, the same collate) is read for three epochs with 0 and 2
workers, with and without the decoded-image cache; epochs 2-3 are timed. Each loader
worker keeps its own cache and sees a different share of every reshuffled epoch, so with
workers the cache fills over the first few epochs. The step is one student training step (`DetectorTask`: forward, backward, SGD)
at the preset's input size and batch, on the benchmark device. The loader feeds the
step fast enough when `loader images/s >= step images/s`; the headroom is their ratio.

Cases: `tiny-synthetic` (128 px patches, the demo) and a DOTA-like 1024 px split fed to
the `retina-dota` student (R18-FPN256 at 1024 px; its CPU step is slow, so read that row
for the loader's absolute speed, or run with `--device cuda`).

    python benchmarks/bench_loader.py --quick
    python benchmarks/run_all.py --only loader
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.data.dataset import DetectionDataset, ResumableBatchSampler, collate, load_coco_split  # noqa: E402
from ds2d2_cli.data.dota import prepare_dota  # noqa: E402
from ds2d2_cli.data.synthetic import generate_synthetic  # noqa: E402
from ds2d2_cli.engine import build_optimizer  # noqa: E402
from ds2d2_cli.models.detectors import build_detector, rebuild_config  # noqa: E402
from ds2d2_cli.tasks import DetectorTask  # noqa: E402

CASES = {
    # name: (preset, scene size, scenes, patch size, gap)
    "tiny-synthetic": ("tiny-synthetic", 512, 8, 128, 0),
    "dota-1024": ("retina-dota", 1024, 24, 1024, 0),
}


def loader_speed(split_json: Path, batch: int, workers: int, cache: bool, augment) -> float:
    split = load_coco_split(split_json)
    dataset = DetectionDataset(split, augment=augment, seed=0, cache_images=cache)
    per_epoch = len(dataset) // batch
    sampler = ResumableBatchSampler(len(dataset), batch, 3 * per_epoch, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    start, images = None, 0
    for i, (batch_images, _) in enumerate(loader):
        if i == per_epoch:  # epochs 2-3 are timed (not worker start-up or the first decode)
            start, images = time.perf_counter(), 0
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def step_speed(preset: str, batch: int, size: int, device: torch.device, steps: int) -> float:
    config = load_config(preset)
    classes = get_class_set(config.data.classes)
    torch.manual_seed(0)
    model = build_detector(rebuild_config(config.student), len(classes), config.input).to(device).train()
    task = DetectorTask(model)
    optimizer = build_optimizer(model, config.train)
    images = [torch.rand(config.input.channels, size, size, device=device) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 100.0, 90.0]], device=device),
                "labels": torch.tensor([1, 2], device=device)} for _ in range(batch)]
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = sum(task.losses(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def run(quick: bool = False, device: str = "cpu") -> dict:
    dev = torch.device(device)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (preset, scene, scenes, patch, gap) in CASES.items():
            if quick and name != "tiny-synthetic":
                continue
            config = load_config(preset)
            root = Path(tmp) / name
            generate_synthetic(root / "scenes", images=scenes, size=scene, seed=0, val_fraction=0.0)
            prepare_dota(root / "scenes", root / "data", size=patch, gap=gap, classes="synthetic")
            split_json = root / "data" / "train.json"
            batch = config.train.batch_size if patch <= 256 else 2
            loader = {}
            for workers in (0, 2):
                for cache in (False, True):
                    key = f"workers={workers}{', cache' if cache else ''}"
                    loader[key] = round(loader_speed(split_json, batch, workers, cache, config.train.augment), 2)
            step = step_speed(preset, batch, config.input.size, dev, steps=3 if quick or patch > 256 else 5)
            best = max(loader.values())
            cases.append({
                "case": name, "preset": preset, "patch_size": patch, "input_size": config.input.size,
                "batch": batch, "patches": len(json.loads(split_json.read_text())["images"]),
                "loader_images_per_s": loader, "step_images_per_s": round(step, 2),
                "headroom": round(best / step, 1),
                "summary": (f"{name} ({patch} px patches, batch {batch}): loader images/s "
                            + ", ".join(f"{k} {v}" for k, v in loader.items())
                            + f"; training step {step:.2f} images/s on {device} -> headroom x{best / step:.1f}"),
            })
    return {"cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny-synthetic case only")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for case in run(args.quick, args.device)["cases"]:
        print(case["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
