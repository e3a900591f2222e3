"""What distillation buys: student AP per method over several seeds, against the undistilled student.

A thin caller of `ds2d2_cli.study`: where `ds2d2 study` takes one given teacher, this
benchmark replicates the whole pipeline per seed, so teacher noise is part of the spread:
per seed one teacher (trained with that seed), one high-frequency amplifier for it, and
one student per method (`train_teacher`, `train_amplifier`, then `run_study` with that
seed's teacher). Methods are the study's: every registry method (none, fitnet, cwd, pkd,
mgd, fgd, ds2d2) and DS2D2's ablations:

    ds2d2-explicit  streams explicit-low, explicit-high
    ds2d2-implicit  streams implicit-full, implicit-high
    ds2d2-no-disw   all four streams, DISW off
    ds2d2-adapted   all four streams, the implicit ones reading the adapter's output (the
                    wiring before the fidelity pass) instead of the student's raw features

Finished stages are reused (their config.json and teacher must match) and interrupted
ones resume. Without --data, synthetic scenes are generated and split into patches under
--work (what the tiny presets' comments prescribe).

    python benchmarks/distill_gain.py                                  # tiny-synthetic, seeds 0,1,2
    python benchmarks/distill_gain.py --markdown benchmarks/results/distill_gain.json   # README table
    python benchmarks/distill_gain.py --seeds 0 --iters 2 --teacher-iters 2 --images 6 \\
        --work /tmp/gain --output /tmp/gain/distill_gain.json          # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.config import RunConfig, load_config  # noqa: E402
from ds2d2_cli.engine import resolve_device  # noqa: E402
from ds2d2_cli.errors import Ds2d2Error  # noqa: E402
from ds2d2_cli.progress import NullReporter  # noqa: E402
from ds2d2_cli.stages.common import with_data_root  # noqa: E402
from ds2d2_cli.study import (METRICS, StudyRun, ap_points, check_reusable, markdown, method_config,  # noqa: E402
                             needs_amplifier, needs_teacher, run_study, study_methods)

METHODS = ("none", *(m for m in study_methods() if m != "none"))  # the baseline first


class _PrintReporter(NullReporter):
    """The study's notes on stdout (a benchmark log), progress bars off."""

    def note(self, message: str) -> None:
        print(message, flush=True)


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


def _iters(schedule) -> str:
    return f"{schedule.max_iters}it" if schedule.max_iters else f"{schedule.epochs}ep"


# ----------------------------------------------------------------------------- stages


def _stage(stage: str, out: Path, config: RunConfig, train, teacher_sha256: str | None = None) -> dict[str, Any]:
    """A teacher or amplifier run: reused when finished with this config, resumed when cut off."""
    action = check_reusable(stage, out, config, teacher_sha256)
    t0 = time.perf_counter()
    summary = json.loads((out / "summary.json").read_text()) if action == "reuse" else train(action == "resume").summary
    metrics = summary.get("metrics") or {}
    print(f"{stage:<10} {'reused' if action == 'reuse' else f'{time.perf_counter() - t0:.0f} s':>8}  "
          f"AP50 {ap_points(metrics.get('AP50'))}  ({out})", flush=True)
    return summary


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


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:  # print the README table of a results file, train nothing
        if len(argv) != 2:
            raise SystemExit("usage: distill_gain.py --markdown RESULTS.json")
        print(markdown(json.loads(Path(argv[1]).read_text()), timing=False), end="")
        return 0
    args = parse_args(argv)
    from ds2d2_cli.checkpoint import file_sha256
    from ds2d2_cli.stages.amplifier import train_amplifier
    from ds2d2_cli.stages.teacher import train_teacher

    started = time.perf_counter()
    device = resolve_device(args.device)
    base = load_config(args.preset, args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, base)
    configs = {seed: {m: method_config(seed_config(base, seed, args), m) for m in args.methods} for seed in args.seeds}
    any_teacher = any(needs_teacher(c) for per in configs.values() for c in per.values())
    any_amplifier = any(needs_amplifier(c) for per in configs.values() for c in per.values())
    teachers: dict[str, Any] = {}
    runs: list[StudyRun] = []
    try:
        for seed in args.seeds:
            config = seed_config(base, seed, args)
            staged = with_data_root(config, data)
            folder = args.work / f"seed{seed}"
            teacher_path = amplifier_path = None
            if any_teacher:
                out = folder / f"teacher-{_iters(config.schedule('teacher'))}"
                summary = _stage("teacher", out, staged, lambda resume, out=out, config=config: train_teacher(
                    config, out=out, data_dir=data, preset=args.preset, device=device, resume=resume))
                teacher_path = out / "model.safetensors"
                teachers[str(seed)] = {k: ap_points((summary.get("metrics") or {}).get(k)) for k in METRICS}
            if any_amplifier:
                out = folder / f"amplifier-{_iters(config.schedule('amplifier'))}-t{_iters(config.schedule('teacher'))}"
                _stage("amplifier", out, staged, lambda resume, out=out, config=config, t=teacher_path: train_amplifier(
                    config, teacher=t, out=out, data_dir=data, preset=args.preset, device=device, resume=resume),
                    teacher_sha256=file_sha256(teacher_path))
                amplifier_path = out / "model.safetensors"
            for method in args.methods:
                cfg = configs[seed][method]
                tag = f"-t{_iters(config.schedule('teacher'))}" if needs_teacher(cfg) else ""
                runs.append(StudyRun(method, seed, cfg, folder / f"student-{method}-{_iters(config.schedule('student'))}{tag}",
                                     teacher_path if needs_teacher(cfg) else None,
                                     amplifier_path if needs_amplifier(cfg) else None))
        record = run_study(runs, data_dir=data, preset=args.preset, device=device, reporter=_PrintReporter(),
                           teachers=teachers or None)
    except Ds2d2Error as exc:
        raise SystemExit(f"error: {exc}") from None
    example = seed_config(base, args.seeds[0], args)
    record.update({
        "benchmark": "distill_gain",
        "overrides": args.overrides,
        "work": str(args.work.resolve()),
        "teacher_per_seed": True,
        "schedules": {stage: json.loads(example.schedule(stage).model_dump_json(exclude={"seed"}))
                      for stage in ("teacher", "amplifier", "student")},
        "wall_s": round(time.perf_counter() - started, 2),
    })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(markdown(record, timing=False), end="")
    print(f"-> {args.output} ({record['wall_s']:.0f} s)")
    return 0 if record["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
