"""What `implicit_rois` costs in accuracy: `ds2d2 study` with the Faster R-CNN demo preset, three seeds.

`distill.implicit_rois` (study method `ds2d2-rois-128`) lets the Faster R-CNN implicit streams
compare on 128 RoIs per image instead of the RoI head's 512: the step drops from x1.97 to x1.16
the teacher-based floor (`bench_distill_step.py`). It changes the losses, so it is a named
approximation, off in every preset, and a user needs its price in AP before choosing it. The
RetinaNet approximation (`implicit_every`) was measured the same way with the shipped teacher
(`results/approx_study.json`); Faster R-CNN has no shipped teacher, so this trains one:

    prepare-data synthetic                         the demo's 24 scenes of 640 px (seed 0)
    prepare-data dota ... --split 128 --gap 32     the demo preset's patches
    train-teacher --preset tiny-synthetic-frcnn    the demo teacher's recipe (4800 iterations)
    train-amplifier                                the preset's amplifier schedule
    study --methods none,ds2d2,ds2d2-rois-128      the preset's student schedule, seeds 0,1,2,
                                                   whole scenes scored (patches merged)

Every step is reused when finished and resumed when interrupted, so a run cut off continues with
the same command; `--jobs 2` trains two students at a time, `--teacher-iters` shortens the
teacher's schedule:

    python benchmarks/frcnn_approx_study.py --work runs/frcnn-approx --jobs 2
    python benchmarks/frcnn_approx_study.py --teacher-iters 2 --student-iters 2 --images 4 --seeds 0 \\
        --work /tmp/fa --results /tmp/fa                          # smoke run

Results: `benchmarks/results/frcnn_approx_study.json` (the study record) and `.md` (its table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path too
    sys.path.append(str(Path(__file__).resolve().parent))
from _synthetic_study import scenes_study, study_parser  # noqa: E402

PRESET = "tiny-synthetic-frcnn"
METHODS = "none,ds2d2,ds2d2-rois-128"


def run(args: argparse.Namespace) -> Path:
    return scenes_study(args.work, args, preset=PRESET, record="frcnn_approx_study.json", methods=args.methods)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "runs/frcnn-approx")
    parser.add_argument("--methods", default=METHODS, help=f"study methods (default {METHODS})")
    args = parser.parse_args(argv)
    record = run(args)
    print(json.dumps({"record": str(record)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
