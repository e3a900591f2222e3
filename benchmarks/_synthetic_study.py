"""What the synthetic-scene studies share (`bands_study.py`, `obb_study.py`, `capacity_study.py`,
`frcnn_approx_study.py`): CLI commands run one by one into the log, the demo's scenes cut once,
training stages reused when finished and resumed when interrupted, and the study of one prepared
data folder with a teacher trained to the demo teacher's recipe.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER_RECIPE = ["teacher_train.max_iters=4800", "teacher_train.eval_every=600", "teacher_train.checkpoint_every=300"]


def ds2d2(*args: str) -> None:
    """One CLI command; its output goes to this log, a failure stops the benchmark."""
    command = [sys.executable, "-m", "ds2d2_cli", *args]
    print("$ ds2d2 " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def cut_scenes(scenes: Path, cuts: dict[Path, list[str]], *, images: int, synthetic: tuple[str, ...] = ()) -> None:
    """The demo's synthetic scenes (seed 0, `synthetic` adds options) and their patch folders, made
    once: `cuts` maps each folder to its `prepare-data dota` options after the scenes and --out."""
    if all((folder / "val.json").is_file() for folder in cuts):
        return
    for folder in (scenes, *cuts):
        shutil.rmtree(folder, ignore_errors=True)
    ds2d2("prepare-data", "synthetic", *synthetic, "--out", str(scenes), "--images", str(images), "--seed", "0")
    for folder, options in cuts.items():
        ds2d2("prepare-data", "dota", str(scenes), "--out", str(folder), *options)


def stage(out: Path, *args: str) -> None:
    """A training stage: skipped when finished, resumed when interrupted."""
    if (out / "model.safetensors").is_file():
        print(f"reused: {out}", flush=True)
        return
    resume = ["--resume"] if (out / "checkpoints").is_dir() else []
    ds2d2(*args, "--out", str(out), *resume)


def teacher_amplifier_study(work: Path, common: list[str], record: Path, *, seeds: str, methods: str,
                            teacher_iters: int | None, student_iters: int | None, jobs: int = 1) -> Path:
    """Teacher (demo recipe), amplifier and `ds2d2 study` (whole scenes scored) in `work`; the
    study record goes to `record` and its table beside it (`.md`)."""
    teacher_sets = [*TEACHER_RECIPE]
    if teacher_iters is not None:
        teacher_sets.append(f"teacher_train.max_iters={teacher_iters}")
    stage(work / "teacher", "train-teacher", *common, *sets(teacher_sets))
    teacher = work / "teacher" / "model.safetensors"
    amplifier_sets = [] if student_iters is None else [f"amplifier_train.max_iters={student_iters}"]
    stage(work / "amplifier", "train-amplifier", *common, *sets(amplifier_sets), "--teacher", str(teacher))
    limit = [] if student_iters is None else ["--max-iters", str(student_iters)]
    ds2d2("study", *common, "--teacher", str(teacher), "--amplifier", str(work / "amplifier" / "model.safetensors"),
          "--methods", methods, "--seeds", seeds, "--merge-patches", "--jobs", str(jobs), *limit,
          "--out", str(work / "study"), "--json", str(record))
    table = work / "study" / "study.md"
    if table.is_file():
        shutil.copyfile(table, record.with_suffix(".md"))
    return record


def scenes_study(work: Path, args: argparse.Namespace, *, preset: str, record: str, methods: str,
                 data_name: str = "data-128", cut: tuple[str, ...] = (), synthetic: tuple[str, ...] = ()) -> Path:
    """One preset's study on the demo's scenes cut as the demo preset cuts them (128 px, gap 32;
    `cut` and `synthetic` add options): scenes, patches, teacher, amplifier and `ds2d2 study`."""
    scenes, data = work / "scenes", work / data_name
    cut_scenes(scenes, {data: ["--split", "128", "--gap", "32", "--classes", "synthetic", *cut]},
               images=args.images, synthetic=synthetic)
    common = ["--preset", preset, "--data", str(data), "--device", args.device, *sets(["data.classes=synthetic"])]
    return teacher_amplifier_study(work, common, args.results / record, seeds=args.seeds, methods=methods,
                                   teacher_iters=args.teacher_iters, student_iters=args.student_iters,
                                   jobs=args.jobs)


def study_parser(doc: str, work: str, *, work_help: str = "scenes, data and runs",
                 teacher_iters_help: str = "instead of the demo teacher's 4800") -> argparse.ArgumentParser:
    """The options every synthetic study takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--work", type=Path, default=Path(work), help=work_help)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=24, help="synthetic scenes (the demo's 24)")
    parser.add_argument("--teacher-iters", type=int, default=None, help=teacher_iters_help)
    parser.add_argument("--student-iters", type=int, default=None, help="students and amplifiers (smoke runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once (`ds2d2 study --jobs`)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the records go")
    return parser
