"""Deployment speed: teacher vs student (eager PyTorch), student eager vs onnxruntime.

What distillation buys at inference time. For each preset, teacher and student are built
as the preset says (randomly initialised: speed does not depend on the weights, except
through the number of boxes reaching NMS, which the detectors' prior bias keeps small),
and timed on the same synthetic [N, S, S] scene (N = its bands) at the preset's input size S, one image
per call (deployment latency; the exported ONNX graph takes one image):

- `teacher`, `student`: eager PyTorch, `torch.inference_mode()`;
- `student-onnx`: the student exported as `ds2d2 export` does (full detector with resize,
  normalisation and NMS, opset 18) and run by onnxruntime on the same device.

Variants are interleaved round by round (the order rotates) and each figure is the
median over rounds, so a noisy machine slows all of them alike. Parameters are counted
from the modules; FLOPs with `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
multiply-add; convolutions and linear layers of the backbone, FPN and heads, the RoI
box head for Faster R-CNN) for one forward pass at the preset's input size.

    python benchmarks/bench_inference.py --quick          # tiny-synthetic only
    python benchmarks/run_all.py --only inference         # + retina-dior, frcnn-dior (800 px)
    python benchmarks/bench_inference.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.export import DEFAULT_OPSET, onnx_bytes, onnx_session, synthetic_image  # noqa: E402
from ds2d2_cli.models.detectors import build_detector, rebuild_config  # noqa: E402

QUICK_PRESETS = ("tiny-synthetic",)
FULL_PRESETS = ("tiny-synthetic", "retina-dior", "frcnn-dior")


def _models(preset: str):
    config = load_config(preset)
    classes = get_class_set(config.data.classes)
    torch.manual_seed(0)
    teacher = build_detector(rebuild_config(config.teacher), len(classes), config.input).eval()
    student = build_detector(rebuild_config(config.student), len(classes), config.input).eval()
    return config, teacher, student


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model([image])
    return int(counter.get_total_flops())


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_preset(preset: str, device: torch.device, rounds: int, per_round: int) -> dict:
    config, teacher, student = _models(preset)
    size = config.input.size
    image_cpu = synthetic_image(size, bands=config.input.channels)
    flops = {"teacher": count_flops(teacher, image_cpu), "student": count_flops(student, image_cpu)}
    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "student": sum(p.numel() for p in student.parameters())}

    export_start = time.perf_counter()
    session_device = "cuda" if device.type == "cuda" else "cpu"
    session = onnx_session(onnx_bytes(student, size, DEFAULT_OPSET), device=session_device,
                           threads=torch.get_num_threads())
    export_s = time.perf_counter() - export_start
    providers = session.get_providers()
    feed = {session.get_inputs()[0].name: image_cpu.numpy()}

    teacher.to(device)
    student.to(device)
    image = image_cpu.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def eager(model):
        def call():
            with torch.inference_mode():
                for _ in range(per_round):
                    model([image])
        return call

    def onnx():
        for _ in range(per_round):
            session.run(None, feed)

    variants = {"teacher": eager(teacher), "student": eager(student), "student-onnx": onnx}
    for fn in variants.values():  # warm-up: allocator, cuDNN / oneDNN kernel choice, ORT arena
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_timed(variants[name], sync) / per_round)
    median = {name: statistics.median(values) for name, values in times.items()}
    ips = {name: 1.0 / value for name, value in median.items()}
    case = {
        "preset": preset,
        "detector": config.student.detector,
        "input_size": size,
        "teacher": f"{config.teacher.backbone}-FPN{config.teacher.fpn_channels}",
        "student": f"{config.student.backbone}-FPN{config.student.fpn_channels}",
        "onnx_providers": providers,
        "onnx_export_s": round(export_s, 2),
        "rounds": rounds,
        "images_per_round": per_round,
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "ms_per_image": {k: round(1000 * v, 2) for k, v in median.items()},
        "params": params,
        "gflops": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "student_vs_teacher_speedup": round(ips["student"] / ips["teacher"], 2),
        "onnx_vs_eager_speedup": round(ips["student-onnx"] / ips["student"], 2),
        "student_onnx_vs_teacher_speedup": round(ips["student-onnx"] / ips["teacher"], 2),
        "params_ratio": round(params["teacher"] / params["student"], 2),
        "flops_ratio": round(flops["teacher"] / flops["student"], 2),
    }
    case["summary"] = (
        f"{preset} ({case['teacher']} -> {case['student']}, {size} px): images/s teacher "
        f"{ips['teacher']:.2f}, student {ips['student']:.2f} (x{case['student_vs_teacher_speedup']}), "
        f"student onnxruntime {ips['student-onnx']:.2f} (x{case['onnx_vs_eager_speedup']} vs eager); "
        f"params {params['teacher'] / 1e6:.1f}M -> {params['student'] / 1e6:.1f}M, "
        f"GFLOPs {case['gflops']['teacher']} -> {case['gflops']['student']}"
    )
    return case


def run(quick: bool = False, device: str = "cpu", presets: tuple[str, ...] | None = None) -> dict:
    dev = torch.device(device)
    presets = presets or (QUICK_PRESETS if quick else FULL_PRESETS)
    cases = []
    for preset in presets:
        small = load_config(preset).input.size <= 256
        rounds = 5 if quick else (9 if small else 5)
        per_round = (4 if small else 1) if dev.type == "cpu" else 10
        cases.append(bench_preset(preset, dev, rounds, per_round))
    return {"threads": torch.get_num_threads(), "batch": 1, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-synthetic only, fewer rounds")
    parser.add_argument("--preset", action="append", help="benchmark this preset (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch (and so onnxruntime) intra-op threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "inference.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args.quick, args.device, tuple(args.preset) if args.preset else None)
    record = {
        "benchmark": "inference", "quick": args.quick, "torch": torch.__version__, "device": args.device,
        "device_name": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                        else f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, "
                             f"{torch.get_num_threads()} torch threads)"),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - start, 2), "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for case in results["cases"]:
        print(case["summary"])
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
