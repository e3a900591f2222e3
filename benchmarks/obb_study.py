"""DS2D2 on oriented boxes: `ds2d2 study` with the oriented RetinaNet on the synthetic scenes, three seeds.

The scenes draw their cars, ships and planes at angles; this runs, through the CLI:

    prepare-data synthetic                         the demo's 24 scenes of 640 px (seed 0)
    prepare-data dota ... --split 128 --gap 32 --boxes obb   rotated boxes (le90) beside the polygons
    train-teacher --preset tiny-synthetic-obb      the demo teacher's recipe (4800 iterations)
    train-amplifier                                the preset's amplifier schedule
    study --methods none,ds2d2,cwd                 the preset's student schedule, seeds 0,1,2,
                                                   whole scenes scored by DOTA Task 1 (AP50 = the devkit's mAP)

Every step is reused when finished and resumed when interrupted (about three and a half hours
on 2 slow cores: the teacher alone is 1 h 50 min), so a run cut off continues with the same
command; `--jobs 2` trains two students at a time, `--teacher-iters` shortens the teacher's
schedule (its steps scale with it):

    python benchmarks/obb_study.py --work runs/obb-study --jobs 2
    python benchmarks/obb_study.py --work runs/obb-study --jobs 2 --teacher-iters 2400   # the committed results
    python benchmarks/obb_study.py --teacher-iters 2 --student-iters 2 --images 4 --seeds 0 \\
        --work /tmp/obb --results /tmp/obb                       # smoke run

Results: `benchmarks/results/obb_study.json` (the study record) and `.md` (its table).
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
PRESET = "tiny-synthetic-obb"


def run(args: argparse.Namespace) -> Path:
    work = args.work
    scenes, data = work / "scenes", work / "data-128-obb"
    if not (data / "val.json").is_file():
        for folder in (scenes, data):
            shutil.rmtree(folder, ignore_errors=True)
        ds2d2("prepare-data", "synthetic", "--out", str(scenes), "--images", str(args.images), "--seed", "0")
        ds2d2("prepare-data", "dota", str(scenes), "--out", str(data), "--split", "128", "--gap", "32",
              "--classes", "synthetic", "--boxes", "obb")
    common = ["--preset", PRESET, "--data", str(data), "--device", args.device, *sets(["data.classes=synthetic"])]
    return teacher_amplifier_study(work, common, args.results / "obb_study.json", seeds=args.seeds,
                                   methods="none,ds2d2,cwd", teacher_iters=args.teacher_iters,
                                   student_iters=args.student_iters, jobs=args.jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, default=Path("runs/obb-study"), help="scenes, data and runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=24, help="synthetic scenes (the demo's 24)")
    parser.add_argument("--teacher-iters", type=int, default=None, help="instead of the demo teacher's 4800")
    parser.add_argument("--student-iters", type=int, default=None, help="students and amplifier (smoke runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once (`ds2d2 study --jobs`)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the records go")
    args = parser.parse_args(argv)
    record = run(args)
    print(json.dumps({"record": str(record)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
