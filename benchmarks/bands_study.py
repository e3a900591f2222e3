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
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path too
    sys.path.append(str(Path(__file__).resolve().parent))
from _synthetic_study import scenes_study, study_parser  # noqa: E402

KINDS = ("rgbn", "sar")
PRESET = "tiny-synthetic"


def run_kind(kind: str, args: argparse.Namespace) -> Path:
    return scenes_study(args.work / kind, args, preset=PRESET, record=f"bands_study_{kind}.json",
                        methods="none,ds2d2,cwd", cut=("--scaling", "db") if kind == "sar" else (),
                        synthetic=("--bands", kind))


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "runs/bands-study")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of rgbn, sar")
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
