"""The capacity gap (issue 24): does a stronger teacher stop helping, and which method keeps the gain?

Teachers of growing capacity on the demo's synthetic scenes, all to the demo teacher's recipe
(tiny-synthetic, 4800 iterations, on the scenes cut with gap 64 as it was): the shipped R34 demo teacher, then R50, R101 and
X101-64x4d (`--teachers` cuts the list). For each teacher, its amplifier and, per student
backbone (R18 and MobileNetV3-Large), `ds2d2 study` through the CLI:

    methods  none, ds2d2, cwd, dist, ds2d2-dist (both in one step), and chain (DS2D2 from the
             R34 teacher, then from this one: MTPD's progressive teachers; not for the R34 teacher itself)
    seeds    0, 1, 2, the demo's 450 iterations, whole scenes scored, `--jobs` runs at once

Every stage is reused when finished and resumed when interrupted, so a cut-off run continues
with the same command. Measure the cost first (`capacity_cost.py`: about a day of CPU for
the whole grid on 2 slow cores), then cut teachers or students to fit:

    python benchmarks/capacity_study.py --work runs/capacity --jobs 2
    python benchmarks/capacity_study.py --teachers resnet34,resnet50 --students resnet18 --work runs/capacity
    python benchmarks/capacity_study.py --teachers resnet34,resnet50 --students resnet18 --methods none,ds2d2,dist
    python benchmarks/capacity_study.py --teachers resnet34,resnet50 --students resnet18 --seeds 0 \\
        --teacher-iters 2 --student-iters 2 --images 4 --work /tmp/cap --results /tmp/cap    # smoke run

Results: `benchmarks/results/capacity_study.json` (per teacher and student: the teacher's AP50
and parameters, each method's AP50 and paired gain over none with its interval), `.md` (the
table) and `.png` (gain against teacher parameters, a line per method, a panel per student, and a last
panel of every row against the student/teacher parameter ratio).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path too
    sys.path.append(str(Path(__file__).resolve().parent))
from _synthetic_study import TEACHER_RECIPE, cut_scenes, ds2d2, sets, stage, study_parser  # noqa: E402

HERE = Path(__file__).resolve().parent
PRESET = "tiny-synthetic"
TEACHERS = ("resnet34", "resnet50", "resnet101", "resnext101_64x4d")
STUDENTS = ("resnet18", "mobilenet_v3_large")
METHODS = ("none", "ds2d2", "cwd", "dist", "ds2d2-dist", "chain")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
SHIPPED = "resnet34"  # the demo teacher: tiny-synthetic's own teacher, trained to the same recipe
SHORT = {"resnet18": "R18", "resnet34": "R34", "resnet50": "R50", "resnet101": "R101",
         "resnext101_64x4d": "X101-64x4d", "mobilenet_v3_large": "MobileNetV3-L"}


def parameters(checkpoint: Path) -> int:
    """Weights in a checkpoint, BN statistics left out."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(BN_BUFFERS))


def teacher_and_amplifier(work: Path, teacher_data: Path, data: Path, backbone: str,
                          args: argparse.Namespace) -> tuple[Path, Path]:
    """The teacher trained as the shipped one was (on the gap-64 cut), its amplifier on the demo's cut."""
    settings = ["--preset", PRESET, "--device", args.device,
                *sets(["data.classes=synthetic", f"teacher.backbone={backbone}"])]
    common = [*settings, "--data", str(data)]
    if backbone == SHIPPED and args.teacher_iters is None:
        from ds2d2_cli.demo import shipped_teacher

        teacher = shipped_teacher()
    else:
        recipe = [*TEACHER_RECIPE] + ([f"teacher_train.max_iters={args.teacher_iters}"] if args.teacher_iters else [])
        stage(work / f"teacher-{backbone}", "train-teacher", *settings, "--data", str(teacher_data), *sets(recipe))
        teacher = work / f"teacher-{backbone}" / "model.safetensors"
    limit = [f"amplifier_train.max_iters={args.student_iters}"] if args.student_iters else []
    stage(work / f"amplifier-{backbone}", "train-amplifier", *common, *sets(limit), "--teacher", str(teacher))
    return teacher, work / f"amplifier-{backbone}" / "model.safetensors"


def study(work: Path, data: Path, teacher_backbone: str, student: str, paths: dict[str, tuple[Path, Path]],
          args: argparse.Namespace) -> dict:
    teacher, amplifier = paths[teacher_backbone]
    methods = [m for m in args.methods.split(",") if m != "chain" or (teacher_backbone != SHIPPED and SHIPPED in paths)]
    chain = ["--assistant-teacher", str(paths[SHIPPED][0])] if "chain" in methods else []
    record = args.results / "capacity" / f"{teacher_backbone}-{student}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    limit = ["--max-iters", str(args.student_iters)] if args.student_iters else []
    ds2d2("study", "--preset", PRESET, "--data", str(data), "--device", args.device,
          *sets(["data.classes=synthetic", f"teacher.backbone={teacher_backbone}", f"student.backbone={student}"]),
          "--teacher", str(teacher), "--amplifier", str(amplifier), *chain, "--methods", ",".join(methods),
          "--seeds", args.seeds, "--merge-patches", "--jobs", str(args.jobs), *limit,
          "--out", str(work / f"study-{teacher_backbone}-{student}"), "--json", str(record))
    return json.loads(record.read_text())


def row(teacher_backbone: str, student: str, teacher: Path, record: dict) -> dict:
    student_model = next(Path(r["run"]) / "model.safetensors" for r in record["runs"] if r["method"] == "none")
    methods = {}
    for name, entry in record["table"].items():
        gain = (entry.get("gain") or {}).get("AP50")
        methods[name] = {"AP50": entry["mean"].get("AP50"), "AP50_std": entry["std"].get("AP50"),
                         "gain": gain and {k: gain[k] for k in ("mean", "ci95", "per_seed", "distinguishable")}}
    teacher_ap50 = ((record.get("teacher_metrics") or {}).get("all") or {}).get("AP50")
    teacher_params, student_params = parameters(teacher), parameters(student_model)
    return {"teacher": teacher_backbone, "student": student, "teacher_AP50": teacher_ap50,
            "teacher_parameters": teacher_params, "student_parameters": student_params,
            "student_teacher_parameter_ratio": round(student_params / teacher_params, 3), "methods": methods,
            "complete": record["complete"]}


def markdown(rows: list[dict]) -> str:
    methods = [m for m in METHODS if m != "none" and any(m in r["methods"] for r in rows)]
    lines = ["| student | teacher | teacher AP50 | student/teacher parameters | none AP50 | "
             + " | ".join(f"{m} gain [95% CI]" for m in methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    for r in rows:
        cells = []
        for m in methods:
            gain = (r["methods"].get(m) or {}).get("gain")
            if not gain or gain["mean"] is None:
                cells.append("")
            elif not gain["ci95"]:  # one seed: no interval
                cells.append(f"{gain['mean']:+.2f}")
            else:
                low, high = gain["ci95"]
                cells.append(f"{gain['mean']:+.2f} [{low:+.2f}, {high:+.2f}]" + (" *" if gain["distinguishable"] else ""))
        none = r["methods"]["none"]["AP50"]
        lines.append(f"| {SHORT.get(r['student'], r['student'])} | {SHORT.get(r['teacher'], r['teacher'])} | "
                     f"{r['teacher_AP50']} | {r['student_teacher_parameter_ratio']} | {none} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(dict.fromkeys(r["student"] for r in rows))
    fig, axes = plt.subplots(1, len(students) + 1, figsize=(6 * (len(students) + 1), 4.5), squeeze=False)
    ratio_axis = axes[0][-1]  # every row on one axis: where along student/teacher size the gain falls
    dodge = {m: 1 + 0.015 * (k - 2) for k, m in enumerate(METHODS)}  # methods side by side at one x
    for method in (m for m in METHODS if m != "none"):
        points = sorted((r["student_teacher_parameter_ratio"], r["methods"][method]["gain"]) for r in rows
                        if ((r["methods"].get(method) or {}).get("gain") or {}).get("mean") is not None)
        if points:
            ratio_axis.errorbar([x * dodge[method] for x, _ in points], [g["mean"] for _, g in points],
                                yerr=[[g["mean"] - (g["ci95"] or [g["mean"]])[0] for _, g in points],
                                      [(g["ci95"] or [0, g["mean"]])[1] - g["mean"] for _, g in points]],
                                marker="o", capsize=3, label=method)
    for r in rows:
        ratio_axis.annotate(f"{SHORT.get(r['student'], r['student'])} / {SHORT.get(r['teacher'], r['teacher'])}",
                            (r["student_teacher_parameter_ratio"], 0), fontsize=7, ha="center", va="top")
    ratio_axis.axhline(0, color="grey", linewidth=0.8)
    ratio_axis.set_xlabel("student / teacher parameters")
    ratio_axis.set_ylabel("student AP50 gain over none (95% CI)")
    ratio_axis.set_title("every student and teacher")
    ratio_axis.legend(fontsize=8)
    for ax, student in zip(axes[0], students):
        mine = sorted((r for r in rows if r["student"] == student), key=lambda r: r["teacher_parameters"])
        for method in (m for m in METHODS if m != "none"):
            points = [(r["teacher_parameters"] / 1e6, r["methods"][method]["gain"]) for r in mine
                      if ((r["methods"].get(method) or {}).get("gain") or {}).get("mean") is not None]
            if not points:
                continue
            xs = [x * dodge[method] for x, _ in points]
            ys = [g["mean"] for _, g in points]
            errors = [[g["mean"] - (g["ci95"] or [g["mean"]])[0] for _, g in points],
                      [(g["ci95"] or [0, g["mean"]])[1] - g["mean"] for _, g in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        for r in mine:
            ax.annotate(f"{SHORT.get(r['teacher'], r['teacher'])}\nAP50 {r['teacher_AP50']}",
                        (r["teacher_parameters"] / 1e6, 0), fontsize=7, ha="center", va="top")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks([r["teacher_parameters"] / 1e6 for r in mine],
                      [f"{r['teacher_parameters'] / 1e6:.0f}" for r in mine])
        ax.minorticks_off()
        ax.set_xlabel("teacher parameters (millions)")
        ax.set_ylabel("student AP50 gain over none (95% CI)")
        ax.set_title(f"student {SHORT.get(student, student)}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> Path:
    work = args.work
    # The demo's scenes, cut as the demo cuts them (gap 32: students, amplifiers, scores) and as
    # its shipped teacher was trained (gap 64, `demo.TEACHER_GAP`: every teacher here).
    scenes, data, teacher_data = work / "scenes", work / "data-128", work / "data-128-gap64"
    cut_scenes(scenes, {folder: ["--split", "128", "--gap", str(gap), "--classes", "synthetic"]
                        for folder, gap in ((data, 32), (teacher_data, 64))}, images=args.images)
    teachers, students = args.teachers.split(","), args.students.split(",")
    if any(t not in TEACHERS for t in teachers) or any(s not in STUDENTS for s in students):
        raise SystemExit(f"teachers: {', '.join(TEACHERS)}; students: {', '.join(STUDENTS)}")
    # Weakest teacher first, each one's studies before the next teacher trains: a study cut off
    # by a session's end leaves the rows finished so far, and the chain's first teacher (the
    # shipped R34) is ready before the stronger ones need it.
    paths: dict[str, tuple[Path, Path]] = {}
    rows: list[dict] = []
    out = args.results / "capacity_study.json"
    for teacher_backbone in sorted(teachers, key=TEACHERS.index):
        paths[teacher_backbone] = teacher_and_amplifier(work, teacher_data, data, teacher_backbone, args)
        for student in students:
            record = study(work, data, teacher_backbone, student, paths, args)
            rows.append(row(teacher_backbone, student, paths[teacher_backbone][0], record))
            rows.sort(key=lambda r: (students.index(r["student"]), TEACHERS.index(r["teacher"])))
            out.write_text(json.dumps({"benchmark": "capacity_study", "preset": PRESET, "seeds": args.seeds,
                                       "teacher_iters": args.teacher_iters or 4800,
                                       "student_iters": args.student_iters or 450,
                                       "teachers": teachers, "students": students,
                                       "methods": args.methods.split(","), "rows": rows}, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(rows))
            plot(rows, out.with_suffix(".png"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "runs/capacity", work_help="scenes, data, teachers and runs",
                          teacher_iters_help="instead of the demo teacher's 4800 (then the R34 teacher is "
                          "trained too, not the shipped one)")
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--methods", default=",".join(METHODS), help="a cut of the methods (none is always run)")
    args = parser.parse_args(argv)
    if args.methods.split(",")[0] != "none" or any(m not in METHODS for m in args.methods.split(",")):
        parser.error(f"--methods: none first, then any of {', '.join(METHODS[1:])}")
    print(f"-> {run(args)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
