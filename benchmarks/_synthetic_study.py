"""What the synthetic-scene studies share (`bands_study.py`, `obb_study.py`): CLI commands run
one by one into the log, training stages reused when finished and resumed when interrupted,
and the study of one prepared data folder with a teacher trained to the demo teacher's recipe.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TEACHER_RECIPE = ["teacher_train.max_iters=4800", "teacher_train.eval_every=600", "teacher_train.checkpoint_every=300"]


def ds2d2(*args: str) -> None:
    """One CLI command; its output goes to this log, a failure stops the benchmark."""
    command = [sys.executable, "-m", "ds2d2_cli", *args]
    print("$ ds2d2 " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


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
