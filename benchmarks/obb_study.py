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
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path too
    sys.path.append(str(Path(__file__).resolve().parent))
from _synthetic_study import scenes_study, study_parser  # noqa: E402

PRESET = "tiny-synthetic-obb"


def run(args: argparse.Namespace) -> Path:
    return scenes_study(args.work, args, preset=PRESET, record="obb_study.json", methods="none,ds2d2,cwd",
                        data_name="data-128-obb", cut=("--boxes", "obb"))


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "runs/obb-study")
    args = parser.parse_args(argv)
    record = run(args)
    print(json.dumps({"record": str(record)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
