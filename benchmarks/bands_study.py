"""DS2D2 beyond optical RGB: `ds2d2 study` on synthetic RGB+NIR and SAR scenes, three seeds.

For each kind of imagery (`rgbn`: 12-bit red, green, blue, near-infrared; `sar`: float32 VV
backscatter read in dB) this runs what a user would, through the CLI:

    prepare-data synthetic --bands KIND        the demo's 24 scenes of 640 px, same layout and labels
    prepare-data dota ... --split 128 --gap 32 the demo preset's patches (GeoTIFF, every band kept)
    train-teacher                              the demo teacher's recipe (tiny-synthetic, 4800 iterations)
    train-amplifier                            the preset's amplifier schedule
    study --methods none,ds2d2,cwd             the preset's student schedule, seeds 0,1,2, whole scenes scored

so the figures sit beside the RGB demo study (`benchmarks/results/demo_study.json`: same
scenes, preset, teacher recipe and student schedule). Every step is reused when finished and
resumed when interrupted, so a run cut off when a session ends continues in the next:

    python benchmarks/bands_study.py                         # both kinds, about 3 h per kind on 2 slow cores
    python benchmarks/bands_study.py --kinds sar --work runs/bands
    python benchmarks/bands_study.py --teacher-iters 2 --student-iters 2 --images 4 --seeds 0 \\
        --work /tmp/bands --results /tmp/bands                  # smoke run

Results: `benchmarks/results/bands_study_<kind>.json` (the study record) and `.md` (its table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path too
    sys.path.append(str(Path(__file__).resolve().parent))
from _synthetic_study import ds2d2, sets, teacher_amplifier_study  # noqa: E402

HERE = Path(__file__).resolve().parent
KINDS = ("rgbn", "sar")
PRESET = "tiny-synthetic"


def run_kind(kind: str, args: argparse.Namespace) -> Path:
    work = args.work / kind
    scenes, data = work / "scenes", work / "data-128"
    if not (data / "val.json").is_file():
        for folder in (scenes, data):
            shutil.rmtree(folder, ignore_errors=True)
        ds2d2("prepare-data", "synthetic", "--bands", kind, "--out", str(scenes), "--images", str(args.images),
              "--seed", "0")
        scaling = ["--scaling", "db"] if kind == "sar" else []
        ds2d2("prepare-data", "dota", str(scenes), "--out", str(data), "--split", "128", "--gap", "32",
              "--classes", "synthetic", *scaling)
    common = ["--preset", PRESET, "--data", str(data), "--device", args.device, *sets(["data.classes=synthetic"])]
    return teacher_amplifier_study(work, common, args.results / f"bands_study_{kind}.json", seeds=args.seeds,
                                   methods="none,ds2d2,cwd", teacher_iters=args.teacher_iters,
                                   student_iters=args.student_iters, jobs=args.jobs)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of rgbn, sar")
    parser.add_argument("--work", type=Path, default=Path("runs/bands-study"), help="scenes, data and runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=24, help="synthetic scenes (the demo's 24)")
    parser.add_argument("--teacher-iters", type=int, default=None, help="instead of the demo teacher's 4800")
    parser.add_argument("--student-iters", type=int, default=None, help="students and amplifier (smoke runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once (`ds2d2 study --jobs`)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the records go")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    for kind in kinds:
        record = run_kind(kind, args)
        print(json.dumps({"kind": kind, "record": str(record)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
