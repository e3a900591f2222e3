"""What distillation buys: student AP per method over several seeds, against the undistilled student.

Per seed: one teacher (trained with that seed), one high-frequency amplifier for it, and
one student per method, all through the library's stage functions (`train_teacher`,
`train_amplifier`, `distill`: the code `ds2d2 train-teacher / train-amplifier / distill`
runs). Each student's metrics are the final evaluation its stage writes into
`summary.json` (the preset's eval split). Methods:

    none            the student alone (distill --method none)
    fitnet          FitNet feature MSE through the adapter
    ds2d2           all four streams, DISW on
    ds2d2-explicit  streams explicit-low, explicit-high
    ds2d2-implicit  streams implicit-full, implicit-high
    ds2d2-no-disw   all four streams, DISW off
    ds2d2-adapted   all four streams, the implicit ones reading the adapter's output (the
                    wiring before the fidelity pass) instead of the student's raw features

Finished stages are reused (a run folder under --work with `model.safetensors` is not
trained again, provided its config.json matches); an interrupted one resumes from its
last checkpoint. Without --data, synthetic scenes are generated and split into patches
under --work (what the tiny presets' comments prescribe).

    python benchmarks/distill_gain.py                                  # tiny-synthetic, seeds 0,1,2
    python benchmarks/distill_gain.py --markdown benchmarks/results/distill_gain.json   # README table
    python benchmarks/distill_gain.py --seeds 0 --iters 2 --teacher-iters 2 --images 6 \\
        --work /tmp/gain --output /tmp/gain/distill_gain.json          # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.config import (RunConfig, config_differences, config_to_json, load_config,  # noqa: E402
                              stored_config, value_differences)
from ds2d2_cli.engine import RESUME_FILE, resolve_device  # noqa: E402
from ds2d2_cli.stages.common import with_data_root  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {  # name -> distill settings (the rest from the preset)
    "none": {"method": "none"},
    "fitnet": {"method": "fitnet"},
    "ds2d2": {"method": "ds2d2", "streams": ["explicit-low", "explicit-high", "implicit-full", "implicit-high"]},
    "ds2d2-explicit": {"method": "ds2d2", "streams": ["explicit-low", "explicit-high"]},
    "ds2d2-implicit": {"method": "ds2d2", "streams": ["implicit-full", "implicit-high"]},
    "ds2d2-no-disw": {"method": "ds2d2", "streams": ["explicit-low", "explicit-high", "implicit-full", "implicit-high"],
                      "disw": False},
    "ds2d2-adapted": {"method": "ds2d2", "streams": ["explicit-low", "explicit-high", "implicit-full", "implicit-high"],
                      "implicit_input": "adapted"},
}
METRICS = ("mAP", "AP50", "AP75", "APs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="tiny-synthetic", help="preset name or YAML path (default tiny-synthetic)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run, as `ds2d2 --set` (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (teacher, amplifier and students)")
    parser.add_argument("--iters", type=int, default=None,
                        help="student max_iters (default: the preset's train schedule); also the amplifier's "
                             "when the preset has no amplifier_train and --amplifier-iters is not given")
    parser.add_argument("--teacher-iters", type=int, default=None, help="teacher max_iters (default: the preset's)")
    parser.add_argument("--amplifier-iters", type=int, default=None,
                        help="amplifier max_iters (default: the preset's amplifier schedule)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    parser.add_argument("--data", type=Path, default=None,
                        help="prepared data folder (default: synthetic scenes generated and split under --work)")
    parser.add_argument("--images", type=int, default=24, help="synthetic scenes to generate without --data (24)")
    parser.add_argument("--scene-size", type=int, default=640, help="synthetic scene size in px (640)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes (0)")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default runs/distill-gain/<preset>)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distill_gain.json")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(empty)'}; available: {', '.join(METHODS)}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    for name in ("iters", "teacher_iters", "amplifier_iters", "images"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.work is None:
        args.work = ROOT / "runs" / "distill-gain" / Path(args.preset).stem
    return args


# ----------------------------------------------------------------------------- configs


def seed_config(base: RunConfig, seed: int, args: argparse.Namespace) -> RunConfig:
    """The preset with each stage's schedule made explicit, seeded, and its iterations overridden."""
    def schedule(stage: str, iters: int | None):
        sched = base.schedule(stage)  # type: ignore[arg-type]
        return sched.model_copy(update={"seed": seed, **({"max_iters": iters} if iters else {})})

    amplifier_iters = args.amplifier_iters
    if amplifier_iters is None and base.amplifier_train is None:
        amplifier_iters = args.iters  # the preset's amplifier follows the student schedule
    return base.model_copy(update={
        "teacher_train": schedule("teacher", args.teacher_iters),
        "amplifier_train": schedule("amplifier", amplifier_iters),
        "train": schedule("student", args.iters),
    })


def method_config(config: RunConfig, method: str) -> RunConfig:
    settings = dict(METHODS[method])
    if "streams" in settings:
        settings["streams"] = tuple(settings["streams"])
    return config.model_copy(update={"distill": config.distill.model_copy(update=settings)})


def _iters(schedule) -> str:
    return f"{schedule.max_iters}it" if schedule.max_iters else f"{schedule.epochs}ep"


# ----------------------------------------------------------------------------- stages


def run_or_reuse(stage: str, out: Path, config: RunConfig, train) -> tuple[dict[str, Any], bool]:
    """(summary, reused): the stage's summary.json when it already finished with this config."""
    stored_path = out / "config.json"
    if (out / "model.safetensors").is_file() and (out / "summary.json").is_file():
        if not stored_path.is_file():
            raise SystemExit(f"{out}: a finished {stage} run without config.json; remove it or use another --work")
        stored = stored_config(json.loads(stored_path.read_text()))
        differ = value_differences(stored.stage_inputs(stage), config.stage_inputs(stage))
        if differ:
            raise SystemExit(f"{out}: a finished {stage} run with another config ({', '.join(differ[:4])}); "
                             "remove it or use another --work")
        return json.loads((out / "summary.json").read_text()), True
    resume = (out / RESUME_FILE).is_file() and stored_path.is_file() and not config_differences(
        stored_path, config_to_json(config))
    if (out / RESUME_FILE).is_file() and not resume:
        raise SystemExit(f"{out}: an unfinished {stage} run with another config; remove it or use another --work")
    return train(resume).summary, False


def prepare_data(args: argparse.Namespace, config: RunConfig) -> Path:
    if args.data is not None:
        return args.data.resolve()
    if config.data.classes != "synthetic":
        raise SystemExit(f"preset {args.preset} uses class set {config.data.classes!r}: pass --data with its prepared data")
    from ds2d2_cli.data.dota import prepare_dota
    from ds2d2_cli.data.synthetic import generate_synthetic

    size = config.input.size
    scenes = args.work / "data" / f"synthetic-{args.images}x{args.scene_size}-s{args.data_seed}"
    patches = scenes.with_name(scenes.name + f"-{size}")
    if not (patches / f"{config.data.train_split}.json").is_file():
        print(f"data: {args.images} synthetic scenes of {args.scene_size} px -> {scenes}", flush=True)
        generate_synthetic(scenes, images=args.images, size=args.scene_size, seed=args.data_seed)
        prepare_dota(scenes, patches, size=size, gap=64, classes="synthetic")
    return patches.resolve()


# ----------------------------------------------------------------------------- statistics


def _points(value: Any) -> float | None:
    """COCO metric -> AP points; COCO's -1 (no such objects) -> None."""
    if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        return None
    return round(100 * value, 2)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    std = statistics.stdev(known) if len(known) > 1 else 0.0
    return round(statistics.fmean(known), 2), round(std, 2)


def aggregate(per_seed: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, runs in per_seed.items():
        entry: dict[str, Any] = {"settings": METHODS[method], "per_seed": {str(s): runs[s] for s in seeds},
                                 "mean": {}, "std": {}}
        for metric in METRICS:
            entry["mean"][metric], entry["std"][metric] = _mean_std([runs[s][metric] for s in seeds])
        if "none" in per_seed:  # paired by seed: same teacher, data and student initialisation seed
            gains = [None if runs[s]["AP50"] is None or per_seed["none"][s]["AP50"] is None
                     else round(runs[s]["AP50"] - per_seed["none"][s]["AP50"], 2) for s in seeds]
            mean, std = _mean_std(gains)
            entry["gain_AP50_vs_none"] = {"mean": mean, "std": std, "per_seed": dict(zip(map(str, seeds), gains))}
        out[method] = entry
    return out


def print_table(methods: dict[str, Any], teachers: dict[str, Any], seeds: list[int]) -> None:
    def cell(entry, metric):
        mean, std = entry["mean"][metric], entry["std"][metric]
        return "-" if mean is None else f"{mean:5.1f}±{std:.1f}"

    header = f"{'method':<16}" + "".join(f"{m:>12}" for m in METRICS) + f"{'dAP50':>12}"
    print(f"\nstudent AP points, mean±std over seeds {','.join(map(str, seeds))} (eval split)")
    print(header)
    print("-" * len(header))
    for method, entry in methods.items():
        gain = entry.get("gain_AP50_vs_none", {})
        g = "-" if gain.get("mean") is None else f"{gain['mean']:+5.1f}±{gain['std']:.1f}"
        print(f"{method:<16}" + "".join(f"{cell(entry, m):>12}" for m in METRICS) + f"{g:>12}")
    t_mean = _mean_std([t["AP50"] for t in teachers.values()])[0]
    a_mean = _mean_std([t.get("amplifier_AP50") for t in teachers.values()])[0]
    print(f"teacher AP50 {t_mean if t_mean is not None else '-'}, amplifier (HF head) AP50 "
          f"{a_mean if a_mean is not None else '-'}")


LABELS = {
    "none": "baseline (no teacher)", "fitnet": "FitNet", "ds2d2": "**DS2D2** (all four streams)",
    "ds2d2-explicit": "DS2D2 explicit streams only", "ds2d2-implicit": "DS2D2 implicit streams only",
    "ds2d2-no-disw": "DS2D2 without DISW",
    "ds2d2-adapted": "DS2D2, implicit streams on adapted features (old wiring)",
}


def markdown_table(record: dict[str, Any]) -> str:
    """The README table of a results file: mean ± std per method, gain paired by seed."""
    seeds = [int(s) for s in record["seeds"]]

    def cell(mean: float | None, std: float | None) -> str:
        return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"

    lines = ["| method | mAP | AP50 | AP75 | APs | AP50 gain vs none (per seed) |", "|---|---|---|---|---|---|"]
    teachers = record["teachers"]
    t = {m: _mean_std([teachers[str(s)][m] for s in seeds]) for m in METRICS}
    lines.append("| teacher | " + " | ".join(cell(*t[m]) for m in METRICS) + " | |")
    for method, entry in record["methods"].items():
        gain = entry.get("gain_AP50_vs_none") or {}
        per_seed = ", ".join(f"{gain['per_seed'][str(s)]:+.2f}" for s in seeds) if gain else ""
        g = f"{gain['mean']:+.2f} ({per_seed})" if gain.get("mean") is not None else "-"
        lines.append(f"| {LABELS.get(method, method)} | "
                     + " | ".join(cell(entry["mean"][m], entry["std"][m]) for m in METRICS) + f" | {g} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _cpu_model() -> str:
    """The CPU's model name: figures from two machines of one kind differ with their kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:  # print the README table of a results file, train nothing
        if len(argv) != 2:
            raise SystemExit("usage: distill_gain.py --markdown RESULTS.json")
        print(markdown_table(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    from ds2d2_cli.stages.amplifier import train_amplifier
    from ds2d2_cli.stages.distill import distill
    from ds2d2_cli.stages.teacher import train_teacher

    started = time.perf_counter()
    device = resolve_device(args.device)
    base = load_config(args.preset, args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, base)
    needs_teacher = any(m != "none" for m in args.methods)
    needs_amplifier = any(METHODS[m]["method"] == "ds2d2" and "implicit-high" in METHODS[m]["streams"]
                          for m in args.methods)
    per_seed: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    teachers: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}

    def run(label: str, stage: str, out: Path, config: RunConfig, train) -> dict[str, Any]:
        t0 = time.perf_counter()
        summary, reused = run_or_reuse(stage, out, with_data_root(config, data), train)
        stage_seconds[label] = round(time.perf_counter() - t0, 2)
        metrics = summary.get("metrics") or {}
        print(f"{label:<32} {'reused' if reused else f'{stage_seconds[label]:.0f} s':>8}  "
              f"mAP {_points(metrics.get('mAP'))}  AP50 {_points(metrics.get('AP50'))}  ({out})", flush=True)
        return summary

    for seed in args.seeds:
        config = seed_config(base, seed, args)
        folder = args.work / f"seed{seed}"
        teacher_path = amplifier_path = None
        if needs_teacher:
            out = folder / f"teacher-{_iters(config.schedule('teacher'))}"
            summary = run(f"seed {seed} teacher", "teacher", out, config,
                          lambda resume, out=out, config=config: train_teacher(
                              config, out=out, data_dir=data, preset=args.preset, device=device, resume=resume))
            teacher_path = out / "model.safetensors"
            teachers[str(seed)] = {k: _points(summary["metrics"].get(k)) for k in METRICS} | {"run": str(out)}
        if needs_amplifier:
            out = folder / f"amplifier-{_iters(config.schedule('amplifier'))}-t{_iters(config.schedule('teacher'))}"
            summary = run(f"seed {seed} amplifier", "amplifier", out, config,
                          lambda resume, out=out, config=config: train_amplifier(
                              config, teacher=teacher_path, out=out, data_dir=data, preset=args.preset,
                              device=device, resume=resume))
            amplifier_path = out / "model.safetensors"
            teachers[str(seed)]["amplifier_AP50"] = _points(summary["metrics"].get("AP50"))
        for method in args.methods:
            student_cfg = method_config(config, method)
            uses_teacher = method != "none"
            uses_amplifier = METHODS[method]["method"] == "ds2d2" and "implicit-high" in METHODS[method]["streams"]
            tag = f"-t{_iters(config.schedule('teacher'))}" if uses_teacher else ""
            out = folder / f"student-{method}-{_iters(config.schedule('student'))}{tag}"
            summary = run(f"seed {seed} student {method}", "student", out, student_cfg,
                          lambda resume, out=out, cfg=student_cfg, t=uses_teacher, a=uses_amplifier: distill(
                              cfg, out=out, teacher=teacher_path if t else None,
                              amplifier=amplifier_path if a else None, data_dir=data, preset=args.preset,
                              device=device, resume=resume))
            metrics = summary.get("metrics") or {}
            per_seed[method][seed] = {k: _points(metrics.get(k)) for k in METRICS} | {
                "train_seconds": summary.get("seconds"), "iterations": summary.get("iterations"),
                "streams": summary.get("streams"), "run": str(out)}

    methods = aggregate(per_seed, args.seeds)
    example = seed_config(base, args.seeds[0], args)
    record = {
        "benchmark": "distill_gain",
        "units": "AP points (COCO metric x 100); gains are paired by seed (method - none)",
        "preset": args.preset,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "methods_run": args.methods,
        "data": str(data),
        "eval_split": base.data.eval_split,
        "work": str(args.work.resolve()),
        "schedules": {stage: json.loads(example.schedule(stage).model_dump_json(exclude={"seed"}))
                      for stage in ("teacher", "amplifier", "student")},
        "config": json.loads(config_to_json(example)) | {"note": f"shown for seed {args.seeds[0]}; distill per method"},
        "torch": torch.__version__,
        "device": str(device),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 2),
        "stage_seconds": stage_seconds,
        "teachers": teachers,
        "methods": methods,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print_table(methods, teachers, args.seeds)
    print(f"-> {args.output} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
