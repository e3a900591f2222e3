"""Run the benchmarks: every `benchmarks/bench_*.py` exposing `run(quick, device) -> dict`.

Each result goes to `benchmarks/results/<name>.json` with the torch version, the device
and a timestamp, so numbers in docs can be traced to a run.

    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --only disw --device cuda
    python benchmarks/run_all.py --only distill_step     # DS2D2 step vs student + teacher forward

Registered benchmarks (found by file name): disw, wavelet, distill_step, inference
(teacher vs student and eager vs onnxruntime images/s, parameters, FLOPs), rotated_ops
(rotated-box IoU and NMS against shapely and torchvision; needs shapely, a dev dependency,
for the IoU reference), frcnn_recipe (the DS2D2 Faster R-CNN step with the authors' recipe
against each of its settings as ds2d2 had it before), vs_authors (the DS2D2 step of the authors'
MMDetection fork against ours; only in an environment with their fork and mmcv's compiled ops,
otherwise it reports "skipped" and leaves an earlier result file as it was). The step
benchmark's larger R101 configuration needs its own script:
`python benchmarks/bench_distill_step.py --full`. The seed-averaged accuracy gain trains
dozens of models (about an hour per seed on a 2-core CPU), so it runs only when asked:
`python benchmarks/run_all.py --gain` (then `distill_gain.py` with its defaults: the
tiny-synthetic preset, seeds 0,1,2; `python benchmarks/distill_gain.py --help` for more).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def discover() -> dict[str, Path]:
    """{short name: path} for benchmarks/bench_<name>.py."""
    return {p.stem[len("bench_") :]: p for p in sorted(HERE.glob("bench_*.py"))}


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, path: Path) -> ModuleType:
    module = load_module(f"bench_{name}", path)
    if not callable(getattr(module, "run", None)):
        raise SystemExit(f"{path}: no run(quick, device) function")
    return module


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def _summary(name: str, results: dict) -> list[str]:
    lines = [f"[{name}]"]
    for case in results.get("cases", []):
        lines.append("  " + case.get("summary", json.dumps(case)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for <name>.json")
    parser.add_argument("--gain", action="store_true",
                        help="also run distill_gain.py (the accuracy benchmark; hours on a CPU)")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    available = discover()
    wanted = [n.removeprefix("bench_") for n in (args.only or available)]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        module = load(name, available[name])
        start = time.perf_counter()
        results = module.run(quick=args.quick, device=args.device)
        record = {
            "benchmark": name,
            "quick": args.quick,
            "torch": torch.__version__,
            "device": args.device,
            "device_name": describe_device(args.device),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 2),
            "results": results,
        }
        path = args.out / f"{name}.json"
        if results.get("skipped") and path.is_file():  # a skip must not overwrite a measurement
            print("\n".join(_summary(name, results)))
            print(f"  (skipped: {path.name} kept as it was)")
            continue
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print("\n".join(_summary(name, results)))
        print(f"  -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({record['wall_s']} s)")
    if args.gain:
        gain = load_module("distill_gain", HERE / "distill_gain.py")
        gain_args = ["--device", args.device, "--output", str(args.out / "distill_gain.json")]
        code = gain.main(gain_args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
